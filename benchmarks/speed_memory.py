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
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GB = 1024 ** 3

# ----------------------------------------------------------------------------- model configs
UNET_CONFIGS = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
# --tiny (for testing the script only): the same families, a few million parameters.
TINY_UNET_CONFIGS = {
    "sd15": dict(UNET_CONFIGS["sd15"], layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(UNET_CONFIGS["sdxl"], layers_per_block=1, block_out_channels=(64, 128),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2), attention_head_dim=(1, 2)),
}

# The host backend: ComfyUI's own UNet config, exactly what its detection
# (comfy.model_detection.detect_unet_config) returns for the real SD1.5 and SDXL base checkpoints;
# the host worker checks that detection on the built model gives this config and model class.
# The class then adds its unet_extra_config (SD15: 8 heads; SDXL: 64 channels per head).
_HOST_UNET = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                  in_channels=4, out_channels=4, model_channels=320,
                  use_temporal_resblock=False, use_temporal_attention=False)
HOST_UNET_CONFIGS = {
    "sd15": dict(_HOST_UNET, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 use_linear_in_transformer=False, context_dim=768),
    "sdxl": dict(_HOST_UNET, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 use_linear_in_transformer=True, context_dim=2048),
}
# --tiny on the host: the same classes (SD15, SDXL) with 64 model channels and two levels. Detection
# would not call these SD1.5/SDXL (it needs 320 channels), so the class is used as given.
HOST_TINY_UNET_CONFIGS = {
    "sd15": dict(HOST_UNET_CONFIGS["sd15"], model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1]),
    "sdxl": dict(HOST_UNET_CONFIGS["sdxl"], model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[0, 2], transformer_depth_middle=1, transformer_depth_output=[0, 0, 2, 2]),
}
HOST_MODEL_CLASS = {"sd15": "SD15", "sdxl": "SDXL"}  # comfy.supported_models

TEXT_SHAPES = {"sd15": dict(context=(1, 77, 768)), "sdxl": dict(context=(1, 77, 2048), pooled=(1, 1280))}
# Parameter counts of the configs above (checked by the worker), for memory estimates without a build.
# The host's UNets have the same counts as the diffusers ones (checked on ComfyUI v0.3.64).
PARAMS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}
TINY_PARAMS = {("diffusers", "sd15"): 1_028_484, ("diffusers", "sdxl"): 10_022_596,
               ("host", "sd15"): 5_184_132, ("host", "sdxl"): 9_201_220}

# For the estimates: activations in GB at latent 32 (scaled by area), and what stage 2 needs besides
# activations and the weight copies (per-layer transients, allocator slack). Measured on SD1.5
# (stage 1 +0.8 GB; LoRA stage 2 +2.2 GB at latent 32 and +1.8 GB at latent 8 over the merged
# weights); SDXL assumed to scale with its parameter count.
ACTIVATION_GB_32 = {"sd15": dict(embedding=0.8, finetune=0.6), "sdxl": dict(embedding=1.6, finetune=1.2)}
STAGE2_FIXED_GB = {"sd15": 1.6, "sdxl": 5.0}
# The worker process itself (Python, torch, allocator slack); importing the host adds about 0.4 GB
# (measured: 0.79 GB RSS after loading a 5 M-parameter host model, 0.39 GB with diffusers).
PROCESS_GB = {"diffusers": 0.5, "host": 0.9}

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def unet_config(backend: str, model: str, tiny: bool = False) -> dict:
    if backend == "host":
        return (HOST_TINY_UNET_CONFIGS if tiny else HOST_UNET_CONFIGS)[model]
    return (TINY_UNET_CONFIGS if tiny else UNET_CONFIGS)[model]


def param_count(backend: str, model: str, tiny: bool = False) -> int:
    return TINY_PARAMS[(backend, model)] if tiny else PARAMS[model]


# ----------------------------------------------------------------------------- configurations
# The baseline is the paper / diffusers community Imagic pipeline: full fine-tune, fp32, plain Adam,
# no gradient checkpointing, classic attention. Each other row changes one thing, except "defaults".
BASE = dict(method="full", autocast=None, ckpt=False, adam="plain", attn="classic", channels_last=False,
            compile=False, full_impl="core")
OPTIONS = [
    ("baseline", {}),
    ("lora", dict(method="lora")),
    ("bf16 autocast", dict(autocast="bf16")),
    ("fp16 autocast", dict(autocast="fp16")),  # CUDA only
    ("grad checkpointing", dict(ckpt=True)),
    ("fast adam", dict(adam="fast")),
    ("sdpa", dict(attn="sdpa")),
    ("channels_last", dict(channels_last=True)),
    ("torch.compile", dict(compile=True)),
]


def project_defaults(cuda: bool, bf16_ok: bool) -> dict:
    """What ImagicPipeline does by default (pipeline.py): LoRA, fast Adam, diffusers' default SDPA
    attention, and on CUDA autocast (bf16 where supported, else fp16) and gradient checkpointing."""
    d = dict(BASE, method="lora", adam="fast", attn="sdpa")
    if cuda:
        d.update(autocast="bf16" if bf16_ok else "fp16", ckpt=True)
    return d


