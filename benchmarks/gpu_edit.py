"""The default edit on a GPU, against the cost model: Flux.1 dev (fp8 weights) and SDXL at full size.

Builds a real-size Flux.1 dev (hidden 3072, 24 heads, 19 double + 38 single blocks; the host's
``comfy.supported_models.Flux`` with the Flux dev unet config, weights in float8_e4m3fn with the host's
manual cast, as UNETLoader's ``weight_dtype`` fp8_e4m3fn loads it) and SDXL (``speed.builders.build_host_model``,
the dtype the host's loader picks), both with seeded random weights, nothing downloaded. Then, through the
pack's own stage runner (``nodes/host/stages.py``, what Optimize Embedding and Fine-tune UNet call):

1. **stages**: s/step and peak VRAM (``torch.cuda.max_memory_allocated`` from after the model is loaded for
   training) of stage 1 and stage 2 at each ``--sizes`` with the workflows' defaults (LoRA rank 4, gradient
   checkpointing on in both nodes, fast Adam), ``--warmup`` + ``--steps`` steps;
2. **e2e**: one edit end to end at the first size: ``--embedding-steps`` + ``--finetune-steps`` (default
   imagic/defaults.py's 500 + 500), then ``--etas`` sampled through the host's KSampler (``nodes.common_ksampler``)
   with the family's workflow settings (Flux: 20 steps euler/simple, cfg 1, guidance 3.5; SDXL: 50 steps
   ddim/ddim_uniform, cfg 7.5) on the patched MODEL Fine-tune UNet hands on;
3. **compare**: measured / estimated for s/step (``imagic.cost.seconds_for`` at the H200 class) and for memory
   (``imagic.cost.estimate(...)["memory_bytes"]``), where the cost model has an estimate ("no estimate" and
   why where it has none).

Writes ``gpu_edit.json`` and ``gpu_edit.md`` to ``--out`` (default $OUT, else benchmarks/results).
``--tiny --device cpu`` runs the same code on tiny configs of both families (the dry run; about a minute).
Needs COMFYUI_PATH (a ComfyUI 0.33 tree)::

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu_edit.py --device cuda --embedding-steps 50 --finetune-steps 50
    COMFYUI_PATH=/work/hosts/comfy033 python benchmarks/gpu_edit.py --tiny --device cpu --out /tmp/gpu_edit_dry
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import common
from common import GB, ROOT, comfyui_root, host_version, machine_info

common.require("torch")
from speed.builders import build_host_model
from speed.configs import TEXT_SHAPES
from speed.host_worker import import_host

# Flux.1 dev as the host's detection reads it from the released file; tiny: the host tests' tiny Flux dev
# (tests/host/flow_models.py): the same key layout, 128 wide, one block of each kind.
FLUX_DEV = dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000,
                out_channels=16, qkv_bias=True, txt_ids_dims=[], in_channels=16, hidden_size=3072,
                context_in_dim=4096, patch_size=2, vec_in_dim=768, depth=19, depth_single_blocks=38,
                guidance_embed=True, yak_mlp=False, txt_norm=False)
FLUX_DEV_TINY = dict(FLUX_DEV, num_heads=1, hidden_size=128, depth=1, depth_single_blocks=1)
FLUX_TEXT_TOKENS = 512  # T5-XXL as ComfyUI pads Flux's prompt (also what the cost model assumes)

# Per family: how its workflow samples (workflows/imagic_flux.json, imagic_sdxl.json), the cost model's key,
# the latent (channels, downscale), and the text the encoders give.
FAMILIES = {
    "flux": dict(cost_key="Flux", latent=(16, 8), sample_steps=20, cfg=1.0,
                 sampler="euler", scheduler="simple"),
    "sdxl": dict(cost_key="SDXL", latent=(4, 8), sample_steps=50, cfg=7.5,
                 sampler="ddim", scheduler="ddim_uniform"),
}
GPU_CLASS = "H200"


def build_flux(tiny: bool, seed: int = 0, depths: dict | None = None):
    """Flux.1 dev in fp8 (float8_e4m3fn) with the host's manual cast, seeded random weights, in a ModelPatcher.
    ``depths`` overrides depth / depth_single_blocks (the block-cost rows: full width, 1 or 2 blocks)."""
    import torch
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = dict(FLUX_DEV_TINY if tiny else FLUX_DEV, **(depths or {}))
    model_config = comfy.supported_models.Flux(config)
    load_device = mm.get_torch_device()
    dtype = torch.float8_e4m3fn  # what UNETLoader's weight_dtype "fp8_e4m3fn" sets (model_options["dtype"])
    manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    base = model_config.get_model({}, device=torch.device("meta"))
    net = base.diffusion_model
    sd = net.state_dict()
    detected_class = type(comfy.model_detection.model_config_from_unet(sd, "")).__name__
    detected = comfy.model_detection.detect_unet_config(sd, "") or {}
    wrong = {k: (v, detected.get(k)) for k, v in config.items() if detected.get(k) != v}
    if detected_class != "Flux" or wrong:
        raise RuntimeError(f"the host detects this network as {detected_class}, config differences (want, got): {wrong}")
    del sd
    n_params = sum(p.numel() for p in net.parameters())
    device = mm.unet_inital_load_device(n_params, dtype)
    net.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():  # fp8 has no random kernels: drawn in fp32 per tensor, then cast by copy_
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                bound = math.sqrt(3.0 / p[0].numel())
                p.copy_(torch.empty(p.shape, device=device).uniform_(-bound, bound, generator=g))
            elif name.endswith(("scale", "norm.weight")):  # RMSNorm / QK-norm scales: unit, as trained
                p.fill_(1.0)
            else:
                p.zero_()
        for b in net.buffers():
            b.zero_()
    base.device = device
    info = dict(host_class="Flux", detected_as=detected_class, params=n_params,
                weight_dtype=str(dtype).replace("torch.", ""),
                manual_cast_dtype=str(manual_cast).replace("torch.", "") if manual_cast is not None else None,
                weight_bytes=sum(p.numel() * p.element_size() for p in net.parameters()))
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())
    return patcher, info


def build(family: str, tiny: bool, depths: dict | None = None):
    import torch

    with torch.inference_mode():  # as the loader nodes build it: the weights are inference tensors
        if family == "flux":
            return build_flux(tiny, depths=depths)
        patcher, info = build_host_model("sdxl", "host", tiny)
        info["weight_bytes"] = sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())
        return patcher, info


def inputs(family: str, px: int, seed: int = 1):
    """(target CONDITIONING, negative CONDITIONING, image LATENT) in the shapes the text encoders and VAE Encode give."""
    import torch

    g = torch.Generator().manual_seed(seed)
    channels, down = FAMILIES[family]["latent"]
    latent = {"samples": torch.randn(1, channels, px // down, px // down, generator=g)}
    if family == "flux":
        context = torch.randn(1, FLUX_TEXT_TOKENS, 4096, generator=g)
        extra = {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}
    else:
        shapes = TEXT_SHAPES["sdxl"]
        context = torch.randn(*shapes["context"], generator=g)
        extra = {"pooled_output": torch.randn(*shapes["pooled"], generator=g)}
    negative = [[torch.zeros_like(context), {k: (torch.zeros_like(v) if hasattr(v, "shape") else v)
                                             for k, v in extra.items()}]]
    return [[context, extra]], negative, latent


class Clock:
    """Step times from the stage's progress callback (synchronized on CUDA) and the peak memory of the stage."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks, self.t0, self.peak, self.base = cuda, [], None, None, None

    def _sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def started(self, den, e):  # on_start: after the training copy is loaded
        import torch
        self._sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.t0 = time.perf_counter()

    def __call__(self, step, total, loss):  # on_step
        self._sync()
        self.marks.append(time.perf_counter())
        if step == total:
            if self.cuda:
                import torch
                self.peak = torch.cuda.max_memory_allocated()
            else:  # the process's peak RSS so far (not reset per stage): a bound, not the stage's own
                self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def per_step(self, warmup: int):
        times = [b - a for a, b in zip([self.t0, *self.marks], self.marks)]
        return statistics.median(times[warmup:] or times), sum(times)


