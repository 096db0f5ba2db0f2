"""Objective against step for both Imagic stages on the shipped toy model: the evidence behind the defaults.

For a few held-out toy images, each with an edit text as e_tgt (the cases of edit_quality.py), it runs

* stage 1 (optimize_embedding) at several learning rates, and
* stage 2 (finetune, LoRA and full) at several learning rates, starting from the e_opt of stage 1 at
  the default learning rate,

for an increasing number of steps, and records the objective on fixed held-out (noise, t) pairs
(`evaluate_objective`: the same loss as training, without the sampling noise of a training step).
One run per learning rate: the objective is evaluated at the listed steps from inside the run of
`optimize_embedding` / `finetune` itself (their ``watch`` callback), so what is measured is their trajectory.

    python benchmarks/convergence.py                 # writes benchmarks/results/convergence.{json,md,png}
    python benchmarks/convergence.py --quick         # 2 images, short grid
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import common

common.require("torch", "diffusers", "transformers", "matplotlib", "PIL")  # before any work (the plot is last)

from common import edit_cases

import numpy as np
import torch
from PIL import Image
from imagic import finetune, optimize_embedding
from imagic.defaults import DEFAULTS
from imagic.objective import evaluate_objective, held_out_pairs
from imagic.pipeline import ImagicPipeline
from imagic.toy import MODEL_DIR

STAGE1_LRS = (5e-4, 2e-3, 1e-2)
LORA_LRS = (1e-4, 1e-3, 3e-3)
FULL_LRS = (5e-7, 1e-5, 1e-4)
STEPS = (0, 25, 50, 100, 200, 400)


def prepare(pipe, case):
    photo = pipe.load_image(Image.fromarray(case["image"]))
    x0 = pipe.encode_image(photo)
    den = pipe.denoiser(*photo.size)
    return den, x0, pipe.encode_text(case["text"]), held_out_pairs(den, x0, count=32)


def trajectory(train, objective, steps):
    """The objective before training and at each of ``steps``, watched from inside one run."""
    at = {0: objective(None)}

    def watch(step, state):
        if step in steps:
            at[step] = objective(state)

    result, _ = train(max(steps), watch)
    return [at[n] for n in steps], result


def stage1(den, x0, e_tgt, lr, steps, args, evaluate):
    return trajectory(lambda n, watch: optimize_embedding(den, x0, e_tgt, steps=n, lr=lr, seed=args.seed,
                                                         noise_samples=args.noise_samples, watch=watch),
                      lambda e: evaluate(e_tgt if e is None else e), steps)


def stage2(den, x0, e_opt, method, lr, steps, args, evaluate):
    curve, _ = trajectory(lambda n, watch: finetune(den, x0, e_opt, steps=n, lr=lr, method=method, rank=args.rank,
                                                   seed=args.seed, noise_samples=args.noise_samples, watch=watch),
                          lambda delta: evaluate(e_opt), steps)
    return curve


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--noise-samples", type=int, default=DEFAULTS["noise_samples"])
    p.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the toy UNet has 2 M parameters: more threads oversubscribe a shared machine
    steps = STEPS
    if args.quick:
        args.images, steps = 2, (0, 25, 50)
    pipe = ImagicPipeline.from_pretrained(args.model, device="cpu")
    cases = edit_cases(args.images)
    lr1 = DEFAULTS["lr_embedding"]
    curves = {"embedding": {}, "lora": {}, "full": {}}
    t0 = time.time()
    for i, case in enumerate(cases):
        den, x0, e_tgt, pairs = prepare(pipe, case)

        def objective(cond, den=den, x0=x0, pairs=pairs):
            return evaluate_objective(den, x0, cond, pairs)

        e_opt = None
        for lr in STAGE1_LRS:
            c, e = stage1(den, x0, e_tgt, lr, steps, args, objective)
            curves["embedding"].setdefault(f"{lr:g}", []).append(c)
            if lr == lr1:
                e_opt = e
        for method, lrs in (("lora", LORA_LRS), ("full", FULL_LRS)):
            for lr in lrs:
                c = stage2(den, x0, e_opt, method, lr, steps, args, objective)
                curves[method].setdefault(f"{lr:g}", []).append(c)
        print(f"[{i + 1}/{len(cases)}] {case['text']!r} ({time.time() - t0:.0f}s)", flush=True)

    mean = {stage: {lr: np.mean(np.array(cs), axis=0).tolist() for lr, cs in by_lr.items()}
            for stage, by_lr in curves.items()}
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), images=len(cases), steps=list(steps),
                noise_samples=args.noise_samples, rank=args.rank, stage2_start=f"e_opt after {steps[-1]} steps at {lr1:g}",
                machine=f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                seconds=round(time.time() - t0, 1), model=Path(args.model).name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "convergence_quick" if args.quick else "convergence"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, mean=mean, per_image=curves), indent=1))
    md = markdown(mean, meta)
    (out / f"{stem}.md").write_text(md)
    plot(mean, meta, out / f"{stem}.png")
    print(md)


def markdown(mean, meta):
    names = {"embedding": "stage 1: embedding", "lora": f"stage 2: LoRA r{meta['rank']}", "full": "stage 2: full"}
    lines = [f"# Held-out objective against step, toy model ({meta['images']} images, {meta['date']})", "",
             f"Objective on 32 fixed (noise, t) pairs per image, mean over images; noise samples per step "
             f"{meta['noise_samples']}; stage 2 starts from {meta['stage2_start']}. {meta['machine']}, "
             f"{meta['seconds']:.0f} s.", "",
             "| stage | lr | " + " | ".join(f"{n} steps" for n in meta["steps"]) + " |",
             "|---|---|" + "---:|" * len(meta["steps"])]
    for stage, by_lr in mean.items():
        for lr, c in by_lr.items():
            lines.append(f"| {names[stage]} | {lr} | " + " | ".join(f"{v:.4f}" for v in c) + " |")
    return "\n".join(lines) + "\n"


def plot(mean, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=100)
    for ax, (stage, by_lr) in zip(axes, mean.items()):
        for lr, c in by_lr.items():
            ax.plot(meta["steps"], c, marker="o", label=f"lr {lr}")
        ax.set_title(stage)
        ax.set_xlabel("steps")
        ax.set_ylabel("held-out objective")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