# The host backend trains what the nodes train: the host picks the attention, the full fine-tune is
# always the core's FullDelta, and the weights are fp32 except in "project defaults" (dtype "host":
# what the host's loader picks for the device, fp32 on CPU). Each row changes one thing from the
# baseline, except "project defaults". Autocast, attention and compile rows are diffusers-only.
HOST_BASE = dict(BASE, attn="host", dtype="fp32")
HOST_OPTIONS = ("baseline", "lora", "grad checkpointing", "fast adam")


def host_project_defaults() -> dict:
    """What the nodes do by default: Fine-tune UNet trains LoRA (rank from imagic.defaults) with
    gradient checkpointing on (its widget's default), both stages use the core's fast Adam, and the
    weights are in the dtype the host picks for the device (what its checkpoint loader uses).
    Optimize Embedding has no checkpointing: plan_rows turns it off for stage 1."""
    return dict(HOST_BASE, method="lora", adam="fast", ckpt=True, dtype="host")


def configurations(cuda: bool, bf16_ok: bool, stage2_base: str, backend: str = "diffusers"):
    host = backend == "host"
    rows = []
    for name, change in OPTIONS:
        if (name == "fp16 autocast" and not cuda) or (host and name not in HOST_OPTIONS):
            continue
        cfg = dict(HOST_BASE if host else BASE, method=stage2_base)
        cfg.update(change)
        if name == "lora" and stage2_base == "lora":
            name, cfg["method"] = "full fine-tune", "full"
        rows.append((name, cfg))
    if host:
        rows.append(("project defaults", host_project_defaults()))
        return rows
    rows.append(("project defaults", project_defaults(cuda, bf16_ok)))
    if not cuda:  # what the defaults do on a GPU, measured here too (bf16 autocast + checkpointing)
        rows.append(("project defaults, GPU settings", project_defaults(True, True)))
    # The core runs LoRA as a side branch of each layer; this row merges it into the weights
    # instead (weight + up @ down, as the first version did), to show what the branch saves.
    rows.append((MERGED, dict(project_defaults(cuda, bf16_ok), lora_impl="merged")))
    return rows


MERGED = "project defaults [LoRA merged into the weights]"
FULL_METHOD = "full fine-tune, the project's method [core FullDelta]"
# Stage "sample" (diffusers): one DDIM step with CFG, a delta applied as ImagicPipeline.sample does.
SAMPLE_ROWS = [("baseline", "lora", "none"),
               ("project defaults", "lora", "side"),
               ("LoRA merged into the weights at every call", "lora", "merged"),
               ("full fine-tune, the project's method [difference merged once]", "full", "cached"),
               ("full difference merged at every call", "full", "merged")]


def lora_side_branch(cfg: dict, backend: str) -> bool:
    """Does this row's LoRA run as a side branch (both backends' default), not merged?"""
    return cfg["method"] == "lora" and cfg.get("lora_impl") != "merged"


# ----------------------------------------------------------------------------- memory helpers
def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GB
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM, which ru_maxrss reports) for this process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


def mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return float("nan")


def estimate_gb(model: str, latent: int, stage: str, cfg: dict, backend: str = "diffusers",
                tiny: bool = False) -> float:
    """Rough upper estimate of the peak (weights + training state + activations), GB.

    Both backends apply a delta the same way (``imagic.deltas.applied``): LoRA as a side branch of
    each layer (nothing merged; the "merged" row merges it into the weights, one more copy kept for
    the backward pass), and a full fine-tune by training one fp32 copy W' of the weights, each
    tensor taking its Adam step as its gradient completes (``run_training(step_in_backward)``):
    base + W' + 2 Adam states, no model-sized gradient, and the base waits in a file-mapped (CPU)
    or CPU (GPU) copy meanwhile (``FullDelta.base_offloaded``; on the host with the input MODEL's
    weights, which the private training network shares), so W' + 2 Adam states. The in-place baseline (the peer's method): weights +
    gradients + 2 Adam states. Under autocast, stage 1 keeps the half-precision copy of every
    weight for its backward pass.
    """
    p = param_count(backend, model, tiny) * 4 / GB
    proc = PROCESS_GB[backend]
    if stage == "sample":  # no gradients: the weights, a full difference if any, a forward's activations
        copies = {"none": 1, "side": 1, "merged": 2 if cfg["method"] == "full" else 1, "cached": 3}
        return p * copies[cfg.get("sample_impl", "none")] \
            + 0.5 * ACTIVATION_GB_32[model]["embedding"] * (latent / 32) ** 2 + proc
    act = ACTIVATION_GB_32[model][stage] * (latent / 32) ** 2
    if cfg["autocast"]:
        act *= 0.6
    if cfg["ckpt"]:
        act *= 0.3
    # Not reduced by checkpointing (measured: SDXL LoRA + checkpointing peaked at 16 GB).
    # Per-layer merged-weight transients and allocator slack; the side branch merges nothing.
    side = lora_side_branch(cfg, backend)
    if stage == "finetune" and not side:
        act += STAGE2_FIXED_GB[model]
    if stage == "embedding":  # autocast keeps the half-precision copy of each weight for the backward pass
        return p + act + (0.5 * p if cfg["autocast"] and not cfg["ckpt"] else 0.0) + proc
    if cfg["method"] == "lora":
        merged = 0.0 if cfg["ckpt"] or side else (0.5 * p if cfg["autocast"] else p)
        return p + merged + act + proc
    foreach_tmp = p if cfg["adam"] == "fast" else 0.0  # foreach Adam's sqrt(v) list on CPU (in-place rows)
    if cfg["full_impl"] == "inplace":  # the weights themselves train: grads + 2 Adam states
        return p + 3 * p + foreach_tmp + act + proc
    return p + 2 * p + act + proc  # W' + 2 Adam states (base offloaded; gradients stepped and freed in backward)