def run_stage(host, patcher, family, px, stage, steps, cuda, warmup=0, e_opt=None):
    """One stage through the pack's stage runner with the workflow defaults; (result, Clock)."""
    import torch
    from imagic.defaults import DEFAULTS

    target, _, latent = inputs(family, px)
    clock = Clock(cuda)
    common_args = dict(steps=steps, seed=0, adam="fast", gradient_checkpointing=True, on_start=clock.started,
                       on_step=clock)
    with torch.inference_mode():  # the executor runs every node under it; the stage turns it off to train
        if stage == "embedding":
            result = host.optimize_embedding_stage(patcher, target, latent, lr=DEFAULTS["lr_embedding"], **common_args)
        else:
            result = host.finetune_stage(patcher, e_opt or target, latent, lr=DEFAULTS["lr_finetune_lora"],
                                         method="lora", rank=DEFAULTS["rank"], **common_args)
    return result, clock


# imagic.cost's format names for the weight dtypes built here (fp32, the CPU's, counts by weight_bytes).
COST_FORMATS = {"float8_e4m3fn": "fp8", "bfloat16": "bf16", "float16": "fp16", "float32": "bf16"}


def estimate_for(family, px, stage, info):
    """The cost model's estimate for this row (checkpointing on, as both nodes default), or (None, why)."""
    try:
        from imagic import cost
    except ImportError as e:
        return None, f"no imagic.cost ({e})"
    key = FAMILIES[family]["cost_key"]
    kwargs = dict(stage=stage, method="lora", weight_format=COST_FORMATS.get(info["weight_dtype"], "bf16"),
                  weight_bytes=info["weight_bytes"])
    note = None
    try:
        try:
            e = cost.estimate(key, px, px, checkpointing=True, **kwargs)
        except cost.CostError as err:
            if stage != "embedding":
                raise
            # An imagic.cost that knows stage 1 only without checkpointing: compared with that, and said so.
            e = cost.estimate(key, px, px, checkpointing=False, **kwargs)
            note = f"stage 1 estimate without checkpointing ({err})"
    except KeyError:
        return None, f"imagic.cost has no coefficients for {key} yet"
    except Exception as err:  # CostError (a setting it has no estimate for) or an older cost.py
        return None, f"{type(err).__name__}: {err}"
    # The estimate holds a working margin (CUDA context, fragmentation) that max_memory_allocated never sees.
    return dict(memory_bytes=e["memory_bytes"], memory_no_margin_bytes=e["memory_bytes"] - e.get("margin_bytes", 0),
                flops_per_step=e["flops_per_step"], note=note,
                s_per_step=cost.seconds_for(e["flops_per_step"], GPU_CLASS)), None


