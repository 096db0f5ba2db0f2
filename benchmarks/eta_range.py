"""Imagic alone on the edit benchmark's harder cases, over etas (past 1 too) and stage lengths.

Issue #22's over-fitting and its fast preset: e = eta * e_tgt + (1 - eta) * e_opt, sampled at etas up to 2
(past 1 the conditioning moves further along e_tgt - e_opt, away from the photo's embedding; at 1 the
fine-tuned model is given the target text alone, and when stage 2 has taught it the photo whatever the
text it keeps the photo's shape there: ``overfitting.py``), for one or more stage settings (the step-count
curve: the same cases at a fraction of the default stages). Every output is scored as in
``edit_quality.py``; the cases are its first N (``common.hard_edit_cases``).

    python benchmarks/eta_range.py --cases 30                  # the edit benchmark's stages (100 + 200)
    python benchmarks/eta_range.py --cases 30 --model imagic/toy/model_flow --stem eta_range_flow
    # the step-count curve of the product's default stages (500 + 500, stage 1 at 2e-3, LoRA at 1e-4):
    python benchmarks/eta_range.py --cases 12 --stem step_curve \\
        --stages 500+500@2e-3,250+250@4e-3,125+125@8e-3,125+125@8e-3@4e-4

A stage setting is ``E+F[@LR1[@LR2]][/full]``: E stage 1 steps at rate LR1 (default 1e-2), F stage 2 steps at
LR2 (default 1e-4 for LoRA rank 4, 1e-5 for ``/full``, the full fine-tune).
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

import torch
from PIL import Image

from edit_quality import LABELS, MEASURES, best_row, mean, score
from imagic import ImagicResult, finetune, optimize_embedding
from imagic.pipeline import ImagicPipeline
from imagic.toy import MODEL_DIR
from imagic.toy.classifier import load_classifier
from imagic.toy.sample import GATE


def stage_setting(text: str) -> dict:
    """``E+F[@LR1[@LR2]][/full]`` -> dict(embedding_steps, finetune_steps, lr_embedding, lr_finetune, method, name)."""
    spec, _, method = text.strip().partition("/")
    steps, *rates = spec.split("@")
    method = method or "lora"
    try:
        e, f = (int(x) for x in steps.split("+"))
        lr1 = float(rates[0]) if rates else 1e-2
        lr2 = float(rates[1]) if len(rates) > 1 else (1e-4 if method == "lora" else 1e-5)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a stage setting is E+F[@LR1[@LR2]][/full], e.g. 500+500@2e-3; "
                                         f"got {text!r}") from None
    if e < 1 or f < 1 or len(rates) > 2 or method not in ("lora", "full"):
        raise argparse.ArgumentTypeError(f"a stage setting is E+F[@LR1[@LR2]][/full] with E, F >= 1; got {text!r}")
    return dict(embedding_steps=e, finetune_steps=f, lr_embedding=lr1, lr_finetune=lr2, method=method,
                name=f"{e} + {f} (stage 1 at {lr1:g}, {'LoRA' if method == 'lora' else 'full'} at {lr2:g})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--etas", default="0,0.7,0.8,1.0,1.25,1.5,2.0")
    p.add_argument("--stages", default="100+200@1e-2@1e-4",
                   type=lambda s: [stage_setting(x) for x in s.split(",") if x.strip()],
                   help="stage settings E+F[@LR1[@LR2]][/full], comma-separated (default: the edit benchmark's)")
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--stem", default="eta_range")
    p.add_argument("--baselines", metavar="JSON", default=None,
                   help="an edit_quality.py result on these cases' model: its methods on the same cases (by seed), "
                        "each at its best eta / strength, are listed beside the stage settings")
    p.add_argument("--skip", type=int, default=0, help="leave out the first K of the N cases (another run has them)")
    p.add_argument("--rewrite", metavar="JSON", nargs="+", default=None,
                   help="only write the tables again from runs' JSON (e.g. with --baselines), to --out/--stem; "
                        "several runs of other cases are joined: the stage settings they all have, their cases in turn")
    args = p.parse_args(argv)
    if args.rewrite:
        return write(joined([json.loads(Path(f).read_text()) for f in args.rewrite]), Path(args.out), args.stem,
                     args.baselines)
    torch.set_num_threads(1)  # a 2 M-parameter model: more threads oversubscribe a shared machine
    etas = [float(e) for e in args.etas.split(",")]
    pipe = ImagicPipeline.from_pretrained(args.model, device="cpu")
    classifier = load_classifier()
    cases = hard_edit_cases(args.cases)[args.skip:]
    kw = dict(seed=args.seed, noise_samples=1)
    sample = dict(seed=args.seed, steps=GATE["steps"], guidance=GATE["guidance"])
    per_case, t0 = [], time.time()
    train_s = [0.0] * len(args.stages)
    for i, case in enumerate(cases):
        img = Image.fromarray(case["image"])
        photo = pipe.load_image(img)
        x0, e_tgt = pipe.encode_image(photo), pipe.encode_text(case["text"])
        den = pipe.denoiser(*photo.size)
        entry = dict(seed=case["seed"], kind=case["kind"], texture=case["texture"], scores=[])
        for k, st in enumerate(args.stages):
            t1 = time.process_time()
            e_opt, _ = optimize_embedding(den, x0, e_tgt, steps=st["embedding_steps"], lr=st["lr_embedding"], **kw)
            delta, _ = finetune(den, x0, e_opt, steps=st["finetune_steps"], lr=st["lr_finetune"], method=st["method"],
                                rank=4, warn=lambda message: None, **kw)
            train_s[k] += time.process_time() - t1
            ims = pipe.sample(ImagicResult(e_tgt, e_opt, delta, dict(width=photo.size[0], height=photo.size[1])),
                              etas, **sample)
            entry["scores"].append(score(ims, case, classifier))
        per_case.append(entry)
        print(f"[{i + 1}/{len(cases)}] {case['kind']:14s} bg {case['texture']:7s}: edit+identity "
              + " | ".join("".join(str(int(s["edit_identity"])) for s in sc) for sc in entry["scores"])
              + f" ({time.time() - t0:.0f}s)", flush=True)
    settings = [dict(st, train_cpu_s_per_case=train_s[k] / len(cases)) for k, st in enumerate(args.stages)]
    run = dict(model=Path(args.model).name, date=f"{datetime.now(timezone.utc):%Y-%m-%d}",
               seconds=round(time.time() - t0), etas=etas, settings=settings, cases=per_case)
    write(run, Path(args.out), args.stem, args.baselines)


def tabulate(run: dict) -> None:
    """Each stage setting's rows (means over the cases, per eta) and its best eta."""
    per_case = run["cases"]
    for k, st in enumerate(run["settings"]):
        st["rows"] = [dict(eta=eta, **{m: mean([c["scores"][k][j][m] for c in per_case]) for m in MEASURES},
                           **{f"kind:{kind}": mean([c["scores"][k][j]["edit_identity"] for c in per_case
                                                    if c["kind"] == kind]) for kind in HARD_KINDS})
                      for j, eta in enumerate(run["etas"])]
        st["best"] = best_row(st["rows"])