# ----------------------------------------------------------------------------- worker
def fill_random_(module, device, seed: int = 0):
    """Seeded random weights in place, for a module materialized with ``to_empty`` (whose memory
    is uninitialized): every parameter and buffer is written."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    done = set()
    with torch.no_grad():
        for m in module.modules():  # (the host's ops are subclasses of these torch classes)
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                # uniform with the std of 1/sqrt(fan_in): cheaper than normal_, same scale.
                bound = math.sqrt(3.0 / m.weight[0].numel())
                m.weight.uniform_(-bound, bound, generator=g)
                done.add(id(m.weight))
                if m.bias is not None:
                    m.bias.zero_()
                    done.add(id(m.bias))
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                for p, v in ((m.weight, 1.0), (m.bias, 0.0)):
                    if p is not None:
                        p.fill_(v)
                        done.add(id(p))
        for p in module.parameters():
            if id(p) not in done:  # none in the SD configs, but never leave memory uninitialized
                p.normal_(0.0, 0.02, generator=g)
        for b in module.buffers():
            b.zero_()
    return module


def build_unet(model: str, device: str, seed: int = 0, tiny: bool = False):
    """The UNet architecture with seeded random weights: built on the meta device, then filled."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("diffusers", model, tiny))
    return fill_random_(unet.to_empty(device=device), device, seed).eval()


def prepare(model: str, cfg: dict, device: str, latent: int, seed: int = 0, tiny: bool = False):
    import torch
    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from imagic.pipeline import DiffusersDenoiser

    unet = build_unet(model, device, seed, tiny)
    n_params = sum(p.numel() for p in unet.parameters())
    unet.set_attn_processor(AttnProcessor() if cfg["attn"] == "classic" else AttnProcessor2_0())
    if cfg["channels_last"]:
        unet = unet.to(memory_format=torch.channels_last)
    if cfg["compile"]:
        unet.compile()  # in place: the module, its names and parametrizations stay as they are
    scheduler = DDIMScheduler(**SCHEDULER)
    dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["autocast"]]
    time_ids = None
    if model == "sdxl":
        px = latent * 8
        time_ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32)
    den = DiffusersDenoiser(unet, scheduler, time_ids=time_ids, autocast_dtype=dtype,
                            gradient_checkpointing=cfg["ckpt"])
    if cfg.get("lora_impl") == "merged":
        den.lora_side_branch = False
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(1, 4, latent, latent, generator=g).to(device)
    if cfg["channels_last"]:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    e_tgt = {k: torch.randn(*s, generator=g).to(device) for k, s in TEXT_SHAPES[model].items()}
    return unet, den, x0, e_tgt, n_params


def finetune_inplace(den, x0, e_opt, steps, lr, adam, progress, seed=0):
    """The community pipeline's full fine-tune: the UNet's own weights train (written in place),
    through the core's objective and training loop. Used when the core's FullDelta cannot fit."""
    import torch
    from imagic.objective import denoising_loss, draw_noise
    from imagic.train import run_training

    unet = den.trainable_module()
    params = [p.requires_grad_(True) for p in unet.parameters()]
    g = torch.Generator().manual_seed(seed)
    frozen = {k: v.detach() for k, v in e_opt.items()}

    def loss_fn():
        noise, t = draw_noise(den, x0, 1, g)
        return denoising_loss(den, x0, frozen, noise, t)

    return run_training(params, loss_fn, steps, lr, "fine-tuning (in-place)", progress, None, adam)


