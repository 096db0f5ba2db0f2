"""Why shape edits fail on the v toy (issue #22): stage 2 variants on the shape cases, read at eta 0, 0.7 and 1.

At eta 1 the fine-tuned model is given the target text alone; if it still draws the photo's shape, stage 2
has taught it the photo's layout whatever the text. Each variant changes one thing from the edit
benchmark's stage 2 (LoRA rank 4, 200 steps at 1e-4, noise levels drawn over all 1000 timesteps):

* steps:        0 (no fine-tuning), 50;
* rate:         3e-5;
* rank:         1;
* noise levels: only t < 500 (the low-noise half, where details are drawn), or only t >= 500 (the
                high-noise half, where the layout and the shape are decided).

All share stage 1 (100 steps at 1e-2), whose distance ||e_opt - e_tgt|| / ||e_tgt|| is recorded, and
every output is scored as in ``edit_quality.py`` (success, kept, background, edit made and identity kept).

    python benchmarks/overfitting.py --cases 2     # the old quick run's two shape cases (common.edit_cases(8))
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import common

common.require("torch", "diffusers", "transformers", "PIL")  # before any work

from common import edit_cases

import numpy as np
import torch
from PIL import Image

from edit_quality import embedding_distance, score
from imagic import ImagicResult, finetune, optimize_embedding
from imagic.pipeline import DiffusersDenoiser, ImagicPipeline
from imagic.toy import MODEL_DIR
from imagic.toy.classifier import load_classifier
from imagic.toy.sample import GATE


class NoiseBand(DiffusersDenoiser):
    """The same denoiser, but stage 2 draws its timesteps from [lo, hi) only (a DDPM model's 0..999)."""

    def __init__(self, base: DiffusersDenoiser, lo: int, hi: int):
        self.__dict__.update(base.__dict__)
        self.lo, self.hi = lo, hi

    def sample_timesteps(self, n, generator):
        return torch.randint(self.lo, self.hi, (n,), generator=generator)


VARIANTS = {  # name: (steps, lr, rank, noise band)
    "no fine-tuning": (0, 1e-4, 4, None),
    "stage 2 as benchmarked (200 steps, 1e-4, rank 4, all t)": (200, 1e-4, 4, None),
    "50 steps": (50, 1e-4, 4, None),
    "rate 3e-5": (200, 3e-5, 4, None),
    "rank 1": (200, 1e-4, 1, None),
    "only t < 500 (low noise)": (200, 1e-4, 4, (0, 500)),
    "only t >= 500 (high noise)": (200, 1e-4, 4, (500, 1000)),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--etas", default="0,0.7,1.0")
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--stem", default="overfitting_shape")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a 2 M-parameter model: more threads oversubscribe a shared machine
    etas = [float(e) for e in args.etas.split(",")]
    pipe = ImagicPipeline.from_pretrained(args.model, device="cpu")
    classifier = load_classifier()
    # The two shape edits of the old quick run (edit_cases(8)) that Imagic failed at every eta, even 1.0.
    from imagic.toy import data

    cases = [dict(c, attrs_changed=("shape",), texture="none", details=data.make_example(c["seed"]).details)
             for c in edit_cases(8) if c["kind"] == "shape"][:args.cases]
    sample = dict(seed=args.seed, steps=GATE["steps"], guidance=GATE["guidance"])
    kw = dict(seed=args.seed, noise_samples=1)
    per_case, t0 = [], time.time()
    for case in cases:
        img = Image.fromarray(case["image"])
        photo = pipe.load_image(img)
        x0, e_tgt = pipe.encode_image(photo), pipe.encode_text(case["text"])
        den = pipe.denoiser(*photo.size)
        settings = dict(width=photo.size[0], height=photo.size[1])
        e_opt, _ = optimize_embedding(den, x0, e_tgt, steps=100, lr=1e-2, **kw)
        row = dict(seed=case["seed"], kind=case["kind"], texture=case["texture"], text=case["text"],
                   e_distance=embedding_distance(e_opt, e_tgt), variants={})
        for name, (steps, lr, rank, band) in VARIANTS.items():
            delta = None
            if steps:
                d = NoiseBand(den, *band) if band else den
                delta, _ = finetune(d, x0, e_opt, steps=steps, lr=lr, method="lora", rank=rank, **kw)
            ims = pipe.sample(ImagicResult(e_tgt, e_opt, delta, settings), etas, **sample)
            row["variants"][name] = score(ims, case, classifier)
        per_case.append(row)
        print(f"{case['kind']} bg {case['texture']}: " + "; ".join(
            f"{n}: {''.join(str(int(s['success'])) for s in v)}" for n, v in row["variants"].items())
            + f" ({time.time() - t0:.0f}s)", flush=True)
    lines = [f"# Shape edits on `{Path(args.model).name}`: stage 2 variants ({len(cases)} cases, "
             f"{datetime.now(timezone.utc):%Y-%m-%d}, 1 torch thread, {time.time() - t0:.0f} s)", "",
             "Stage 1: 100 steps at 1e-2 (shared); ||e_opt - e_tgt|| / ||e_tgt|| = "
             + ", ".join(f"{r['e_distance']:.3f}" for r in per_case) + ". Sampler: DDIM 25 steps, guidance 1.5.", "",
             "| stage 2 | " + " | ".join(f"eta {e:g}: shape read as target / edit made, identity kept / background"
                                          for e in etas) + " |", "|---|" + "---|" * len(etas)]
    for name in VARIANTS:
        cells = []
        for j in range(len(etas)):
            vals = [r["variants"][name][j] for r in per_case]
            cells.append(f"{np.mean([v['success'] for v in vals]):.2f} / "
                         f"{np.mean([v['edit_identity'] for v in vals]):.2f} / {np.mean([v['background'] for v in vals]):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    (out / f"{args.stem}.json").write_text(json.dumps(dict(etas=etas, cases=per_case), indent=1))
    (out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
