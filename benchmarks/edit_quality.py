"""Edit quality on the shipped toy models, with identity measured apart from the edit (issue #22).

The cases (``common.hard_edit_cases``) are held-out toy photos with one or two attributes to change
(colour, shape, size, position, colour+size, shape+position: all but colour are non-rigid), on
backgrounds that are a gradient alone, or a gradient with a texture the model never saw (coarse waves,
fine stripes). Every result is scored against the photo by the shipped attribute classifier and by
pixels:

* success:      every attribute asked to change reads as its target value;
* kept:         the fraction of the attributes NOT asked to change that still read as the photo's;
* background:   mean |result - photo| (0..1) over the pixels neither the photo's object nor the target's
                covers (1.5 px margin): the identity the classifier cannot see;
* structure:    the share of the photo's background variation (gradient, texture; mean colour removed) that
                the result keeps, 1 - |r - p|^2 / |p|^2 clipped at -1: 1 kept, 0 a flat fill of the right mean
                colour, below 0 a wrong structure;
* vacated:      mean |result - ideal| where the photo's object was and the target's is not (a ghost shows);
* to ideal:     mean |result - ideal edit| over the whole image, where the ideal edit is the target drawn
                with the photo's own background, texture and jitter;
* edit made, identity kept (the headline): success, every other attribute kept, and background below
  BACKGROUND_LIMIT (0.05, the demo's limit; another photo's background is about 0.12 away).

Methods (all share the seed, the sampler and the cases; none but Imagic trains anything):
Imagic with LoRA at the benchmark's stages, its fast preset (a quarter of the steps), Imagic with a short
stage 2 only (the over-fitting check), no fine-tuning (e_opt on the base model), SDEdit with the target
text at strength = eta, and on a flow model FlowEdit (with the photo's caption as source text, which
Imagic never gets, and with an empty source text) and RF-Inversion (``imagic/baselines.py`` cites them).
For the baselines the eta column is their strength.

    python benchmarks/edit_quality.py --model imagic/toy/model_flow --stem edit_quality_hard_flow
    python benchmarks/edit_quality.py --quick                 # 12 cases
    python benchmarks/edit_quality.py --workers 2             # one process per core, one thread each
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

from common import HARD_KINDS, TEXTURES, hard_edit_cases

import numpy as np
import torch
from PIL import Image, ImageDraw

from imagic import ImagicResult, finetune, optimize_embedding
from imagic.baselines import flowedit, rf_inversion
from imagic.output import font
from imagic.pipeline import ImagicPipeline
from imagic.toy import MODEL_DIR, data
from imagic.toy.classifier import load_classifier, predict_attributes
from imagic.toy.sample import GATE

BACKGROUND_LIMIT = 0.05
IMAGIC = ("imagic_lora", "imagic_fast", "imagic_short_ft", "no_finetune")
FLOW_BASELINES = ("flowedit", "flowedit_no_source", "rf_inversion")
LABELS = {"imagic_lora": "Imagic (LoRA)", "imagic_fast": "Imagic fast preset (1/4 steps)",
          "imagic_short_ft": "Imagic, stage 2 at 1/4 steps", "no_finetune": "no fine-tuning (e_opt, base model)",
          "sdedit": "SDEdit", "flowedit": "FlowEdit (source caption)",
          "flowedit_no_source": "FlowEdit (empty source text)", "rf_inversion": "RF-Inversion"}
SHORT = {"imagic_lora": "Imagic", "imagic_fast": "Imagic fast", "imagic_short_ft": "Imagic s2/4",
         "no_finetune": "no fine-tune", "sdedit": "SDEdit", "flowedit": "FlowEdit",
         "flowedit_no_source": "FlowEdit no src", "rf_inversion": "RF-Inv"}
MEASURES = ("edit_identity", "edit", "success", "kept", "background", "structure", "to_ideal", "vacated")


def score(images, case, classifier):
    preds = predict_attributes(np.stack([np.asarray(im) for im in images]), model=classifier)
    src = case["image"].astype(np.float32) / 255
    ideal = case["ideal"].astype(np.float32) / 255
    mask = data.background_mask(case["details"], case["source"], case["target"])
    # Where the photo's object was and the target's is not: a clean edit shows background there, a ghost does not.
    vacated = (data.object_coverage(case["source"], case["details"]) > 0.5) & \
        (data.object_coverage(case["target"], case["details"], grow=1.5) == 0)
    others = [k for k in data.ATTRIBUTE_NAMES if k not in case["attrs_changed"]]
    out = []
    for im, p in zip(images, preds):
        x = np.asarray(im, np.float32) / 255
        success = all(p[k] == case["target"][k] for k in case["attrs_changed"])
        kept = [p[k] == case["source"][k] for k in others]
        background = float(np.abs(x - src)[mask].mean())
        # How much of the photo's background structure (gradient, texture) survives, offsets aside: 1 kept,
        # 0 for a flat fill of the right mean colour (an absolute distance alone reads that as close).
        p_bg, r_bg = src[mask] - src[mask].mean(0), x[mask] - x[mask].mean(0)
        # Clipped at -1: on a nearly flat photo background the ratio explodes and would swamp the mean.
        structure = max(-1.0, float(1 - ((r_bg - p_bg) ** 2).sum() / max((p_bg ** 2).sum(), 1e-12)))
        out.append(dict(success=float(success), kept=float(np.mean(kept)), edit=float(success and all(kept)),
                        background=background, structure=structure, to_ideal=float(np.abs(x - ideal).mean()),
                        vacated=float(np.abs(x - ideal)[vacated].mean()) if vacated.any() else float("nan"),
                        edit_identity=float(success and all(kept) and background < BACKGROUND_LIMIT)))
    return out


def embedding_distance(e_opt, e_tgt) -> float:
    """||e_opt - e_tgt|| / ||e_tgt|| over the context: how far stage 1 moved the target embedding."""
    return float((e_opt["context"] - e_tgt["context"]).norm() / e_tgt["context"].norm())


def run_case(pipe, case, args, classifier, flow):
    img = Image.fromarray(case["image"])
    photo = pipe.load_image(img)
    x0 = pipe.encode_image(photo)
    e_tgt = pipe.encode_text(case["text"])
    den = pipe.denoiser(*photo.size)
    settings = dict(width=photo.size[0], height=photo.size[1])
    kw = dict(seed=args.seed, noise_samples=args.noise_samples)
    q = args.fast_divisor
    e_opt, _ = optimize_embedding(den, x0, e_tgt, steps=args.embedding_steps, lr=args.lr_embedding, **kw)
    lora, _ = finetune(den, x0, e_opt, steps=args.finetune_steps, lr=args.lr_lora, method="lora", rank=args.rank, **kw)
    short = None
    if "short_ft" in args.extra:  # the over-fitting check: the same e_opt, a quarter of stage 2
        short, _ = finetune(den, x0, e_opt, steps=args.finetune_steps // q, lr=args.lr_lora, method="lora",
                            rank=args.rank, **kw)
    e_fast, _ = optimize_embedding(den, x0, e_tgt, steps=args.embedding_steps // q, lr=args.lr_embedding_fast, **kw)
    fast, _ = finetune(den, x0, e_fast, steps=args.finetune_steps // q, lr=args.lr_lora, method="lora",
                       rank=args.rank, **kw)
    sample = dict(seed=args.seed, steps=args.sample_steps, guidance=args.guidance)
    etas = args.etas
    results = {
        "imagic_lora": pipe.sample(ImagicResult(e_tgt, e_opt, lora, settings), etas, **sample),
        "imagic_fast": pipe.sample(ImagicResult(e_tgt, e_fast, fast, settings), etas, **sample),
    }
    if short is not None:
        results["imagic_short_ft"] = pipe.sample(ImagicResult(e_tgt, e_opt, short, settings), etas, **sample)
    if "no_finetune" in args.extra:
        results["no_finetune"] = pipe.sample(ImagicResult(e_tgt, e_opt, None, settings), etas, **sample)
    results.update({
        "sdedit": [pipe.sample(ImagicResult(e_tgt, e_tgt, None, settings), [1.0], init_image=img, strength=s,
                               **sample)[0] if s > 0 else photo for s in etas],
    })
    if flow:
        fe = dict(steps=args.sample_steps, guidance_source=args.flowedit_guidance_source,
                  guidance_target=args.flowedit_guidance_target, n_avg=1, seed=args.seed)
        results["flowedit"] = flowedit(pipe, img, case["source_text"], case["text"], etas, **fe)
        results["flowedit_no_source"] = flowedit(pipe, img, "", case["text"], etas, **fe)
        results["rf_inversion"] = rf_inversion(pipe, img, case["text"], etas, steps=args.sample_steps,
                                               guidance=args.guidance, gamma=args.rf_gamma,
                                               eta_control=args.rf_eta, seed=args.seed)
    scores = {m: score(ims, case, classifier) for m, ims in results.items()}
    extra = dict(e_distance=embedding_distance(e_opt, e_tgt), e_distance_fast=embedding_distance(e_fast, e_tgt))
    return scores, results, extra


def mean(vals) -> float:
    """The mean of the values that are not NaN ("vacated" is NaN where the target covers the old object); NaN
    where there are none (a group these cases do not have)."""
    vals = [v for v in vals if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def best_row(rows) -> dict:
    """A method's best eta / strength: the most edits made with identity kept, then edits, then the closest
    background."""
    return max(rows, key=lambda r: (r["edit_identity"], r["edit"], -r["background"]))


def aggregate(per_case, etas, methods):
    table = {}
    for m in methods:
        rows = []
        for j, eta in enumerate(etas):
            row = dict(eta=eta, **{k: mean([c["scores"][m][j][k] for c in per_case]) for k in MEASURES})
            for group, key in (("kind", HARD_KINDS), ("texture", TEXTURES)):
                for v in key:
                    row[f"{group}:{v}"] = mean([c["scores"][m][j]["edit_identity"] for c in per_case if c[group] == v])
            rows.append(row)
        table[m] = dict(rows=rows, best=best_row(rows))
    return table


def markdown(table, meta, methods):
    s = meta["settings"]
    lines = [f"# Edit quality, harder cases, toy model `{s['model']}` ({meta['cases']} cases, {meta['date']})", "",
             f"Machine: {meta['machine']}; {meta['seconds']:.0f} s. Settings: {s}", "",
             f"Headline: **edit made, identity kept** = every asked attribute reads as the target, every other as the "
             f"photo's, and the background within {BACKGROUND_LIMIT} of the photo's. Best eta (Imagic) or strength "
             "(baselines) per method, chosen on that measure.", "",
             "| method | best eta / strength | edit made, identity kept | edit (classifier only) | success | kept "
             "(other attributes) | background distance | background structure kept | to ideal edit | vacated region to ideal | stage steps (1 + 2) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    cost = {"imagic_lora": f"{s['embedding_steps']} + {s['finetune_steps']}",
            "imagic_fast": f"{s['embedding_steps'] // s['fast_divisor']} + {s['finetune_steps'] // s['fast_divisor']}",
            "imagic_short_ft": f"{s['embedding_steps']} + {s['finetune_steps'] // s['fast_divisor']}",
            "no_finetune": f"{s['embedding_steps']} + 0"}
    for m in methods:
        b = table[m]["best"]
        lines.append(f"| {LABELS[m]} | {b['eta']:.2f} | {b['edit_identity']:.2f} | {b['edit']:.2f} | "
                     f"{b['success']:.2f} | {b['kept']:.2f} | {b['background']:.3f} | {b['structure']:.2f} | {b['to_ideal']:.3f} | {b['vacated']:.3f} | "
                     f"{cost.get(m, 'none (sampling only)')} |")
    lines += ["", "Edit made, identity kept, by kind and by background (at each method's best eta):", "",
              "| method | " + " | ".join(HARD_KINDS) + " | " + " | ".join(f"bg {t}" for t in TEXTURES) + " |",
              "|---|" + "---|" * (len(HARD_KINDS) + len(TEXTURES))]
    for m in methods:
        b = table[m]["best"]
        lines.append(f"| {LABELS[m]} | " + " | ".join(f"{b['kind:' + k]:.2f}" for k in HARD_KINDS) + " | "
                     + " | ".join(f"{b['texture:' + t]:.2f}" for t in TEXTURES) + " |")
    lines += ["", "Per eta / strength (edit made and identity kept / success / kept / background / structure / to ideal):", "",
              "| method | " + " | ".join(f"{r['eta']:.2f}" for r in table[methods[0]]["rows"]) + " |",
              "|---|" + "---|" * len(table[methods[0]]["rows"])]
    for m in methods:
        lines.append(f"| {LABELS[m]} | " + " | ".join(
            f"{r['edit_identity']:.2f} / {r['success']:.2f} / {r['kept']:.2f} / {r['background']:.3f} / {r['structure']:.2f} / "
            f"{r['to_ideal']:.3f}" for r in table[m]["rows"]) + " |")
    lines += ["", f"Stage 1's distance ||e_opt - e_tgt|| / ||e_tgt||: {meta['e_distance']:.3f} "
              f"(fast preset: {meta['e_distance_fast']:.3f}), mean over cases.", ""]
    return "\n".join(lines)


def plot(table, path, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for m in methods:
        rows = table[m]["rows"]
        etas = [r["eta"] for r in rows]
        axes[0].plot(etas, [r["edit_identity"] for r in rows], marker="o", label=LABELS[m])
        axes[1].plot([r["background"] for r in rows], [r["edit"] for r in rows], marker="o", label=LABELS[m])
    axes[0].set_xlabel("eta (Imagic) / strength (baselines)")
    axes[0].set_ylabel("edit made and identity kept")
    axes[1].axvline(BACKGROUND_LIMIT, color="grey", ls="--", lw=0.8)
    axes[1].set_xlabel("background distance to the photo")
    axes[1].set_ylabel("edit made (classifier: asked changed, others kept)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Harder toy edits: edit against identity over eta / strength")
    fig.tight_layout()
    fig.savefig(path)


def sheet(per_case_images, table, methods, path, per_kind=1):
    """Labelled examples: a row per case (its kind, background and text on the left), columns the photo,
    the ideal edit, then every method at its best eta (named with that eta above the column)."""
    picked, seen = [], {}
    for case, ims in per_case_images:
        key = (case["kind"], case["texture"] != "none")
        if seen.get(key, 0) < per_kind:
            seen[key] = seen.get(key, 0) + 1
            picked.append((case, ims))
    picked.sort(key=lambda ci: (HARD_KINDS.index(ci[0]["kind"]), ci[0]["texture"]))
    etas = [r["eta"] for r in table[methods[0]]["rows"]]
    best_j = {m: etas.index(table[m]["best"]["eta"]) for m in methods}
    tile, left, top, pad = 80, 250, 46, 6
    cols = ["photo", "ideal edit"] + [f"{SHORT[m]}\n{'eta' if m in IMAGIC else 's'} {etas[best_j[m]]:g}" for m in methods]
    w = left + len(cols) * (tile + pad)
    h = top + len(picked) * (tile + pad)
    out = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(out)
    f = font(12)
    for c, label in enumerate(cols):
        draw.multiline_text((left + c * (tile + pad), 4), label, fill="black", font=f)
    for r, (case, ims) in enumerate(picked):
        y = top + r * (tile + pad)
        draw.multiline_text((4, y + 4), f"{case['kind']}, bg {case['texture']}\n{case['source_text']}\n-> {case['text']}",
                            fill="black", font=f)
        row = [Image.fromarray(case["image"]), Image.fromarray(case["ideal"])] + [ims[m][best_j[m]] for m in methods]
        for c, im in enumerate(row):
            out.paste(im.resize((tile, tile), Image.NEAREST), (left + c * (tile + pad), y))
    out.save(path)


_WORKER = {}


def _init_worker(args):
    # The toy UNet has 2 M parameters: more threads buy little and oversubscribe a shared machine.
    torch.set_num_threads(1)
    pipe = ImagicPipeline.from_pretrained(args.model, device="cpu")
    _WORKER.update(args=args, pipe=pipe, classifier=load_classifier(),
                   flow=pipe.denoiser(32, 32).prediction_type == "flow")


def _run_in_worker(case):
    w = _WORKER
    return run_case(w["pipe"], case, w["args"], w["classifier"], w["flow"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="12 cases (two of each kind)")
    p.add_argument("--cases", type=int, default=60)
    p.add_argument("--etas", default="0,0.6,0.7,0.8,1.0")
    # The benchmark's stages (README, "Defaults, and why"): stage 1 100 steps at 1e-2, stage 2 LoRA 200 at 1e-4.
    p.add_argument("--embedding-steps", type=int, default=100)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--lr-embedding", type=float, default=1e-2)
    p.add_argument("--lr-lora", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--fast-divisor", type=int, default=4, help="the fast preset runs 1/N of both stages' steps")
    p.add_argument("--lr-embedding-fast", type=float, default=4e-2,
                   help="stage 1's rate in the fast preset (4x, for 1/4 of the steps)")
    p.add_argument("--noise-samples", type=int, default=1)
    p.add_argument("--sample-steps", type=int, default=GATE["steps"], help="default: the toy gate's")
    p.add_argument("--guidance", type=float, default=GATE["guidance"], help="default: the toy gate's")
    # FlowEdit's papers' settings are 3.5 / 13.5 (SD3) and 1.5 / 5.5 (Flux), target well above source; the
    # toy over-saturates above guidance ~2, and on 12 cases 5.5 doubled the background change of 3.0.
    p.add_argument("--flowedit-guidance-source", type=float, default=1.5)
    p.add_argument("--flowedit-guidance-target", type=float, default=3.0)
    p.add_argument("--rf-gamma", type=float, default=0.5, help="RF-Inversion's inversion control (paper: 0.5)")
    p.add_argument("--rf-eta", type=float, default=0.9, help="RF-Inversion's reverse control (paper: 0.9)")
    p.add_argument("--kinds", default=",".join(HARD_KINDS), help="only these edit kinds (comma-separated)")
    p.add_argument("--extra", default="", help="more Imagic variants: short_ft (stage 2 at 1/N of its steps), "
                                               "no_finetune (e_opt on the base model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="cases in parallel, one process per core, 1 thread each")
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--stem", default=None, help="output file names (default edit_quality_hard, or _quick)")
    p.add_argument("--reaggregate", metavar="JSON", help="rewrite a run's tables and plot from its per-case scores "
                                                         "(structure clipped at -1, as score() now does); no sampling")
    args = p.parse_args(argv)
    if args.reaggregate:
        return reaggregate(Path(args.reaggregate))
    if args.quick:
        args.cases = 12
    args.etas = [float(e) for e in args.etas.split(",")]
    torch.manual_seed(args.seed)
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in HARD_KINDS]
    if unknown:
        p.error(f"unknown kinds {unknown}: choose from {','.join(HARD_KINDS)}")
    args.extra = [e for e in args.extra.split(",") if e]
    # Cases keep their index in the full list (the same seed, texture and target), whatever --kinds picks.
    cases = [c for c in hard_edit_cases(args.cases * len(HARD_KINDS) // len(kinds)) if c["kind"] in kinds][:args.cases]
    per_case, images, extras = [], [], []
    t0 = time.time()

    def collect(i, case, out):
        scores, ims, extra = out
        per_case.append(dict(seed=case["seed"], kind=case["kind"], texture=case["texture"], text=case["text"],
                             source_text=case["source_text"], scores=scores, **extra))
        images.append((case, ims))
        extras.append(extra)
        line = " ".join(f"{SHORT[m]} {''.join(str(int(s['edit_identity'])) for s in sc)}" for m, sc in scores.items())
        print(f"[{i + 1}/{len(cases)}] {case['kind']:14s} bg {case['texture']:7s}: {line} ({time.time() - t0:.0f}s)",
              flush=True)

    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.workers, _init_worker, (args,)) as pool:
            for i, (case, out) in enumerate(zip(cases, pool.imap(_run_in_worker, cases))):
                collect(i, case, out)
    else:
        _init_worker(args)
        for i, case in enumerate(cases):
            collect(i, case, _run_in_worker(case))
    methods = [m for m in (*IMAGIC, "sdedit", *FLOW_BASELINES) if m in per_case[0]["scores"]]
    table = aggregate(per_case, args.etas, methods)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "model", "stem")}
    model = Path(args.model).resolve()
    root = Path(__file__).resolve().parent.parent
    settings["model"] = model.relative_to(root).as_posix() if model.is_relative_to(root) else str(model)
    meta = dict(cases=len(cases), date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), settings=settings,
                machine=f"{platform.processor() or platform.machine()}, {os_cores()} cores, {args.workers} worker "
                        f"process(es) of 1 torch thread, torch {torch.__version__}",
                seconds=round(time.time() - t0, 1), background_limit=BACKGROUND_LIMIT,
                e_distance=float(np.mean([e["e_distance"] for e in extras])),
                e_distance_fast=float(np.mean([e["e_distance_fast"] for e in extras])))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("edit_quality_hard_quick" if args.quick else "edit_quality_hard")
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, table=table, cases=per_case), indent=1))
    (out / f"{stem}.md").write_text(markdown(table, meta, methods))
    plot(table, out / f"{stem}.png", methods)
    sheet(images, table, methods, out / f"{stem}_examples.png")
    print(markdown(table, meta, methods))


def reaggregate(path: Path):
    """A run's tables and plot again from its JSON's per-case scores (the example sheet needs the images)."""
    run = json.loads(path.read_text())
    for c in run["cases"]:
        for scores in c["scores"].values():
            for s in scores:
                s["structure"] = max(-1.0, s["structure"])
    methods = list(run["table"])
    table = aggregate(run["cases"], [r["eta"] for r in run["table"][methods[0]]["rows"]], methods)
    run["table"] = table
    run["meta"]["reaggregated"] = "structure clipped at -1 per case"
    path.write_text(json.dumps(run, indent=1))
    path.with_suffix(".md").write_text(markdown(table, run["meta"], methods))
    plot(table, path.with_suffix(".png"), methods)
    print(markdown(table, run["meta"], methods))


def os_cores():
    import os

    return os.cpu_count()


if __name__ == "__main__":
    main()