class StageMeter:
    """What every worker measures. ``start()`` marks the memory after the build (RSS on CPU, with
    the peak reset; CUDA allocation on GPU) and the start of the clock; the meter itself is the
    core's progress callback, which stamps the end of every step."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.stamps, self.cpu_stamps = [], []
        self.out = {}

    def start(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mem = torch.cuda.memory_allocated() / GB
        else:
            self.out["peak_reset"] = reset_peak_rss()
            self.start_mem = rss_gb()
        self.out["mem_after_build_gb"] = round(self.start_mem, 3)
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def __call__(self, step, total, loss):
        if self.cuda:
            import torch
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())

    def result(self, warmup: int, losses) -> dict:
        import torch

        times = [b - a for a, b in zip([self.t0] + self.stamps[:-1], self.stamps)]
        cpu_times = [b - a for a, b in zip([self.c0] + self.cpu_stamps[:-1], self.cpu_stamps)]
        measured = times[warmup:]
        out = dict(self.out, step_s=[round(t, 4) for t in times], first_step_s=round(times[0], 3),
                   ms_per_step=1000 * statistics.median(measured) if measured else None,
                   cpu_step_s=[round(t, 4) for t in cpu_times],
                   cpu_ms_per_step=1000 * statistics.median(cpu_times[warmup:]) if measured else None,
                   loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None)
        out["peak_gb"] = torch.cuda.max_memory_allocated() / GB if self.cuda else maxrss_gb()
        out["peak_increment_gb"] = out["peak_gb"] - self.start_mem
        return out


def worker(args) -> dict:
    import torch

    cfg = json.loads(args.cfg)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meter = StageMeter(args.device == "cuda")
    run_stage = host_stage if args.backend == "host" else diffusers_stage
    info, losses = run_stage(args, cfg, meter)
    return dict(info, **meter.result(args.warmup, losses))


def diffusers_stage(args, cfg, meter):
    """One stage through DiffusersDenoiser and the core, as ImagicPipeline runs it."""
    import imagic
    from imagic.defaults import DEFAULTS

    t_build = time.perf_counter()
    unet, den, x0, e_tgt, n_params = prepare(args.model, cfg, args.device, args.latent, tiny=args.tiny)
    info = dict(params=n_params, build_s=round(time.perf_counter() - t_build, 2))
    total = args.warmup + args.steps
    if args.stage == "sample":
        return info, sample_steps(den, unet, x0, e_tgt, cfg, total, meter)
    meter.start()
    with den.training():
        if args.stage == "embedding":
            _, losses = imagic.optimize_embedding(den, x0, e_tgt, steps=total, lr=DEFAULTS["lr_embedding"],
                                                  progress=meter, adam=cfg["adam"])
        elif cfg["method"] == "full" and cfg["full_impl"] == "inplace":
            losses = finetune_inplace(den, x0, e_tgt, total, DEFAULTS["lr_finetune_full"], cfg["adam"], meter)
        else:
            lr = DEFAULTS["lr_finetune_lora"] if cfg["method"] == "lora" else DEFAULTS["lr_finetune_full"]
            _, losses = imagic.finetune(den, x0, e_tgt, steps=total, lr=lr, method=cfg["method"],
                                        rank=DEFAULTS["rank"], progress=meter, adam=cfg["adam"])
    return info, losses


def sample_steps(den, unet, x0, e_tgt, cfg, total, meter):
    """DDIM steps as ImagicPipeline.sample takes them (a batch of 2, the prompt and the empty text,
    no gradients) with a trained delta applied by ``imagic.deltas.applied``: sample_impl "side" (LoRA
    as a side branch: the pipeline's way), "cached" (a full difference merged once for all steps,
    ``parametrize.cached``: the pipeline's way), "merged" (weight + delta formed by each layer at every
    call), "none" (the model alone; the peer samples its weights trained in place, which costs the same)."""
    import contextlib
    import torch
    from torch.nn.utils import parametrize
    from imagic.deltas import applied, make_delta
    from imagic.defaults import DEFAULTS

    delta = None
    if cfg["sample_impl"] != "none":
        delta = make_delta(cfg["method"], unet, DEFAULTS["rank"], seed=0, device=x0.device)
        with torch.no_grad():
            for t in (delta.up if cfg["method"] == "lora" else []):
                t.normal_(0, 1e-3)  # a LoRA as trained (up starts at zero)
        if cfg["method"] == "full":
            delta.finish()
        delta.requires_grad_(False)
    cond = {k: torch.cat([v, v]) for k, v in e_tgt.items()}
    x = torch.cat([x0, x0])
    t = torch.full((2,), 500, dtype=torch.long)
    meter.start()
    cache = parametrize.cached() if cfg["sample_impl"] == "cached" else contextlib.nullcontext()
    with torch.no_grad(), applied(delta, unet, side_branch=cfg["sample_impl"] == "side"), cache:
        for _ in range(total):
            den.predict(x, t, cond)
            meter(0, total, float("nan"))
    return []


# ----------------------------------------------------------------------------- host worker (ComfyUI)
HOST_FILES = ("nodes.py", "execution.py", "folder_paths.py", "comfy/model_management.py")


def comfyui_root():
    """The ComfyUI folder that COMFYUI_PATH points to, or None."""
    env = os.environ.get("COMFYUI_PATH", "").strip()
    if not env:
        return None
    root = Path(env).expanduser().absolute()
    return root if all((root / f).is_file() for f in HOST_FILES) else None


def import_host(cuda: bool):
    """Import ComfyUI in this process in the order tests/host/comfy_host.py uses, then load this
    repository as a node pack the way ComfyUI does (``nodes.load_custom_node``). Returns the pack's
    nodes/nodes_train.py module: the code the training nodes run."""
    import asyncio

    root = comfyui_root()
    if root is None:
        raise RuntimeError(f"COMFYUI_PATH={os.environ.get('COMFYUI_PATH')!r} is not a ComfyUI folder "
                           f"(needs {', '.join(HOST_FILES)})")
    # Before this repository on sys.path: its nodes/ package would shadow the host's nodes.py.
    sys.path.insert(0, str(root))
    # 1. comfy.model_management reads the CLI args at import time: CPU mode first, unless on CUDA.
    from comfy.cli_args import args as host_args
    host_args.cpu = not cuda
    import comfy.model_management as mm
    if (mm.cpu_state == mm.CPUState.CPU) == cuda:
        raise RuntimeError(f"the host's device state is {mm.cpu_state}, wanted {'CUDA' if cuda else 'CPU'}")
    # 2. The host's top-level utils package before nodes.py (which puts comfy/ first on sys.path).
    import utils.extra_config  # noqa: F401
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(ROOT))) or "ImagicFinetuneUNet" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError(f"ComfyUI could not load {ROOT} as a node pack (the host's log on stderr says why)")
    return sys.modules[nodes.NODE_CLASS_MAPPINGS["ImagicFinetuneUNet"].__module__]


def build_host_model(model: str, dtype_kind: str, tiny: bool, seed: int = 0):
    """The host's own SD1.5/SDXL model (comfy.supported_models.SD15 / SDXL, ``get_model``) with
    seeded random weights, in a ModelPatcher as the host's checkpoint loader returns it."""
    import torch
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = dict(unet_config("host", model, tiny))
    model_config = getattr(comfy.supported_models, HOST_MODEL_CLASS[model])(config)
    load_device = mm.get_torch_device()
    n_params = param_count("host", model, tiny)
    if dtype_kind == "host":  # what comfy.sd.load_state_dict_guess_config picks for this device
        dtype = mm.unet_dtype(model_params=n_params, supported_dtypes=model_config.supported_inference_dtypes)
        manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    else:
        dtype, manual_cast = torch.float32, None
    model_config.set_inference_dtype(dtype, manual_cast)
    # The UNet on the meta device (no memory; the host's BaseModel passes the device to every layer,
    # while its model_sampling buffers are computed on the CPU as usual).
    base = model_config.get_model({}, device=torch.device("meta"))
    info = dict(host_class=type(model_config).__name__, weight_dtype=str(dtype).replace("torch.", ""),
                manual_cast_dtype=str(manual_cast).replace("torch.", "") if manual_cast is not None else None)
    if not tiny:  # what a real checkpoint of this layout loads as (detection reads key names and shapes)
        sd = base.diffusion_model.state_dict()
        detected = comfy.model_detection.detect_unet_config(sd, "")
        detected_class = type(comfy.model_detection.model_config_from_unet(sd, "")).__name__
        if detected != HOST_UNET_CONFIGS[model] or detected_class != HOST_MODEL_CLASS[model]:
            raise RuntimeError(f"the host detects this UNet as {detected_class} {detected}")
        info["detected_as"] = detected_class
        del sd
    # Materialized once, where the host's loader would put it, and filled.
    device = mm.unet_inital_load_device(n_params, dtype)
    fill_random_(base.diffusion_model.to_empty(device=device), device, seed)
    base.device = device  # (get_model was told "meta"; the host's loader records the real device)
    left = [n for n, t in [*base.named_parameters(), *base.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    info["params"] = sum(p.numel() for p in base.diffusion_model.parameters())
    if info["params"] != n_params:  # the memory estimates use the table
        raise RuntimeError(f"{info['params']} UNet parameters, but PARAMS/TINY_PARAMS say {n_params}")
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())
    return patcher, info


def host_stage(args, cfg, meter):
    """One stage exactly as the nodes run it (nodes/nodes_train.py): under the executor's inference
    mode, the nodes' own ``prepare_training`` (a ComfyDenoiser for the MODEL), ``den.loaded(...)``
    (load_models_gpu, gradient checkpointing), ``latent_for``, ``_embedding``, and the core's
    optimize_embedding / finetune with the node's cancel check. Only the step count, the learning
    rate (imagic.defaults) and the Adam kind come from the configuration."""
    import torch

    t_import = time.perf_counter()
    train = import_host(args.device == "cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.ldm.modules.attention as attention

    t_build = time.perf_counter()
    with torch.inference_mode():  # as the checkpoint loader node builds it: the weights are inference tensors
        patcher, info = build_host_model(args.model, cfg["dtype"], args.tiny)
    info.update(attention=attention.optimized_attention.__name__, import_s=round(t_build - t_import, 2),
                build_s=round(time.perf_counter() - t_build, 2))
    defaults = train.DEFAULTS
    total = args.warmup + args.steps
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():  # every node runs under it; den.loaded() turns it off for training
        # What CLIP Text Encode and VAE Encode would give: SDXL's pooled vector rides in the dict.
        shapes = TEXT_SHAPES[args.model]
        extra = {"pooled_output": torch.randn(*shapes["pooled"], generator=g)} if "pooled" in shapes else {}
        conditioning = [[torch.randn(*shapes["context"], generator=g), extra]]
        latent = {"samples": torch.randn(1, 4, args.latent, args.latent, generator=g)}
        tensor, extra, den = train.prepare_training(patcher, conditioning, latent, "the conditioning")
        with den.loaded(gradient_checkpointing=cfg["ckpt"]):
            x0 = train.latent_for(patcher, latent).to(den.device)
            e = train.text_embedding(den, tensor, extra)
            info["conditioning"] = {k: list(v.shape) for k, v in e.items()}
            meter.start()  # after load_models_gpu: the weights are where training uses them
            if args.stage == "embedding":
                _, losses = train.optimize_embedding(den, x0, e, steps=total, lr=defaults["lr_embedding"], seed=0,
                                                     progress=meter, cancel=train.NodeProgress.cancel,
                                                     adam=cfg["adam"])
            else:
                lr = defaults["lr_finetune_lora"] if cfg["method"] == "lora" else defaults["lr_finetune_full"]
                _, losses = train.finetune(den, x0, e, steps=total, lr=lr, method=cfg["method"],
                                           rank=defaults["rank"], seed=0, progress=meter,
                                           cancel=train.NodeProgress.cancel, adam=cfg["adam"])
    return info, losses


# ----------------------------------------------------------------------------- end to end (GPU)
class _StubTokenizer:
    model_max_length = 77

    def __call__(self, text, **kw):
        import torch
        return SimpleNamespace(input_ids=torch.zeros(1, 77, dtype=torch.long))


def _stub_text_encoder(width: int, pooled: int = 0, seed: int = 0):
    """Stands in for CLIP (its cost is one forward pass per text, negligible next to training)."""
    import torch

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("h", torch.randn(1, 77, width, generator=g))
            self.register_buffer("p", torch.randn(1, max(pooled, 1), generator=g))

        def forward(self, ids, output_hidden_states=False):
            if output_hidden_states:
                return SimpleNamespace(hidden_states=[self.h, self.h], text_embeds=self.p[:, :pooled])
            return (self.h,)

    return Stub()


def end_to_end(args) -> dict:
    """The default edit on the GPU: stage 1 and stage 2 at imagic.defaults, then six etas sampled
    with 50 DDIM steps, through ImagicPipeline (autocast and checkpointing at its defaults).
    The text encoders are stubs and there is no VAE, so encode/decode are not included."""
    import torch
    from diffusers import DDIMScheduler
    from imagic import ImagicPipeline, finetune, optimize_embedding
    from imagic.defaults import DEFAULTS
    from imagic.results import ImagicResult

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    unet = build_unet(args.model, device, tiny=args.tiny)
    scheduler = DDIMScheduler(**SCHEDULER)
    sdxl = args.model == "sdxl"
    te1 = _stub_text_encoder(768).to(device)  # SDXL: 768 + 1280 side by side = its 2048 context
    te2 = _stub_text_encoder(1280, pooled=1280, seed=1).to(device) if sdxl else None
    pipe = ImagicPipeline(unet, te1, _StubTokenizer(), scheduler, vae=None, text_encoder_2=te2,
                          tokenizer_2=_StubTokenizer() if sdxl else None, autocast_dtype="auto")
    side = args.latent  # no VAE: one "pixel" per latent cell
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, side, side, generator=g).to(device)
    e_tgt = pipe.encode_text("a photo")
    den = pipe.denoiser(side, side)
    s1, s2 = args.e2e_steps if args.e2e_steps else (DEFAULTS["embedding_steps"], DEFAULTS["finetune_steps"])
    etas = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    with den.training():
        e_opt, _ = optimize_embedding(den, x0, e_tgt, steps=s1, lr=DEFAULTS["lr_embedding"])
        sync()
        t1 = time.perf_counter()
        delta, _ = finetune(den, x0, e_opt, steps=s2, lr=DEFAULTS["lr_finetune_lora"], method=DEFAULTS["method"],
                            rank=DEFAULTS["rank"])
    sync()
    t2 = time.perf_counter()
    result = ImagicResult(e_tgt=e_tgt, e_opt=e_opt, delta=delta,
                          settings=dict(width=side, height=side, method=DEFAULTS["method"]))
    images = pipe.sample(result, etas=etas, steps=args.e2e_sample_steps or DEFAULTS["sample_steps"])
    sync()
    t3 = time.perf_counter()
    out = dict(embedding_steps=s1, finetune_steps=s2, etas=etas,
               sample_steps=args.e2e_sample_steps or DEFAULTS["sample_steps"], images=len(images),
               autocast=str(pipe.autocast_dtype), gradient_checkpointing=pipe.gradient_checkpointing,
               stage1_s=t1 - t0, stage2_s=t2 - t1, sample_s=t3 - t2, total_s=t3 - t0)
    if device == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated() / GB
    return out


# ----------------------------------------------------------------------------- orchestration
def host_version(root) -> str:
    """ComfyUI's version, read from its comfyui_version.py (without importing the host here)."""
    try:
        text = (Path(root) / "comfyui_version.py").read_text()
        return text.split("__version__", 1)[1].split("=", 1)[1].strip().split()[0].strip("\"'")
    except (OSError, IndexError):
        return "unknown"


def machine_info(device: str, backend: str = "diffusers") -> dict:
    import torch

    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:  # the host backend does not need it
        diffusers_version = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                diffusers=diffusers_version, python=platform.python_version(), device=device,
                ram_total_gb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / GB, 1)
    if backend == "host":
        info["comfyui"] = host_version(comfyui_root())
        info["comfyui_path"] = str(comfyui_root())
    return info


