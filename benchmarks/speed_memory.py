"""Speed and memory of the two Imagic training stages on the real SD1.5 / SDXL UNet architectures.

The UNet is built from its published config with seeded random weights (nothing is downloaded),
and the stages run through the project's own code, so what is timed is what users run. Two
backends: ``diffusers`` (``imagic.optimize_embedding``, ``imagic.finetune`` and
``DiffusersDenoiser``, the standalone path) and ``host`` (a ComfyUI host's own model classes and
ModelPatcher, trained through the nodes' ``ComfyDenoiser``). ``--backend auto`` (the default)
picks the host when ``COMFYUI_PATH`` points to a ComfyUI folder. Every configuration runs in a
fresh subprocess, for clean peak-memory numbers.

    python benchmarks/speed_memory.py --model sd15 --latent 32 --warmup 2 --steps 3 \
        --out benchmarks/results/speed_memory_cpu_sd15

See benchmarks/README.md for what each configuration is and what the memory columns mean.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import common  # the repository on sys.path; the install check
from common import comfyui_root, machine_info
from speed.configs import (BASE, FULL_METHOD, HOST_MODEL_CLASS, MERGED, SAMPLE_ROWS, SCHEDULER, UNET_CONFIGS,
                           configurations, param_count, project_defaults, unet_config)
from speed.estimates import estimate_gb
from speed.measure import GB, StageMeter, mem_available_gb, run_child
from speed.report import add_ratios, fmt, merge, write


def worker(args) -> dict:
    """One row, in this (child) process: build, run one stage, measure."""
    import torch

    cfg = json.loads(args.cfg)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meter = StageMeter(args.device == "cuda")
    if args.backend == "host":
        from speed.host_worker import host_stage as run_stage
    else:
        from speed.diffusers_worker import diffusers_stage as run_stage
    info, losses = run_stage(args, cfg, meter)
    return dict(info, **meter.result(args.warmup, losses))


def plan_rows(args, cuda: bool, bf16_ok: bool, cap: float):
    stages = [s for s in args.stages.split(",") if s]
    host = args.backend == "host"
    confs = configurations(cuda, bf16_ok, args.stage2_base, args.backend)
    full_impl = args.full_impl
    if host:
        full_impl = "core"  # what the Fine-tune UNet node runs for method "full"
    elif full_impl == "auto":
        fits = cuda or estimate_gb(args.model, args.latent, "finetune", dict(BASE, method="full"),
                                   tiny=args.tiny) <= cap
        full_impl = "core" if fits else "inplace"
    plan = []
    for stage in [st for st in stages if st != "sample"]:
        for name, cfg in confs:
            if stage == "embedding":
                if name in ("lora", "full fine-tune", MERGED):
                    continue  # stage 1 never trains the UNet: the same computation as the baseline row
                cfg = dict(cfg, method="-", full_impl="-")
                if host and name == "project defaults":
                    cfg["ckpt"] = False  # the Optimize Embedding node has no checkpointing
                elif host and cfg["ckpt"]:
                    continue  # ... so a checkpointed stage 1 is not something a node runs
            else:
                cfg = dict(cfg, full_impl=full_impl if cfg["method"] == "full" else "-")
                if host and name == "baseline":
                    # The nodes' full fine-tune; ratios are to the paper baseline (diffusers, in place).
                    name = FULL_METHOD
            plan.append((name, stage, cfg))
        if stage == "finetune" and full_impl == "inplace" and not host:
            # What users of method="full" run (the core's FullDelta), beside the in-place baseline.
            plan.append((FULL_METHOD, stage, dict(BASE, full_impl="core")))

    if "sample" in stages and not host:
        pd = project_defaults(cuda, bf16_ok)
        for name, method, impl in SAMPLE_ROWS:
            plan.append((name, "sample", dict(pd, method=method, sample_impl=impl, full_impl="-")))
    if args.only:
        wanted = {n.strip() for n in args.only.split(";")}
        plan = [p for p in plan if p[0] in wanted]
    if args.exclude:
        unwanted = {n.strip() for n in args.exclude.split(";")}
        plan = [p for p in plan if p[0] not in unwanted]
    return plan, full_impl


def memory_check(args, stage, cfg, cap, cuda):
    """(estimated peak GB or None on CUDA, the RSS at which the watchdog kills the worker, and why
    the row is skipped, or None when it runs)."""
    est = None if cuda else estimate_gb(args.model, args.latent, stage, cfg, args.backend, args.tiny)
    avail = mem_available_gb()
    limit = cap if cuda else min(cap, avail - 1.0)
    if est is not None and est > cap * 1.1:
        return est, limit, f"needs about {est:.0f} GB (estimate), over the {cap:g} GB cap"
    if est is not None and est > limit * 1.1:
        return est, limit, f"needs about {est:.0f} GB (estimate), {avail:.1f} GB free now"
    return est, limit, None


def run_row(args, name, stage, cfg, cap, cuda):
    row = dict(name=name, stage=stage, backend=args.backend, cfg=cfg)
    est, limit, skip = memory_check(args, stage, cfg, cap, cuda)
    row["estimate_gb"] = est
    if skip:
        row.update(status="skipped", reason=skip)
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", args.model,
                "--latent", str(args.latent), "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--device", args.device, "--stage", stage, "--cfg", json.dumps(cfg), "--backend", args.backend]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        if args.tiny:
            argv += ["--tiny"]
        timeout = args.compile_timeout if cfg["compile"] else args.timeout
        t = time.time()
        rc, res, state, err = run_child(argv, limit, timeout, cuda)
        row["wall_s"] = round(time.time() - t, 1)
        try:
            row["loadavg_after"] = os.getloadavg()[0]
        except OSError:
            pass
        if res is not None and rc == 0:
            row.update(status="ok", **res)
        else:
            tail = " ".join(err.strip().splitlines()[-1:])[:300] if err else ""
            row.update(status="failed", reason=state["killed"] or f"exit {rc}: {tail}",
                       max_rss_seen_gb=round(state["max_rss"], 2))
    if row["status"] == "ok" and cfg.get("compile"):
        row["note"] = f"compile + first step {row['first_step_s']:.0f} s"
    print(f"[{row['status']}] {name} / {stage}: {fmt(row.get('ms_per_step'))} ms/step "
          f"(CPU {fmt(row.get('cpu_ms_per_step'))}), peak {fmt(row.get('peak_gb'), 2)} GB "
          f"(est {fmt(est, 1)}) {row.get('reason', '')}", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(UNET_CONFIGS), default="sd15")
    ap.add_argument("--backend", choices=("auto", "diffusers", "host"), default="auto",
                    help="diffusers (the standalone path), or host: the ComfyUI at COMFYUI_PATH, trained through "
                         "the nodes' code (run with the Python environment ComfyUI runs in); auto: host when "
                         "COMFYUI_PATH points to a ComfyUI folder, else diffusers")
    ap.add_argument("--tiny", action="store_true",
                    help="for testing the script only: a much smaller UNet of the same family, so that a run takes "
                         "seconds; its numbers say nothing about the real models")
    ap.add_argument("--dry-run", action="store_true",
                    help="list the planned rows with their memory estimates (CPU) and whether they would be "
                         "skipped; run nothing")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px, 64 = 512 px, 128 = 1024 px)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps before them")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--stages", default="embedding,finetune",
                    help="comma-separated: embedding, finetune, sample (diffusers: one DDIM step with CFG)")
    ap.add_argument("--only", default=None, help="configuration names to run, separated by ';' (default: all)")
    ap.add_argument("--exclude", default=None, help="configuration names not to run, separated by ';'")
    ap.add_argument("--stage2-base", choices=("full", "lora"), default="full",
                    help="what the baseline family fine-tunes in stage 2 (the paper: full)")
    ap.add_argument("--full-impl", choices=("auto", "core", "inplace"), default="auto",
                    help="full fine-tune through the core's FullDelta, or in place as the community pipeline "
                         "does; auto: the core when its baseline fits the memory cap, else in place (plus the "
                         "core rows, skipped when they cannot fit)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads per worker (default: torch's own choice, all cores); with 1 the "
                         "CPU time per step is the work itself, without the waiting of a busy machine")
    ap.add_argument("--max-gb", type=float, default=20.0, help="never let a worker's RSS pass this (CPU)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    ap.add_argument("--compile-timeout", type=float, default=3600.0)
    ap.add_argument("--e2e", action="store_true", help="time the default edit end to end (automatic on CUDA)")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--e2e-steps", type=int, nargs=2, default=None, help="override stage 1/2 steps (testing)")
    ap.add_argument("--e2e-sample-steps", type=int, default=None, help="override the 50 DDIM steps (testing)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine result files (later rows replace earlier ones) into --out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-e2e", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.merge:
        merge(args.merge, args.out)
        return 0

    if args.backend == "auto":
        args.backend = "host" if comfyui_root() is not None else "diffusers"
        if not args.worker and os.environ.get("COMFYUI_PATH", "").strip() and args.backend == "diffusers":
            print(f"note: COMFYUI_PATH={os.environ['COMFYUI_PATH']!r} is not a ComfyUI folder; "
                  "using the diffusers backend", file=sys.stderr)
    host = args.backend == "host"
    if host and comfyui_root() is None:
        ap.error(f"--backend host needs COMFYUI_PATH set to a ComfyUI folder (now "
                 f"{os.environ.get('COMFYUI_PATH')!r})")
    if host and args.full_impl == "inplace":
        ap.error("the host backend fine-tunes all weights only as the Fine-tune UNet node does (the core's "
                 "FullDelta); --full-impl inplace is diffusers-only")
    # Before any work: the host backend runs in ComfyUI's environment (torch, no diffusers needed).
    common.require("torch", *(() if host else ("diffusers", "transformers")))

    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device == "cuda"
    if args.worker or args.worker_e2e:
        if args.worker_e2e:
            from speed.diffusers_worker import end_to_end
            res = end_to_end(args)
        else:
            res = worker(args)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    if cuda and args.dry_run and not torch.cuda.is_available():
        # Planning a GPU run on a machine without one (scripts/gpu_host_check.sh --dry-run).
        bf16_ok, cap = True, args.max_gb
    else:
        bf16_ok = cuda and torch.cuda.is_bf16_supported()
        cap = torch.cuda.get_device_properties(0).total_memory / GB * 0.95 if cuda else args.max_gb
    plan, full_impl = plan_rows(args, cuda, bf16_ok, cap)
    if args.dry_run:
        print(f"{args.model}, latent {args.latent}, {args.device}, backend {args.backend}"
              + (" (tiny)" if args.tiny else "") + f", memory cap {cap:g} GB, {mem_available_gb():.1f} GB free now")
        for name, stage, cfg in plan:
            est, _, skip = memory_check(args, stage, cfg, cap, cuda)
            print(f"  {name} / {stage}: estimate {fmt(est, 1)} GB, " + (f"skipped: {skip}" if skip else "runs"))
        return 0
    settings = dict(model=args.model, backend=args.backend, tiny=args.tiny, latent=args.latent,
                    pixels=args.latent * 8, steps=args.steps, warmup=args.warmup, device=args.device,
                    cap_gb=round(cap, 1), threads=args.threads or torch.get_num_threads(),
                    stage2_base=args.stage2_base, full_impl=full_impl,
                    unet_config=unet_config(args.backend, args.model, args.tiny))
    if host:
        settings["host_model_class"] = HOST_MODEL_CLASS[args.model]  # its own noise schedule (model_sampling)
    else:
        settings["scheduler"] = SCHEDULER
    report = dict(machine=machine_info(args.device, args.backend),
                  params=param_count(args.backend, args.model, args.tiny), settings=settings, rows=[])
    for name, stage, cfg in plan:
        report["rows"].append(run_row(args, name, stage, cfg, cap, cuda))
        if report["rows"][-1].get("params"):
            report["params"] = report["rows"][-1]["params"]
        if args.out:  # partial results survive an interrupted run
            add_ratios(report)
            Path(str(args.out) + ".json").parent.mkdir(parents=True, exist_ok=True)
            Path(str(args.out) + ".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    try:
        report["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    if host and args.e2e:
        print("end to end: diffusers only (ImagicPipeline); not run with the host backend", flush=True)
    if (cuda or args.e2e) and not args.no_e2e and not host:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker-e2e", "--model", args.model,
                "--latent", str(args.latent), "--device", args.device] + (["--tiny"] if args.tiny else [])
        if args.e2e_steps:
            argv += ["--e2e-steps", *map(str, args.e2e_steps)]
        if args.e2e_sample_steps:
            argv += ["--e2e-sample-steps", str(args.e2e_sample_steps)]
        limit = cap if cuda else min(cap, mem_available_gb() - 1.0)
        rc, res, state, err = run_child(argv, limit, 3 * args.timeout, cuda)
        report["end_to_end"] = res if res is not None and rc == 0 else dict(
            failed=state["killed"] or (err or "").strip()[-300:])
        print("end to end:", report["end_to_end"], flush=True)
    write(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