def joined(runs: list) -> dict:
    """One run from runs of other cases: the stage settings all of them have (by name), the cases in turn."""
    if len(runs) == 1:
        return runs[0]
    if any(r["etas"] != runs[0]["etas"] or r["model"] != runs[0]["model"] for r in runs):
        raise SystemExit("--rewrite joins runs of one model at the same etas only")
    names = [st["name"] for st in runs[0]["settings"] if all(st["name"] in [s["name"] for s in r["settings"]]
                                                               for r in runs)]
    if not names:
        raise SystemExit("--rewrite: these runs have no stage setting in common")
    settings, cases = [], []
    for name in names:
        mine = [next(s for s in r["settings"] if s["name"] == name) for r in runs]
        n = [len(r["cases"]) for r in runs]
        settings.append(dict({k: v for k, v in mine[0].items() if k not in ("rows", "best")},
                             train_cpu_s_per_case=sum(s["train_cpu_s_per_case"] * m for s, m in zip(mine, n)) / sum(n)))
    for r in runs:
        index = [[s["name"] for s in r["settings"]].index(name) for name in names]
        cases += [dict(c, scores=[c["scores"][i] for i in index]) for c in r["cases"]]
    seeds = [c["seed"] for c in cases]
    if len(set(seeds)) != len(seeds):
        raise SystemExit("--rewrite: the runs share cases; join runs of other cases (see --skip)")
    return dict(runs[0], date=" and ".join(sorted({r["date"] for r in runs})), seconds=sum(r["seconds"] for r in runs),
                settings=settings, cases=cases)


