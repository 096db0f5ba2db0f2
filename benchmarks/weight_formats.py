"""Memory and time of the Fine-tune node (LoRA) on each weight format users load, in a real ComfyUI.

One Flux.1-dev-shaped diffusion model with random weights (hidden 1536, one double and one single
block, T5-width context: about 130M parameters; the tiny files of the tests are too small for the
formats to differ), written once per format with the tests' writers (tests/host/weight_formats.py)
and loaded by the loader that reads it (stock Load Diffusion Model; ComfyUI-GGUF's Unet Loader (GGUF)
for GGUF). Each format runs in a fresh process: load, then the Optimize Embedding node's stage and the
Fine-tune UNet node's (LoRA rank 4, gradient checkpointing), each 1 warm-up + 3 steps at a 32x32
latent (256 px). Reported: file size, RSS after loading, what each stage adds to it at its peak
(kernel VmHWM, reset when the stage starts), the median step time.

    COMFYUI_PATH=/path/to/ComfyUI IMAGIC_COMFYUI_GGUF=/path/to/ComfyUI-GGUF \\
        /path/to/comfy-venv/bin/python benchmarks/weight_formats.py --out benchmarks/results/weight_formats_cpu

Needs a ComfyUI (COMFYUI_PATH) with its Python environment, PyPI's gguf, and ComfyUI-GGUF for the
GGUF rows (without it those rows are skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import comfyui_root, machine_info

FORMATS = ("bf16", "fp16", "fp8_e4m3fn", "scaled_fp8", "mixed_float8_e4m3fn", "mixed_nvfp4", "mixed_int8_tensorwise",
           "gguf_bf16", "gguf_q8_0", "gguf_q5_1", "gguf_q4_0")
CONFIG = dict(hidden_size=1536, num_heads=12, depth=1, depth_single_blocks=1, context_in_dim=4096, vec_in_dim=768)
LATENT = 32


def worker(fmt: str, folder: str, steps: int) -> dict:
    import torch

    from speed.host_worker import pack_host
    from speed.measure import StageMeter, rss_gb
    from tests.host import comfy_host, flow_models, weight_formats

    torch.set_num_threads(1)
    comfy_host.import_host(tempfile.mkdtemp())
    comfy_host.load_pack()
    import folder_paths
    import nodes

    spec = flow_models.FlowFamily("flux_bench", "Flux", dict(flow_models.FAMILIES["flux_dev"].unet_config, **CONFIG),
                                  text_width=4096, tokens=64, latent_shape=(1, 16, LATENT, LATENT), pooled_width=768,
                                  guidance=3.5)
    f = weight_formats.FORMATS[fmt]
    ext = "gguf" if f.loader == "gguf" else "safetensors"
    path = Path(folder) / f"bench_{fmt}.{ext}"
    if not path.exists():
        sd, _, _ = flow_models.state_dict(spec)
        weight_formats.write(fmt, sd, path, "flux")
        del sd
    folder_paths.folder_names_and_paths["diffusion_models"] = ([folder], {".safetensors", ".gguf"})
    folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        if f.loader == "gguf":
            gguf_dir = os.environ["IMAGIC_COMFYUI_GGUF"]
            comfy_host.load_pack(gguf_dir)
            (model,) = nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]().load_unet(path.name)
        else:
            (model,) = comfy_host.call_node("UNETLoader", unet_name=path.name, weight_dtype=f.weight_dtype)
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    after_load = rss_gb()
    cond, latent = flow_models.conditioning(spec, seed=1), flow_models.latent(spec, seed=2)
    train = pack_host(nodes)
    out = dict(format=fmt, file_mb=round(path.stat().st_size / 2**20, 1), stored_params=n_params,
               rss_after_load_gb=round(after_load, 3))
    for stage in ("embedding", "finetune"):
        meter = StageMeter(cuda=False)
        common = dict(steps=1 + steps, seed=0, on_start=lambda den, e, m=meter: m.start(), on_step=meter)
        with torch.inference_mode():
            if stage == "embedding":  # the Optimize Embedding node (no checkpointing)
                train.optimize_embedding_stage(model, cond, latent, lr=2e-3, **common)
            else:  # the Fine-tune node's defaults: LoRA r4, gradient checkpointing
                train.finetune_stage(model, cond, latent, lr=1e-4, method="lora", rank=4, gradient_checkpointing=True,
                                     **common)
        res = meter.result(1, [])
        out[f"{stage}_peak_gb"] = round(res["peak_gb"], 3)
        out[f"{stage}_adds_gb"] = round(res["peak_gb"] - after_load, 3)
        out[f"{stage}_s_per_step"] = round(res["ms_per_step"] / 1000, 3)
    return out


def markdown(report) -> str:
    m = report["machine"]
    lines = [f"### Both training nodes per weight format (stage 2: LoRA r4, checkpointing): Flux.1-dev-shaped, hidden 1536, "
             f"1 + 1 blocks, latent {LATENT}x{LATENT}, CPU", "",
             f"{m['cpu']}, {m['cores']} cores, 1 torch thread, torch {m['torch']}, ComfyUI {m.get('comfyui', '?')}, "
             f"{m['date']}. Each format in a fresh process; 1 warm-up + {report['steps']} measured steps.", "",
             "| format | file MB | RSS after load GB | stage 1 adds GB | stage 1 s/step | stage 2 adds GB | "
             "stage 2 s/step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['format']} | – | – | – | – | – | {r['error'].splitlines()[-1][:160]} |")
        else:
            lines.append(f"| {r['format']} | {r['file_mb']} | {r['rss_after_load_gb']:.2f} | {r['embedding_adds_gb']:.2f} | "
                         f"{r['embedding_s_per_step']:.2f} | {r['finetune_adds_gb']:.2f} | {r['finetune_s_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if comfyui_root() is None:
        sys.exit("weight_formats.py needs COMFYUI_PATH set to a ComfyUI folder, and that ComfyUI's Python")
    if args.worker:  # (tests.host.comfy_host puts the host on sys.path itself, after this repository's tests/)
        print("RESULT " + json.dumps(worker(args.worker, args.folder, args.steps)), flush=True)
        return 0
    common.require("gguf", extra="bench")
    folder = tempfile.mkdtemp(prefix="imagic_formats_")
    rows = []
    for fmt in args.formats.split(","):
        if fmt.startswith("gguf") and not os.environ.get("IMAGIC_COMFYUI_GGUF"):
            rows.append(dict(format=fmt, error="skipped: IMAGIC_COMFYUI_GGUF not set"))
            continue
        t = time.time()
        proc = subprocess.run([sys.executable, __file__, "--worker", fmt, "--folder", folder, "--steps",
                               str(args.steps)], capture_output=True, text=True)
        res = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
        rows.append(res or dict(format=fmt, error=f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"))
        print(rows[-1], f"({time.time() - t:.0f} s)", flush=True)
    report = dict(machine=machine_info("cpu", "host"), steps=args.steps, config=CONFIG, latent=LATENT, rows=rows)
    md = markdown(report)
    print(md)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        Path(args.out + ".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