def compare(row, info):
    est, why = estimate_for(row["family"], row["px"], row["stage"], info)
    if est is None:
        row.update(estimate=None, no_estimate=why)
        return row
    row["estimate"] = est
    row["time_ratio"] = row["s_per_step"] / est["s_per_step"] if est["s_per_step"] else None
    row["memory_ratio"] = row["peak_bytes"] / est["memory_bytes"] if row.get("peak_bytes") and est["memory_bytes"] else None
    row["memory_ratio_no_margin"] = (row["peak_bytes"] / est["memory_no_margin_bytes"]
                                     if row.get("peak_bytes") and est["memory_no_margin_bytes"] else None)
    return row


def stages(host, patcher, info, family, args, cuda, sizes=None, blocks=None):
    rows = []
    for px in sizes or args.sizes:
        e_opt = None
        for stage in ("embedding", "finetune"):
            result, clock = run_stage(host, patcher, family, px, stage, args.warmup + args.steps, cuda, args.warmup,
                                      e_opt)
            if stage == "embedding":
                e_opt = result[0]
            s, total = clock.per_step(args.warmup)
            row = dict(family=family, px=px, stage=stage, steps=args.steps, warmup=args.warmup, s_per_step=s,
                       total_s=total, peak_bytes=clock.peak, weight_bytes=info["weight_bytes"], blocks=blocks,
                       peak_kind="cuda max_memory_allocated" if cuda else "process peak RSS")
            if blocks is None:
                compare(row, info)
            else:  # no public per-block estimate: the block rows are checked against the full model instead
                row.update(estimate=None, no_estimate="block row: see the block table")
            rows.append(row)
            print(line(row), flush=True)
    return rows


