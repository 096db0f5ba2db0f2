"""Stage 3 against the peer: one ``ImagicPipeline.sample`` call beside the diffusers community
pipeline's sampling call (``ImagicStableDiffusionPipeline.__call__``), on the same UNet object.

The model is SD1.5 with seeded random weights (the real UNet, text encoder and VAE configs;
``speed/builders.py``), in one process, so both sides share every weight and every cache. The peer
fine-tunes the UNet in place and then samples the plain UNet; the project samples the untouched
base with the trained delta applied (LoRA or the full difference), so what is compared is what
applying the delta costs, per call and per step. Calls alternate (peer first in even rounds, the
project first in odd ones), and the ratios are per round, so a slow spell of the shared machine
hits both sides of a round.

    OMP_NUM_THREADS=1 python benchmarks/sampling_vs_peer.py --label after \
        --out benchmarks/results/sampling_vs_peer_cpu

``--label`` names this run inside the result files: a run with another label is kept beside it
(the committed file holds the code before and after a change, measured the same way).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import common
from common import machine_info, require

require("torch", "diffusers", "transformers", "safetensors")

from speed.builders import build_sd15_parts, build_unet
from speed.configs import SCHEDULER
from speed.measure import maxrss_gb, reset_peak_rss, rss_gb

ETA = 0.7  # the peer's alpha: e = alpha e_tgt + (1 - alpha) e_opt, the project's eta
GUIDANCE = 7.5


def peer_sample(unet, text_encoder, tokenizer, vae, scheduler, e_tgt, e_opt, alpha, height, width,
                num_inference_steps, generator, guidance_scale=GUIDANCE, eta=0.0):
    """The community pipeline's ``__call__`` (examples/community/imagic_stable_diffusion.py), line for
    line, with what it takes from ``self`` as arguments; no progress bar and no safety checker."""
    import inspect

    import torch
    from PIL import Image

    device = unet.device
    with torch.no_grad():
        text_embeddings = alpha * e_tgt + (1 - alpha) * e_opt
        do_classifier_free_guidance = guidance_scale > 1.0
        if do_classifier_free_guidance:
            uncond_input = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt")
            uncond_embeddings = text_encoder(uncond_input.input_ids.to(device))[0]
            seq_len = uncond_embeddings.shape[1]
            uncond_embeddings = uncond_embeddings.view(1, seq_len, -1)
            text_embeddings = torch.cat([uncond_embeddings, text_embeddings])
        latents_shape = (1, unet.config.in_channels, height // 8, width // 8)
        latents = torch.randn(latents_shape, generator=generator, device=device, dtype=text_embeddings.dtype)
        scheduler.set_timesteps(num_inference_steps)
        timesteps_tensor = scheduler.timesteps.to(device)
        latents = latents * scheduler.init_noise_sigma
        accepts_eta = "eta" in set(inspect.signature(scheduler.step).parameters.keys())
        extra_step_kwargs = {"eta": eta} if accepts_eta else {}
        for t in timesteps_tensor:
            latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
            if do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample
        latents = 1 / 0.18215 * latents
        image = vae.decode(latents).sample
        image = (image / 2 + 0.5).clamp(0, 1)
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (image * 255).round().astype("uint8")]  # numpy_to_pil


def measured(fn):
    """Wall time, process CPU time (less sensitive to other jobs on a shared machine) and peak RSS of one
    call (the kernel's peak counter reset just before it)."""
    reset_peak_rss()
    before = rss_gb()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = maxrss_gb()
    return out, dict(s=round(seconds, 3), cpu_s=round(cpu, 3), peak_gb=round(peak, 3),
                     peak_increment_gb=round(peak - before, 3))


def trained_delta(method, unet, seed=0):
    """A delta as ``ImagicPipeline.train`` hands it back, with small random values in place of training:
    LoRA's factors; full: the trained weights W' bound to the UNet (``finetune(keep_trained_weights=True)``);
    full_saved: the differences W' - W, as a result read back from a file holds them (bound to the UNet at
    the first call, ``FullDelta.bind``); full_saved_first: the same, made the differences again before every
    call (untimed), so each call is the first after reading the file and pays the binding."""
    import torch
    from imagic.deltas import make_delta

    delta = make_delta("lora" if method == "lora" else "full", unet, rank=4, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for t in (delta.up if method == "lora" else delta.tensors):
            t.add_(torch.randn(t.shape, generator=g), alpha=1e-3)  # LoRA: up starts at zero; full: W' = W + noise
    if method.startswith("full_saved"):
        delta.finish()
    return delta.requires_grad_(False)


def image_diff(a, b) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def run(args) -> dict:
    import torch
    from diffusers import DDIMScheduler
    from imagic import ImagicPipeline, ImagicResult

    torch.set_num_threads(args.threads)
    size = args.size
    t_build = time.perf_counter()
    unet = build_unet("sd15", "cpu", tiny=args.tiny)
    with tempfile.TemporaryDirectory() as tok_dir:
        text_encoder, tokenizer, vae = build_sd15_parts(Path(tok_dir), tiny=args.tiny)
    pipe = ImagicPipeline(unet, text_encoder, tokenizer, DDIMScheduler(**SCHEDULER), vae=vae)
    peer_scheduler = DDIMScheduler(**SCHEDULER)  # the peer's own (it calls set_timesteps on it every call)
    e_tgt = pipe.encode_text("a photo of a sitting dog")
    g = torch.Generator().manual_seed(3)
    e_opt = {"context": e_tgt["context"] + 0.05 * torch.randn(e_tgt["context"].shape, generator=g)}
    settings = dict(width=size, height=size)
    build_s = time.perf_counter() - t_build

    def project(result, steps):
        return pipe.sample(result, etas=[ETA], seed=0, steps=steps, guidance=GUIDANCE)

    def peer(steps):
        return peer_sample(unet, text_encoder, tokenizer, vae, peer_scheduler, e_tgt["context"], e_opt["context"],
                           ETA, size, size, steps, torch.Generator().manual_seed(0))

    out = dict(build_s=round(build_s, 1), size=size, eta=ETA, guidance=GUIDANCE, rounds=args.rounds,
               rounds_long=args.rounds_long, methods={})
    # Faithfulness of the replica: with the same weights (no delta) both make the same image.
    plain = ImagicResult(e_tgt=e_tgt, e_opt=e_opt, delta=None, settings=settings)
    steps0 = args.steps[0]
    out["same_weights_max_pixel_diff"] = image_diff(project(plain, steps0)[0], peer(steps0)[0])
    print(f"same weights, {steps0} steps: images differ by at most {out['same_weights_max_pixel_diff']} levels",
          flush=True)
    for method in args.methods:
        delta = trained_delta(method, unet)
        result = ImagicResult(e_tgt=e_tgt, e_opt=e_opt, delta=delta, settings=dict(settings, method=method.split("_")[0]))
        rows = {}
        for steps in args.steps:
            rounds = []
            for r in range(args.rounds if steps == args.steps[0] else args.rounds_long):
                order = ("peer", "project") if r % 2 == 0 else ("project", "peer")
                calls = {}
                for who in order:
                    if who == "project" and method == "full_saved_first":
                        delta.finish()  # (untimed) back to the differences a file holds
                    _, calls[who] = measured(partial(peer, steps) if who == "peer" else partial(project, result, steps))
                calls["ratio"] = round(calls["project"]["s"] / calls["peer"]["s"], 4)
                calls["cpu_ratio"] = round(calls["project"]["cpu_s"] / calls["peer"]["cpu_s"], 4)
                rounds.append(calls)
                print(f"{method} {steps} steps round {r + 1}: peer {calls['peer']['s']:.2f} s, project "
                      f"{calls['project']['s']:.2f} s, ratio {calls['ratio']:.3f} (CPU time {calls['cpu_ratio']:.3f}); peak +GB peer "
                      f"{calls['peer']['peak_increment_gb']:.2f}, project {calls['project']['peak_increment_gb']:.2f}",
                      flush=True)
            ratios, cpu_ratios = [c["ratio"] for c in rounds], [c["cpu_ratio"] for c in rounds]
            rows[str(steps)] = dict(rounds=rounds, ratio_median=statistics.median(ratios), ratio_min=min(ratios),
                                    ratio_max=max(ratios), cpu_ratio_median=statistics.median(cpu_ratios),
                                    cpu_ratio_min=min(cpu_ratios), cpu_ratio_max=max(cpu_ratios),
                                    peer_s_median=statistics.median(c["peer"]["s"] for c in rounds),
                                    project_s_median=statistics.median(c["project"]["s"] for c in rounds),
                                    peer_peak_gb=max(c["peer"]["peak_gb"] for c in rounds),
                                    project_peak_gb=max(c["project"]["peak_gb"] for c in rounds))
        out["methods"][method] = rows
        result.delta = delta = None  # the full difference: free it before the next method's delta
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(common.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_split(rows: dict, steps) -> tuple:
    """(per step, per call) process CPU seconds of the peer and of the project, from the medians of the
    first two call lengths."""
    a, b = steps[:2]
    out = []
    for who in ("peer", "project"):
        ta, tb = (statistics.median(c[who]["cpu_s"] for c in rows[str(n)]["rounds"]) for n in (a, b))
        per_step = (tb - ta) / (b - a)
        out.append((per_step, ta - a * per_step))
    return tuple(out)


def markdown(report: dict) -> str:
    lines = ["### Sampling against the peer (diffusers community pipeline), SD1.5, one process", "",
             "One `ImagicPipeline.sample` call (one eta, DDIM, guidance 7.5, VAE decode included) against the "
             "community pipeline's `__call__` replicated line for line (`peer_sample`), on the same UNet object "
             "(SD1.5 with seeded random weights), text encoder and VAE. The peer samples the plain UNet (its "
             "fine-tune is written into the weights); the project applies the trained delta to the untouched "
             "base (full: the trained weights W' as `train()` hands them back, read by each layer in place of its "
             "weight; full_saved: the differences W' - W of a result read back from a file: added for each call up to "
             "commit 0a6042c, bound to the UNet at the first call since (`FullDelta.bind`); full_saved_first: the same, "
             "every call the first after reading the file). Calls alternate within each round; ratio = project time / peer time in that round. "
             "Peak GB: the process's peak RSS during the call (the full difference held by the result "
             "included, on both sides); +GB: that peak minus the RSS before the call. The CPU-time ratio uses the process CPU time of the same calls: "
             "other jobs on a shared machine slow the wall clock of both sides, the CPU time less.", ""]
    for label, run_ in report["runs"].items():
        m = run_["machine"]
        lines += [f"#### {label} (commit {run_['commit']})", "",
                  f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), torch {m['torch']}, "
                  f"diffusers {m['diffusers']}, {m['date']}, load average at start "
                  f"{m.get('loadavg_start', ['?'])[0]:.2f}; {run_['size']} px, {run_['rounds']} rounds of the "
                  f"short call, {run_.get('rounds_long', run_['rounds'])} of the long one. "
                  f"With the same weights (no delta) the two images differ by at most "
                  f"{run_['same_weights_max_pixel_diff']} of 255 levels.", "",
                  "| method | steps | peer s (median) | project s (median) | ratio median | ratio min-max | "
                  "CPU-time ratio median | min-max | peer peak GB | project peak GB | peer +GB | project +GB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method, rows in run_["methods"].items():
            for steps, row in rows.items():
                if not isinstance(row, dict):  # (per-step figures of older runs)
                    continue
                inc = {w: max(c[w]["peak_increment_gb"] for c in row["rounds"]) for w in ("peer", "project")}
                lines.append(f"| {method} | {steps} | {row['peer_s_median']:.2f} | {row['project_s_median']:.2f} | "
                             f"**{row['ratio_median']:.3f}** | {row['ratio_min']:.3f}-{row['ratio_max']:.3f} | "
                             f"**{row['cpu_ratio_median']:.3f}** | {row['cpu_ratio_min']:.3f}-{row['cpu_ratio_max']:.3f} | "
                             f"{row['peer_peak_gb']:.2f} | {row['project_peak_gb']:.2f} | {inc['peer']:.2f} | "
                             f"{inc['project']:.2f} |")
        split = [(meth, cpu_split(rows, run_["steps"])) for meth, rows in run_["methods"].items()
                 if len(run_["steps"]) >= 2]
        if split:
            a, b = run_["steps"][:2]
            lines += ["", f"Per step and per call, from the median process CPU time of the {a}- and {b}-step calls "
                      "(CPU time: the wall clock of this shared machine varied more between calls than the "
                      "difference measured):", "",
                      "| method | peer CPU s/step | project CPU s/step | peer CPU s/call beside the steps | "
                      "project CPU s/call beside the steps |", "|---|---:|---:|---:|---:|"]
            for meth, (peer, project) in split:
                lines.append(f"| {meth} | {peer[0]:.2f} | {project[0]:.2f} | {peer[1]:.2f} | {project[1]:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="run", help="name of this run in the result files (e.g. before, after)")
    p.add_argument("--out", default=None, help="result path without extension (.json and .md are written)")
    p.add_argument("--methods", default="lora,full,full_saved", type=lambda s: [m for m in s.split(",") if m],
                   help="lora; full (the trained weights, as train() hands them back); full_saved (the "
                        "differences, as a result read back from a file holds them); full_saved_first (the same, "
                        "every call the first after reading the file)")
    p.add_argument("--steps", default="2,10", type=lambda s: [int(x) for x in s.split(",") if x],
                   help="sampling steps of each call length (two lengths separate per-call from per-step cost)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the first (short) call length")
    p.add_argument("--rounds-long", type=int, default=None,
                   help="rounds of the other call lengths (default: --rounds; fewer where a long call takes minutes)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="tiny models, for testing the script only")
    p.add_argument("--commit", default=None, help="the commit of the code measured, where the script runs from "
                   "an exported copy of it (default: this checkout's HEAD)")
    p.add_argument("--rewrite-md", action="store_true", help="only write the .md again from the .json at --out")
    args = p.parse_args(argv)
    if args.rewrite_md:
        if not args.out:
            p.error("--rewrite-md needs --out")
        out = Path(args.out)
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())) + "\n")
        return None
    bad = [m for m in args.methods if m not in ("lora", "full", "full_saved", "full_saved_first")]
    if bad:
        p.error(f"--methods: unknown {bad}; use lora, full, full_saved and/or full_saved_first")
    if args.rounds_long is None:
        args.rounds_long = args.rounds
    if not args.steps or min(args.steps) < 1 or args.rounds < 1 or args.rounds_long < 1:
        p.error("--steps needs positive step counts and --rounds / --rounds-long at least 1")
    if os.environ.get("OMP_NUM_THREADS") is None:
        print("note: OMP_NUM_THREADS is not set; torch uses --threads", file=sys.stderr)
    machine = machine_info("cpu")  # (at the start: the load average before the run)
    res = run(args)
    res.update(commit=args.commit or git_commit(), machine=machine, tiny=args.tiny, steps=args.steps)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        path = out.with_suffix(".json")
        report = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
        report["runs"][args.label] = res
        path.write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(report) + "\n")
        print(f"wrote {path} and {out.with_suffix('.md')}")
    else:
        print(markdown({"runs": {args.label: res}}))
    return res


if __name__ == "__main__":
    main()