def write(run: dict, out: Path, stem: str, baselines=None) -> None:
    """The run's JSON and its tables (with ``baselines``: an edit_quality.py result's methods on the same cases)."""
    tabulate(run)
    settings, per_case = run["settings"], run["cases"]
    if baselines:
        run["baselines"] = same_cases(baselines, per_case)
        run["baselines_from"] = Path(baselines).name
    others = run.get("baselines", [])
    lines = [f"# Imagic over etas and stage lengths on `{run['model']}` ({len(per_case)} harder cases, "
             f"{run['date']}, 1 torch thread, {run['seconds']} s)", "",
             f"LoRA rank 4 (full: every weight); sampler: the toy gate's {GATE['steps']} steps, guidance "
             f"{GATE['guidance']}. Training CPU s: process CPU time of both stages per case (1 thread).", ""]
    if len(settings) > 1 or others:
        first = settings[0]["train_cpu_s_per_case"]
        lines += ["| stages | training CPU s per case | of the first row's | best eta | edit made, identity kept | "
                  "edit (classifier) | background | to ideal |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for st in settings:
            b = st["best"]
            lines.append(f"| {st['name']} | {st['train_cpu_s_per_case']:.1f} | {st['train_cpu_s_per_case'] / first:.2f} | "
                         f"{b['eta']:g} | {b['edit_identity']:.2f} | {b['edit']:.2f} | {b['background']:.3f} | "
                         f"{b['to_ideal']:.3f} |")
        for o in others:
            b = o["best"]
            lines.append(f"| {o['name']} (`{run['baselines_from']}`, the same cases) | | | {b['eta']:g} | "
                         f"{b['edit_identity']:.2f} | {b['edit']:.2f} | {b['background']:.3f} | {b['to_ideal']:.3f} |")
        lines.append("")
    for st in settings:
        lines += [f"## {st['name']}", "",
                  "| eta | edit made, identity kept | edit (classifier) | success | kept | background | to ideal | "
                  + " | ".join(HARD_KINDS) + " |", "|---|" + "---|" * (6 + len(HARD_KINDS))]
        for r in st["rows"]:
            lines.append(f"| {r['eta']:g} | {r['edit_identity']:.2f} | {r['edit']:.2f} | {r['success']:.2f} | "
                         f"{r['kept']:.2f} | {r['background']:.3f} | {r['to_ideal']:.3f} | "
                         + " | ".join(f"{r['kind:' + k]:.2f}" for k in HARD_KINDS) + " |")
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(run, indent=1))
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def same_cases(path, per_case) -> list:
    """The methods of an edit_quality.py result on the cases of this run (matched by seed), each at its best
    eta / strength by the same ordering as here."""
    report = json.loads(Path(path).read_text())
    by_seed = {c["seed"]: c for c in report["cases"]}
    missing = [c["seed"] for c in per_case if c["seed"] not in by_seed]
    if missing:
        raise SystemExit(f"{path} has no scores for {len(missing)} of these cases (e.g. seed {missing[0]}): "
                         "give a result of at least as many cases")
    theirs = [by_seed[c["seed"]] for c in per_case]
    out = []
    st = report["meta"]["settings"]
    steps = {"imagic_lora": (st["embedding_steps"], st["finetune_steps"]),
             "imagic_fast": (st["embedding_steps"] // st["fast_divisor"], st["finetune_steps"] // st["fast_divisor"])}
    for method in report["table"]:
        if method.startswith("imagic") and method not in steps:
            continue
        rows = [dict(eta=eta, **{m: mean([c["scores"][method][j][m] for c in theirs]) for m in MEASURES})
                for j, eta in enumerate(report["meta"]["settings"]["etas"])]
        name = LABELS.get(method, method) + (" {} + {} steps".format(*steps[method]) if method in steps else "")
        out.append(dict(method=method, name=name, rows=rows,
                        best=best_row(rows)))
    return out


if __name__ == "__main__":
    main()