def e2e(host, patcher, info, family, args, cuda):
    """One edit: stage 1, stage 2, then each eta through the host's KSampler on the patched MODEL."""
    import importlib

    import torch
    import nodes as host_nodes

    px = args.sizes[0]
    fam = FAMILIES[family]
    conditioning_mod = importlib.import_module(host.__name__.rsplit(".", 1)[0] + ".nodes_conditioning")
    target, negative, latent = inputs(family, px)
    out = dict(family=family, px=px, embedding_steps=args.embedding_steps, finetune_steps=args.finetune_steps,
               etas=args.etas, sample_steps=args.sample_steps or fam["sample_steps"], cfg=fam["cfg"],
               sampler=fam["sampler"], scheduler=fam["scheduler"])
    t0 = time.perf_counter()
    (e_opt, _), c1 = run_stage(host, patcher, family, px, "embedding", args.embedding_steps, cuda)
    t1 = time.perf_counter()
    (patched, _, _), c2 = run_stage(host, patcher, family, px, "finetune", args.finetune_steps, cuda, e_opt=e_opt)
    t2 = time.perf_counter()
    empty = {"samples": torch.zeros_like(latent["samples"])}
    sample_s = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for eta in args.etas:
            ts = time.perf_counter()
            cond = conditioning_mod.interpolate_conditioning(target, e_opt, eta)
            (img,) = host_nodes.common_ksampler(patched, 0, out["sample_steps"], fam["cfg"], fam["sampler"],
                                                fam["scheduler"], cond, negative, empty, denoise=1.0)
            if cuda:
                torch.cuda.synchronize()
            if not torch.isfinite(img["samples"]).all():
                out.setdefault("non_finite_etas", []).append(eta)
            sample_s.append(time.perf_counter() - ts)
    t3 = time.perf_counter()
    out.update(embedding_s=t1 - t0, finetune_s=t2 - t1, sampling_s=t3 - t2, total_s=t3 - t0,
               sample_s_per_eta=sample_s, embedding_s_per_step=c1.per_step(1)[0], finetune_s_per_step=c2.per_step(1)[0],
               peak_bytes=max(c1.peak or 0, c2.peak or 0),
               sampling_peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)
    # Computed, not run: the same s/step at imagic/defaults.py's 500 + 500 steps and 6 etas.
    from imagic.defaults import DEFAULTS, ETA_SWEEP
    per_eta = statistics.median(sample_s) * (fam["sample_steps"] / out["sample_steps"])
    out["computed_default_edit_s"] = (DEFAULTS["embedding_steps"] * out["embedding_s_per_step"]
                                      + DEFAULTS["finetune_steps"] * out["finetune_s_per_step"]
                                      + len(ETA_SWEEP) * per_eta)
    try:
        from imagic import cost
        ee = cost.edit_estimate(fam["cost_key"], px, px, args.embedding_steps, args.finetune_steps,
                                weight_format=COST_FORMATS.get(info["weight_dtype"], "bf16"),
                                weight_bytes=info["weight_bytes"])
        out["estimated_training_s"] = ee["seconds"][GPU_CLASS]
        out["training_time_ratio"] = (out["embedding_s"] + out["finetune_s"]) / out["estimated_training_s"]
    except KeyError:
        out["no_estimate"] = f"imagic.cost has no coefficients for {fam['cost_key']} yet"
    except Exception as e:  # CostError, or an older cost.py
        out["no_estimate"] = f"{type(e).__name__}: {e}"
    print(f"e2e {family} {px}px: {args.embedding_steps}+{args.finetune_steps} steps, {len(args.etas)} etas: "
          f"{out['total_s']:.1f} s (stage 1 {out['embedding_s']:.1f}, stage 2 {out['finetune_s']:.1f}, "
          f"sampling {out['sampling_s']:.1f}); computed default edit {out['computed_default_edit_s']:.0f} s; "
          + (f"measured/estimated training time {out['training_time_ratio']:.2f}" if "training_time_ratio" in out
             else f"no estimate ({out.get('no_estimate')})"), flush=True)
    return out


# The block-cost rows (issue #20 item 1 counts Flux's stacks at depth 1 and one block of each kind more, at full
# width): the same three networks, timed. Per stage, one double (single) block = (2+1) - (1+1) ((1+2) - (1+1)).
BLOCK_VARIANTS = {"1+1": dict(depth=1, depth_single_blocks=1), "2+1": dict(depth=2, depth_single_blocks=1),
                  "1+2": dict(depth=1, depth_single_blocks=2)}


def block_rows(host, args, cuda):
    rows = []
    for name, depths in BLOCK_VARIANTS.items():
        patcher, info = build("flux", args.tiny, depths)
        print(f"flux blocks {name}: {info['params'] / 1e9:.3f} B parameters", flush=True)
        rows += stages(host, patcher, info, "flux", args, cuda, sizes=args.sizes[:1], blocks=name)
        del patcher
        release()
    return rows


