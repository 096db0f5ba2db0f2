"""Imagic past eta 1 (issue #22's over-fitting): the edit benchmark's Imagic on its harder cases, sampled
at etas up to 2, where e = eta * e_tgt + (1 - eta) * e_opt extrapolates beyond the target text.

At eta 1 the fine-tuned model is given the target text alone; when stage 2 has taught it the photo whatever
the text, it keeps the photo's shape there (``overfitting.py``). Past 1 the conditioning moves further along
e_tgt - e_opt, away from the photo's embedding. Every output is scored as in ``edit_quality.py``; the cases
are its first N (``common.hard_edit_cases``), the stages its defaults (100 + 200 steps, LoRA rank 4).

    python benchmarks/eta_range.py --cases 30
    python benchmarks/eta_range.py --cases 30 --model imagic/toy/model_flow --stem eta_range_flow
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import common

common.require("torch", "diffusers", "transformers", "PIL")  # before any work

from common import HARD_KINDS, hard_edit_cases

import numpy as np
import torch
from PIL import Image

from edit_quality import MEASURES, score
from imagic import ImagicResult, finetune, optimize_embedding
from imagic.pipeline import ImagicPipeline
from imagic.toy import MODEL_DIR
from imagic.toy.classifier import load_classifier
from imagic.toy.sample import GATE


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--etas", default="0,0.7,0.8,1.0,1.25,1.5,2.0")
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--stem", default="eta_range")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a 2 M-parameter model: more threads oversubscribe a shared machine
    etas = [float(e) for e in args.etas.split(",")]
    pipe = ImagicPipeline.from_pretrained(args.model, device="cpu")
    classifier = load_classifier()
    cases = hard_edit_cases(args.cases)
    kw = dict(seed=args.seed, noise_samples=1)
    sample = dict(seed=args.seed, steps=GATE["steps"], guidance=GATE["guidance"])
    per_case, t0 = [], time.time()
    for i, case in enumerate(cases):
        img = Image.fromarray(case["image"])
        photo = pipe.load_image(img)
        x0, e_tgt = pipe.encode_image(photo), pipe.encode_text(case["text"])
        den = pipe.denoiser(*photo.size)
        e_opt, _ = optimize_embedding(den, x0, e_tgt, steps=100, lr=1e-2, **kw)
        lora, _ = finetune(den, x0, e_opt, steps=200, lr=1e-4, method="lora", rank=4, **kw)
        ims = pipe.sample(ImagicResult(e_tgt, e_opt, lora, dict(width=photo.size[0], height=photo.size[1])), etas,
                          **sample)
        scores = score(ims, case, classifier)
        per_case.append(dict(seed=case["seed"], kind=case["kind"], texture=case["texture"], scores=scores))
        print(f"[{i + 1}/{len(cases)}] {case['kind']:14s} bg {case['texture']:7s}: edit "
              + "".join(str(int(s["success"])) for s in scores) + " edit+identity "
              + "".join(str(int(s["edit_identity"])) for s in scores) + f" ({time.time() - t0:.0f}s)", flush=True)
    rows = [dict(eta=eta, **{k: float(np.nanmean([c["scores"][j][k] for c in per_case])) for k in MEASURES},
                 **{f"kind:{kind}": float(np.mean([c["scores"][j]["edit_identity"] for c in per_case if c["kind"] == kind]))
                    for kind in HARD_KINDS})
            for j, eta in enumerate(etas)]
    lines = [f"# Imagic past eta 1 on `{Path(args.model).name}` ({len(cases)} harder cases, "
             f"{datetime.now(timezone.utc):%Y-%m-%d}, 1 torch thread, {time.time() - t0:.0f} s)", "",
             "Stages as in the edit benchmark (100 steps at 1e-2, LoRA rank 4 200 steps at 1e-4); sampler: the toy "
             f"gate's {GATE['steps']} steps, guidance {GATE['guidance']}.", "",
             "| eta | edit made, identity kept | edit (classifier) | success | kept | background | to ideal | "
             + " | ".join(HARD_KINDS) + " |", "|---|" + "---|" * (6 + len(HARD_KINDS))]
    for r in rows:
        lines.append(f"| {r['eta']:g} | {r['edit_identity']:.2f} | {r['edit']:.2f} | {r['success']:.2f} | {r['kept']:.2f} | "
                     f"{r['background']:.3f} | {r['to_ideal']:.3f} | "
                     + " | ".join(f"{r['kind:' + k]:.2f}" for k in HARD_KINDS) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(dict(etas=etas, rows=rows, cases=per_case), indent=1))
    (out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