def _child_rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return 0.0


def run_child(argv, cap_gb: float, timeout_s: float, cuda: bool):
    """Run a worker; kill it if its RSS passes the cap (CPU) or it runs past the timeout."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = dict(killed=None, max_rss=0.0)

    def watch():
        start = time.time()
        while proc.poll() is None:
            r = _child_rss_gb(proc.pid)
            state["max_rss"] = max(state["max_rss"], r)
            if not cuda and r > cap_gb:
                state["killed"] = f"killed: RSS {r:.1f} GB passed the {cap_gb:g} GB cap"
                proc.kill()
            elif time.time() - start > timeout_s:
                state["killed"] = f"killed: ran past the {timeout_s:g} s timeout"
                proc.kill()
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    t.join()
    result = None
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    return proc.returncode, result, state, stderr


def fmt(x, digits=0):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def stage2_what(r) -> str:
    if r["stage"] == "embedding":
        return "–"
    if r["cfg"]["method"] == "lora":
        return "LoRA r4"
    return "full (in-place)" if r["cfg"]["full_impl"] == "inplace" else "full (core FullDelta)"


def row_backend(r: dict, report: dict) -> str:
    return r.get("backend", report["settings"].get("backend", "diffusers"))


def add_ratios(report) -> None:
    """Time and memory of every measured row over the baseline row of the same stage and backend."""
    rows = report["rows"]
    for r in rows:
        r.pop("time_ratio", None), r.pop("cpu_ratio", None), r.pop("mem_ratio", None)
    for key in {(row_backend(r, report), r["stage"]) for r in rows}:
        group = [r for r in rows if (row_backend(r, report), r["stage"]) == key and r["status"] == "ok"]
        # The paper baseline (the diffusers in-place run) where it was measured, for both backends.
        paper = [r for r in rows if row_backend(r, report) == "diffusers" and r["stage"] == key[1]
                 and r["name"] == "baseline" and r["status"] == "ok"]
        base = paper[0] if paper else next((r for r in group if r["name"] == "baseline"), None)
        if base is None:
            continue
        for r in group:
            r["time_ratio"] = r["ms_per_step"] / base["ms_per_step"]
            if r.get("cpu_ms_per_step") and base.get("cpu_ms_per_step"):
                r["cpu_ratio"] = r["cpu_ms_per_step"] / base["cpu_ms_per_step"]
            r["mem_ratio"] = r["peak_gb"] / base["peak_gb"]


def markdown(report) -> str:
    m, s = report["machine"], report["settings"]
    cuda = s["device"] == "cuda"
    backends = sorted({row_backend(r, report) for r in report["rows"]} | {s.get("backend", "diffusers")})
    host = "host" in backends
    mixed = len(backends) > 1  # merged runs of both backends: a backend column
    ok_host = [r for r in report["rows"] if r["status"] == "ok" and row_backend(r, report) == "host"]
    software = f"torch {m['torch']}" + (f", diffusers {m['diffusers']}" if "diffusers" in backends else "") \
        + (f", ComfyUI {m.get('comfyui', '?')}" if host else "")
    lines = [f"### {s['model'].upper()} UNet ({report['params'] / 1e6:,.0f} M parameters, random weights"
             + ("; tiny testing config, not the real UNet" if s.get("tiny") else "") + "), "
             f"latent {s['latent']}x{s['latent']} ({s['latent'] * 8} px), {s['device']}, "
             + " and ".join("ComfyUI host" if b == "host" else b for b in backends),
             "",
             f"{m.get('gpu', m['cpu'])}, {m['cores']} CPU cores, {software}, "
             f"{m['date']}, load average at start {fmt(m.get('loadavg_start', [None])[0], 1)}. "
             f"{s.get('threads', m['torch_threads'])} torch thread(s). "
             f"{s['warmup']} warm-up + {s['steps']} measured steps per configuration, each configuration in a "
             f"fresh process; ms/step is the median wall time of the measured steps"
             + ("" if cuda else ", CPU ms/step the median process CPU time (all threads) of the same steps, "
                "less sensitive to other jobs on the machine")
             + f". Memory cap {s['cap_gb']:g} GB.",
             ""]
    if host:
        r0 = ok_host[0] if ok_host else {}
        lines += [f"Backend: the ComfyUI host (`comfy.supported_models.{HOST_MODEL_CLASS[s['model']]}`"
                  + ("" if s.get("tiny") else ", with the UNet config the host detects for the real checkpoint")
                  + f", `get_model`, in a `ModelPatcher`; the host's attention "
                  f"`{r0.get('attention', '?')}`). Each stage runs as the nodes run it: `ComfyDenoiser` on the nodes' private training model, "
                  "`den.loaded(gradient_checkpointing=...)`, then `optimize_embedding` / `finetune` of the core.",
                  ""]
    after = {"host": "loading the model (`load_models_gpu`)", "diffusers": "building the model"}
    after = " (diffusers) or ".join(after[b] for b in backends) + (" (host)" if mixed else "")
    if cuda:
        lines.append("Memory: peak `torch.cuda.max_memory_allocated` during the stage (weights included); "
                     f"+GB = that peak minus the allocation right after {after}.")
    else:
        lines.append("Memory: peak RSS of the worker process during the stage (kernel VmHWM = ru_maxrss, reset "
                     f"after {after}; weights included); +GB = that peak minus the RSS right after "
                     f"{after}. Skipped rows give the script's estimate of what they would need.")
    lines += ["", "| configuration | " + ("backend | " if mixed else "") + "stage | stage 2 trains | ms/step | × base | "
              + ("" if cuda else "CPU ms/step | × base | ") + "peak GB | +GB | × base | first step s | notes |",
              "|---|" + ("---|" if mixed else "") + "---|---|---:|---:|" + ("" if cuda else "---:|---:|")
              + "---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        note = r.get("note", "")
        if r.get("weight_dtype") not in (None, "float32"):
            note = (note + f" weights {r['weight_dtype']}").strip()
        if r["status"] != "ok":
            note = f"**{r['status']}**: {r.get('reason', '')}"
        cpu = "" if cuda else f"{fmt(r.get('cpu_ms_per_step'))} | {fmt(r.get('cpu_ratio'), 2)} | "
        which = f"{row_backend(r, report)} | " if mixed else ""
        lines.append(f"| {r['name']} | {which}{r['stage']} | {stage2_what(r)} | {fmt(r.get('ms_per_step'))} | "
                     f"{fmt(r.get('time_ratio'), 2)} | {cpu}{fmt(r.get('peak_gb'), 2)} | "
                     f"{fmt(r.get('peak_increment_gb'), 2)} | {fmt(r.get('mem_ratio'), 2)} | "
                     f"{fmt(r.get('first_step_s'), 1)} | {note} |")
    e = report.get("end_to_end")
    if e:
        lines.append("")
        if "total_s" in e:
            lines.append(f"End to end, the default edit ({e['embedding_steps']} + {e['finetune_steps']} training "
                         f"steps, {len(e['etas'])} etas x {e['sample_steps']} DDIM steps, autocast {e['autocast']}, "
                         f"checkpointing {e['gradient_checkpointing']}; no VAE or text encoder): stage 1 "
                         f"{e['stage1_s']:.1f} s, stage 2 {e['stage2_s']:.1f} s, sampling {e['sample_s']:.1f} s, "
                         f"total {e['total_s']:.1f} s" + (f", peak {e['peak_gb']:.2f} GB" if "peak_gb" in e else "")
                         + ".")
        else:
            lines.append(f"End to end: failed ({e})")
    return "\n".join(lines) + "\n"


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


def write(report, out) -> None:
    add_ratios(report)
    md = markdown(report)
    print(md, flush=True)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(str(out) + ".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        Path(str(out) + ".md").write_text(md)


def combine(a: dict, b: dict) -> dict:
    """Two runs of the same row: pool their measured steps (median of all), keep the larger peak."""
    if b["status"] != "ok":
        return a if a["status"] == "ok" else b
    if a["status"] != "ok":
        return b
    rounds = a.get("rounds", [dict(date=a.get("date"), step_s=a["step_s"], cpu_step_s=a.get("cpu_step_s"),
                                   peak_gb=a["peak_gb"], warmup=a.get("warmup"))])
    rounds.append(dict(date=b.get("date"), step_s=b["step_s"], cpu_step_s=b.get("cpu_step_s"),
                       peak_gb=b["peak_gb"], warmup=b.get("warmup")))
    steps = [t for r in rounds for t in r["step_s"][r["warmup"]:]]
    cpu = [t for r in rounds if r["cpu_step_s"] for t in r["cpu_step_s"][r["warmup"]:]]
    out = dict(b if b["peak_gb"] >= a["peak_gb"] else a)
    out.update(rounds=rounds, ms_per_step=1000 * statistics.median(steps),
               cpu_ms_per_step=1000 * statistics.median(cpu) if cpu else None,
               note=(out.get("note", "") + f" {len(rounds)} runs pooled").strip())
    return out


def merge(paths, out) -> None:
    """Combine result files: new rows are added, a row measured again is pooled (``combine``)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    report = reports[0]
    keyed, order = {}, []
    for rep in reports:
        for r in rep["rows"]:
            r.setdefault("warmup", rep["settings"]["warmup"])
            r.setdefault("date", rep["machine"]["date"])
            r.setdefault("backend", rep["settings"].get("backend", "diffusers"))
            k = (r["backend"], r["name"], r["stage"])
            if k not in keyed:
                order.append(k)
                keyed[k] = r
            else:
                keyed[k] = combine(keyed[k], r)
        if rep is not report:
            if rep.get("end_to_end"):
                report["end_to_end"] = rep["end_to_end"]
            for key in ("comfyui", "comfyui_path", "diffusers"):  # versions of the other backend's runs
                if report["machine"].get(key) is None and rep["machine"].get(key) is not None:
                    report["machine"][key] = rep["machine"][key]
            report.setdefault("merged_runs", []).append(dict(date=rep["machine"]["date"],
                                                             settings=rep["settings"]))
    report["rows"] = [keyed[k] for k in order]
    write(report, out)


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

    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device == "cuda"
    if args.worker or args.worker_e2e:
        res = end_to_end(args) if args.worker_e2e else worker(args)
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