def block_table(rows, full_rows, tiny):
    """Per stage: one double and one single block's s/step and peak, and the full model put together from them
    (1+1 plus 18 double and 37 single blocks more) against the full model as measured."""
    config = FLUX_DEV_TINY if tiny else FLUX_DEV
    out = []
    for stage in ("embedding", "finetune"):
        by = {r["blocks"]: r for r in rows if r["stage"] == stage}
        if set(by) != set(BLOCK_VARIANTS):
            continue
        t = {k: r["s_per_step"] for k, r in by.items()}
        double, single = t["2+1"] - t["1+1"], t["1+2"] - t["1+1"]
        built = t["1+1"] + (config["depth"] - 1) * double + (config["depth_single_blocks"] - 1) * single
        full = next((r for r in full_rows if r["stage"] == stage and r["px"] == by["1+1"]["px"]), None)
        peak = {k: r["peak_bytes"] for k, r in by.items()}
        out.append(dict(stage=stage, px=by["1+1"]["px"], one_plus_one_s=t["1+1"], double_block_s=double,
                        single_block_s=single, full_from_blocks_s=built,
                        full_measured_s=full["s_per_step"] if full else None,
                        measured_over_blocks=full["s_per_step"] / built if full and built > 0 else None,
                        double_block_peak_bytes=(peak["2+1"] or 0) - (peak["1+1"] or 0),
                        single_block_peak_bytes=(peak["1+2"] or 0) - (peak["1+1"] or 0)))
        b = out[-1]
        print(f"flux blocks {stage} {b['px']}px: 1+1 {t['1+1']:.3f} s/step, +1 double {double:.4f}, +1 single "
              f"{single:.4f}; full from blocks {built:.3f} s/step, measured "
              + (f"{b['full_measured_s']:.3f} (x{b['measured_over_blocks']:.2f})" if full else "-"), flush=True)
    return out


def release():
    import gc

    import comfy.model_management as mm
    gc.collect()
    mm.unload_all_models()
    mm.soft_empty_cache()


def gb(b):
    return f"{b / GB:.2f}" if b else "-"


def line(row):
    head = (f"{row['family']}{' blocks ' + row['blocks'] if row.get('blocks') else ''} {row['px']}px {row['stage']}: {row['s_per_step']:.3f} s/step, peak {gb(row['peak_bytes'])} GB "
            f"({row['peak_kind']})")
    if row["estimate"] is None:
        return head + f"; no estimate ({row['no_estimate']})"
    est = row["estimate"]
    return head + (f"; estimate {est['s_per_step']:.3f} s/step at {GPU_CLASS}, {gb(est['memory_bytes'])} GB: "
                   f"measured/estimated time {row['time_ratio']:.2f}, memory "
                   + (f"{row['memory_ratio']:.2f}" if row.get("memory_ratio") else "-"))


def markdown(report) -> str:
    s = report["settings"]
    out = [f"# Default edit on {report['machine'].get('gpu') or report['machine'].get('cpu', 'CPU')} "
           f"({'tiny configs: a dry run, numbers say nothing about the real models' if s['tiny'] else 'real sizes'})",
           "", f"Host {report['host']}, torch {report['machine'].get('torch')}, device {s['device']}; "
           f"{s['warmup']} warm-up + {s['steps']} measured steps per stage; defaults: LoRA rank 4, checkpointing on, "
           f"fast Adam. Estimates: imagic.cost at the {GPU_CLASS} class; peak: "
           f"{'torch.cuda.max_memory_allocated from after the training load' if s['device'] == 'cuda' else 'the process peak RSS so far (CPU)'}.", "",
           "| model | weights | px | stage | s/step | peak GB | est. s/step | est. GB | time meas/est | memory meas/est "
           "| memory meas/est without the margin |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["stages"]:
        m = report["models"][r["family"]]
        est = r["estimate"]
        out.append(f"| {r['family']} | {m['weight_dtype']} ({m.get('manual_cast_dtype') or m['weight_dtype']} compute) | {r['px']} | "
                   f"{r['stage']} | {r['s_per_step']:.3f} | {gb(r['peak_bytes'])} | "
                   + (f"{est['s_per_step']:.3f} | {gb(est['memory_bytes'])} | {r['time_ratio']:.2f} | "
                      + (f"{r['memory_ratio']:.2f} | {r['memory_ratio_no_margin']:.2f} |" if r.get("memory_ratio")
                         else "- | - |") if est else "no estimate | | | | |"))
    notes = sorted({r["no_estimate"] for r in report["stages"] if r.get("estimate") is None}
                   | {r["estimate"]["note"] for r in report["stages"] if r.get("estimate") and r["estimate"]["note"]})
    if notes:
        out += ["", "Estimates: " + "; ".join(notes)]
    out += ["", "| edit | px | stage 1 | stage 2 | sampling | total s | computed default edit s | est. training s |",
            "|---|---:|---|---|---|---:|---:|---:|"]
    for e in report["e2e"]:
        out.append(f"| {e['family']} | {e['px']} | {e['embedding_steps']} steps, {e['embedding_s']:.1f} s | "
                   f"{e['finetune_steps']} steps, {e['finetune_s']:.1f} s | {len(e['etas'])} etas x {e['sample_steps']} "
                   f"steps ({e['sampler']}/{e['scheduler']}, cfg {e['cfg']:g}), {e['sampling_s']:.1f} s | "
                   f"{e['total_s']:.1f} | {e['computed_default_edit_s']:.0f} | "
                   + (f"{e['estimated_training_s']:.1f} (meas/est {e['training_time_ratio']:.2f})" if
                      "estimated_training_s" in e else "no estimate") + " |")
    if report.get("blocks"):
        out += ["", "Flux.1 block costs at full width (double + single blocks; the full model from them is 1+1 plus "
                "the other blocks at the per-block cost):", "",
                "| stage | px | 1+1 s/step | +1 double s | +1 single s | full from blocks s | full measured s | "
                "measured / from blocks | +1 double peak GB | +1 single peak GB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b in report["blocks"]:
            out.append(f"| {b['stage']} | {b['px']} | {b['one_plus_one_s']:.3f} | {b['double_block_s']:.4f} | "
                       f"{b['single_block_s']:.4f} | {b['full_from_blocks_s']:.3f} | "
                       + (f"{b['full_measured_s']:.3f} | {b['measured_over_blocks']:.2f}" if b["full_measured_s"]
                          else "- | -") + f" | {b['double_block_peak_bytes'] / GB:.2f} | {b['single_block_peak_bytes'] / GB:.2f} |")
    out += ["", "The computed default edit is not a run: the measured s/step at imagic/defaults.py's 500 + 500 steps "
            "plus 6 etas at the workflow's sampling steps."]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same families (the CPU dry run)")
    p.add_argument("--models", default="flux,sdxl", help="comma-separated: flux, sdxl")
    p.add_argument("--sizes", default="1024,512", help="comma-separated pixel sizes (square); the first one is the e2e's")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    from imagic.defaults import DEFAULTS
    p.add_argument("--embedding-steps", type=int, default=DEFAULTS["embedding_steps"])
    p.add_argument("--finetune-steps", type=int, default=DEFAULTS["finetune_steps"])
    p.add_argument("--etas", default="0.7,0.9,1.0")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps per eta (default: the workflow's)")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--blocks", action="store_true",
                   help="also time Flux at full width with 1+1, 2+1 and 1+2 blocks (the cost model's block counts)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in FAMILIES]
    if bad:
        p.error(f"--models: unknown {bad}; use {', '.join(FAMILIES)}")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if any(s % 16 for s in args.sizes):
        p.error("--sizes: each size must be a multiple of 16 (8x latent, 2x2 Flux patches)")
    args.etas = [float(e) for e in args.etas.split(",")]
    if comfyui_root() is None:
        p.error("set COMFYUI_PATH to a ComfyUI 0.33 tree")
    cuda = args.device == "cuda"
    import torch
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device (use --device cpu --tiny for the dry run)")
    if not cuda:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    t_start = time.perf_counter()
    host = import_host(cuda)
    report = dict(settings=dict(vars(args)), machine=machine_info(args.device, "host"),
                  host=host_version(comfyui_root()), models={}, stages=[], e2e=[])
    if args.blocks and "flux" in args.models:
        report["block_rows"] = block_rows(host, args, cuda)
    for family in args.models:
        t = time.perf_counter()
        patcher, info = build(family, args.tiny)
        info["build_s"] = time.perf_counter() - t
        report["models"][family] = info
        print(f"{family}: {info['params'] / 1e9:.3f} B parameters, {info['weight_dtype']} "
              f"({gb(info['weight_bytes'])} GB), built in {info['build_s']:.1f} s", flush=True)
        report["stages"] += stages(host, patcher, info, family, args, cuda)
        if not args.no_e2e:
            report["e2e"].append(e2e(host, patcher, info, family, args, cuda))
        del patcher
        release()
    if report.get("block_rows"):
        report["blocks"] = block_table(report["block_rows"], [r for r in report["stages"] if r["family"] == "flux"],
                                       args.tiny)
    report["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_edit" + ("_tiny_" + args.device if args.tiny else "")
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown(report))
    print(f"wrote {out / name}.json and .md ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
