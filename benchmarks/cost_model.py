"""Will it run on my GPU, and how long? FLOPs and memory of one training step at full width, counted on the CPU.

For each family (SDXL, Flux.1 dev, Flux.2 dev, Qwen-Image, Z-Image, Krea 2) this builds the host's own
network class with the real configuration (every block, the real hidden size, heads and MLP width) and
runs the pack's own training step on it: the nodes' ``ComfyDenoiser`` (``nodes/host/denoiser.py``) inside
``den.loaded(gradient_checkpointing)``, the core's loss (``imagic.train.loss_closure``) and the backward
pass, for stage 1 (gradients to the text embedding only) and stage 2 (LoRA as the core applies it,
``den.attach(make_delta("lora", ...))``), with and without gradient checkpointing, at the real token
counts of 512, 768 and 1024 px (and 640 px, to check the fit).

Nothing is computed: the weights and every activation are fake tensors (``torch._subclasses.FakeTensorMode``,
shapes and dtypes without memory), so a 32B-parameter model costs nothing. Counted per step:

* FLOPs (``torch.utils.flop_counter.FlopCounterMode``; the CPU's fused attention kernel is registered with
  the same formula torch uses for the GPU kernels, which the counter lacks),
* the bytes autograd keeps for the backward pass (``saved_tensors_hooks``, one count per storage, the
  weights left out),
* the peak of everything the step holds (``torch.distributed._tools.mem_tracker.MemTracker``): weights,
  activations, temporaries, gradients.

The model is run in bf16 with PyTorch attention (``--use-pytorch-cross-attention``), as ComfyUI runs these
files on an NVIDIA card. ``--check`` runs the same step for real (random weights, fp32, CPU) on a
one-block Flux.1-dev model at two sizes and compares measured CPU time and memory with the count.

Results: ``benchmarks/results/cost_model.{md,json}``; the fitted per-family coefficients are what
``imagic/cost.py`` holds (``--coefficients`` prints them in that file's form). Needs COMFYUI_PATH.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/cost_model.py            # count, fit, write the table
    COMFYUI_PATH=... python benchmarks/cost_model.py --check                 # + the CPU check (~10 min)
    COMFYUI_PATH=... python benchmarks/cost_model.py --quick                 # Flux.1 at 512 px only, no files
    python benchmarks/cost_model.py --dry-run                                # the plan
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common
from common import GB, ROOT, comfyui_root, host_version, machine_info

RESULTS = ROOT / "benchmarks" / "results"
SIZES = (512, 768, 1024)
FIT_CHECK_SIZE = 640  # not used by the fit: how far the quadratic in pixels is from a count it did not see
STAGES = ("embedding", "finetune")
CHECK_SIZES = (256, 384)

# The real configurations, as the host's detection (comfy/model_detection.py) reads them from the released
# files, on top of the tiny test families' key layout (tests/host/flow_models.py). ``blocks``: the keys
# that set the depth (the one-block model of --check sets them to 1). ``text_tokens``: the context length
# assumed: T5 pads Flux.1's to 512 and Flux.2's extra_conds pads to 512; the LLM encoders (Qwen-Image,
# Z-Image, Krea 2) give the prompt's length, assumed 128 tokens (a long prompt with the template);
# SDXL's CLIP gives 77.
FAMILY_SETUP = {
    "SDXL": dict(host_class="SDXL", spec=None, blocks=(), text_tokens=77, latent=(4, 8, False),
                 config_note="comfy.supported_models.SDXL with the SDXL base UNet config (benchmarks/speed/configs.py)"),
    "Flux": dict(host_class="Flux", spec="flux_dev", blocks=("depth", "depth_single_blocks"), text_tokens=512,
                 latent=(16, 8, False), real=dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38),
                 config_note="Flux.1 dev: hidden 3072, 24 heads, 19 double + 38 single blocks, MLP x4"),
    "Flux2": dict(host_class="Flux2", spec="flux2", blocks=("depth", "depth_single_blocks"), text_tokens=512,
                  latent=(128, 16, False), real=dict(hidden_size=6144, num_heads=48, depth=8, depth_single_blocks=48),
                  config_note="Flux.2 dev: hidden 6144, 48 heads, 8 double + 48 single blocks, MLP x3, Mistral 15360 context"),
    "QwenImage": dict(host_class="QwenImage", spec="qwen_image", blocks=("num_layers",), text_tokens=128,
                      latent=(16, 8, True), real=dict(num_layers=60),
                      config_note="Qwen-Image: 60 blocks, 3072 wide (24 heads x 128), the class defaults"),
    "ZImage": dict(host_class="ZImage", spec="zimage", blocks=("n_layers",), text_tokens=128,
                   latent=(16, 8, False), real=dict(n_layers=30),
                   config_note="Z-Image: dim 3840, 30 heads, 30 layers + 2 + 2 refiner layers, Qwen3-4B context 2560"),
    "Krea2": dict(host_class="Krea2", spec="krea2_full_text", blocks=("layers",), text_tokens=128,
                  latent=(16, 8, True), real=dict(features=6144, heads=48, kvheads=12, layers=28),
                  config_note="Krea 2: the host class's defaults (features 6144, 48 heads, 12 kv heads, 28 blocks), "
                              "text side 12 x 2560"),
}
LORA_RANK = 4  # imagic/defaults.py's rank (checked below)


def family_config(name: str, depths: dict | None = None) -> dict:
    setup = FAMILY_SETUP[name]
    if setup["spec"] is None:
        from speed.configs import HOST_UNET_CONFIGS
        config = dict(HOST_UNET_CONFIGS["sdxl"])
    else:
        from tests.host import flow_models
        config = dict(flow_models.FAMILIES[setup["spec"]].unet_config, **setup["real"])
    config.update(depths or {})
    return config


def one_block(name: str) -> dict:
    return {k: 1 for k in FAMILY_SETUP[name]["blocks"]}


# ----------------------------------------------------------------------------- the worker (host imported)
def import_host_for_gpu_attention():
    """The host as the speed benchmark imports it, with PyTorch attention, ComfyUI's choice on NVIDIA cards
    (on a CPU it would pick sub-quadratic attention, which keeps chunks a GPU run does not)."""
    root = comfyui_root()
    if root is None:
        sys.exit("cost_model.py: set COMFYUI_PATH to a ComfyUI folder (it builds the host's own model classes)")
    sys.path.insert(0, str(root))
    from comfy.cli_args import args as host_args
    host_args.use_pytorch_cross_attention = True
    from speed.host_worker import import_host
    return import_host(cuda=False)


def register_cpu_attention_flops():
    """The flop counter knows the GPU's fused attention kernels but not the CPU's: same formula (the
    attention's own FLOPs do not depend on the kernel)."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


class Host:
    """The imported host and the pack's modules as the host loaded them."""

    def __init__(self):
        import torch

        # Before the host's folder goes first on sys.path (ComfyUI has a tests folder of its own).
        from tests.host import flow_models  # noqa: F401

        self.host = import_host_for_gpu_attention()
        pack = self.host.__name__.rsplit(".", 2)[0]
        self.deltas = importlib.import_module(pack + ".imagic.deltas")
        self.train = importlib.import_module(pack + ".imagic.train")
        self.defaults = importlib.import_module(pack + ".imagic.defaults")
        if self.defaults.DEFAULTS["rank"] != LORA_RANK:
            raise RuntimeError(f"imagic/defaults.py's rank is {self.defaults.DEFAULTS['rank']}, this script counts {LORA_RANK}")
        import comfy.ldm.modules.attention as attention
        self.attention = attention.optimized_attention.__name__
        register_cpu_attention_flops()
        torch.set_num_threads(1)


def model_inputs(name: str, px: int, fake_mode=None):
    """(CONDITIONING tensor, its extra dict, LATENT) in the shapes the family's encoders give at ``px``."""
    import torch

    setup = FAMILY_SETUP[name]
    channels, factor, five_d = setup["latent"]
    shape = (1, channels) + ((1,) if five_d else ()) + (px // factor, px // factor)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        latent = {"samples": torch.randn(*shape)}
    if setup["spec"] is None:  # SDXL: CLIP-L + CLIP-G context and the pooled CLIP-G vector
        g = torch.Generator().manual_seed(0)
        extra = {"pooled_output": torch.randn(1, 1280, generator=g)}
        return torch.randn(1, setup["text_tokens"], 2048, generator=g), extra, latent
    from tests.host import flow_models
    (tensor, extra), = flow_models.conditioning(setup["spec"], tokens=setup["text_tokens"])
    if fake_mode is not None:
        # An unpadded prompt's mask is all ones, which Lumina 2 / Z-Image's extra_conds tests by its values
        # (fake tensors have none): without it the model gets the same inputs (num_tokens = the context's length).
        extra.pop("attention_mask", None)
    return tensor, extra, latent


def build_model(h: Host, name: str, depths: dict | None, dtype, fake_mode):
    """(ModelPatcher, parameter counts) of the host's class for the family. With ``fake_mode`` every weight
    and buffer is a fake tensor; else the weights are seeded random numbers on the CPU."""
    import torch
    import comfy.model_patcher
    import comfy.supported_models

    from speed.builders import fill_random_

    mc = getattr(comfy.supported_models, FAMILY_SETUP[name]["host_class"])(family_config(name, depths))
    mc.set_inference_dtype(dtype, None)
    base = mc.get_model({}, device=torch.device("meta"))  # model_sampling's tables are computed on the CPU
    net = base.diffusion_model
    if fake_mode is None:
        fill_random_(net.to_empty(device="cpu"), "cpu")
    counts = parameter_counts(net)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return patcher, counts


def parameter_counts(net) -> dict:
    """All parameters; those a quantized file stores quantized (the weights of linear and conv layers:
    2-D and up); the largest block (what checkpointing recomputes at once)."""
    import torch

    total = sum(p.numel() for p in net.parameters())
    quantizable = sum(m.weight.numel() for m in net.modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight is not None)
    blocks = [m for lst in net.children() if isinstance(lst, torch.nn.ModuleList) for m in lst]
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    return dict(params=total, quantizable_params=quantizable, largest_block_params=largest, blocks=len(blocks))


def fake_everything_(module, fake_mode):
    """Every parameter and buffer replaced by a fake tensor of its shape and dtype (after the denoiser read the
    real noise-level table)."""
    import torch

    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                with fake_mode:
                    m._parameters[k] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
        for k, b in list(m._buffers.items()):
            if b is not None:
                with fake_mode:
                    m._buffers[k] = torch.empty(b.shape, dtype=b.dtype)


@contextlib.contextmanager
def host_loader_is_a_no_op():
    """With fake weights there is nothing to move between devices: the host's loader and unpatching (which
    move the weights, and cannot swap fake parameters) are skipped; the weights are counted separately. The
    nodes' probe for in-place writes compares the outputs of two runs, which fake tensors do not have: the
    families counted here pass it (tests/host/test_flow_families.py), so it is taken as passed."""
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    saved = mm.load_models_gpu, mp.ModelPatcher.unpatch_model
    mm.load_models_gpu = lambda *a, **k: None
    mp.ModelPatcher.unpatch_model = lambda *a, **k: None
    yield
    mm.load_models_gpu, mp.ModelPatcher.unpatch_model = saved


def training_step(h: Host, patcher, tensor, extra, latent, px: int, stage: str, checkpointing: bool, measure):
    """The pack's training step on ``patcher``: stage 1 (the embedding trains) or stage 2 (LoRA trains), one
    step to warm up (the nodes' probe for in-place writes runs at the first), then ``measure(loss_fn, params)``."""

    den = h.host.denoiser.ComfyDenoiser(patcher, extra, px, px)
    return den, (lambda: _run(h, den, patcher, tensor, extra, latent, stage, checkpointing, measure))


def _run(h, den, patcher, tensor, extra, latent, stage, checkpointing, measure):
    with den.loaded(checkpointing):
        x0 = h.host.conditioning.latent_for(patcher, latent)
        e = h.host.conditioning.text_embedding(den, tensor, extra)
        if stage == "embedding":
            for v in e.values():
                v.requires_grad_(True)
            params, attach = list(e.values()), contextlib.nullcontext()
        else:
            delta = h.deltas.make_delta("lora", den.trainable_module(), LORA_RANK, seed=0, device=x0.device)
            params, attach = list(delta.parameters()), den.attach(delta)
        with attach:
            loss_fn = h.train.loss_closure(den, x0, lambda: e)
            loss_fn().backward()  # warm-up: the probe, lazy state
            for p in params:
                p.grad = None
            return measure(loss_fn, params, den)


class LiveBytes:
    """The peak bytes of the storages an operation makes while it is on (each counted until it is freed): the
    step's peak above what existed before. Where MemTracker cannot follow a model (SDXL); on a one-block Flux.1
    at 512 px the two agree within 2 % (stage 1: 0.418 against 0.424 GB; stage 2 with checkpointing: 0.314
    against 0.319 GB)."""

    def __init__(self, known=()):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer.seen(out)
                return out

        # known: storages that existed before (the weights, which some layers hand on as they are).
        self.mode, self.live, self.current, self.peak, self.known = Mode(), {}, 0, 0, set(known)

    def seen(self, out):
        import weakref

        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.live or key in self.known:
                continue
            self.live[key] = storage.nbytes()
            self.current += self.live[key]
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self.freed, key)

    def freed(self, key):
        self.current -= self.live.pop(key, 0)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def counted(loss_fn, params, den) -> dict:
    """FLOPs, bytes saved for the backward pass (weights left out) and the step's peak, of one step."""
    import gc

    import torch
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    class FrozenWeightsTracker(MemTracker):
        # MemTracker hooks every parameter's gradient, which a frozen weight refuses: the weights do not train.
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    weights = {p.untyped_storage()._cdata for p in den.base.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    # Two passes: the memory is tracked on a step without the flop counter and the saved-tensor hooks (with
    # them the peak above the weights was 1.45 GB against 0.96 GB, one-block Flux.1 at 1024 px, stage 2 with
    # checkpointing).
    flops = FlopCounterMode(display=False)
    t0 = time.perf_counter()
    with flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn().backward()
    for p in params:
        p.grad = None
    gc.collect()
    tracker = FrozenWeightsTracker()
    tracker.track_external(den.base)
    try:
        with tracker:
            loss_fn().backward()
        (peak,) = tracker.get_tracker_snapshot("peak").values()
        peak = {str(k).split(".")[-1]: int(v) for k, v in peak.items()}
    except NotImplementedError:  # MemTracker refuses a module called twice in one forward (SDXL's UNet)
        for p in params:
            p.grad = None
        gc.collect()
        tensors = [*den.base.parameters(), *den.base.buffers()]
        weights = sum(t.untyped_storage().nbytes() for t in tensors)
        live = LiveBytes(known={t.untyped_storage()._cdata for t in tensors})
        with live:
            loss_fn().backward()
        peak = dict(PARAM=weights, Total=weights + live.peak, tracker="LiveBytes")
    seconds = time.perf_counter() - t0
    for p in params:
        p.grad = None
    weight_bytes = peak.get("PARAM", 0) + peak.get("BUFFER", 0)
    peak.pop("tracker", None)
    return dict(flops=int(flops.get_total_flops()), saved_bytes=int(sum(saved.values())), peak_bytes=peak["Total"],
                weight_bytes=weight_bytes, step_bytes=peak["Total"] - weight_bytes, peak=peak,
                trainable_params=sum(p.numel() for p in params), count_seconds=round(seconds, 2))


def forward_flops(h, den, patcher, tensor, extra, latent) -> int:
    """FLOPs of one forward pass without gradients: a sampling step (guidance-distilled models: no CFG)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with den.loaded(False):
        x0 = h.host.conditioning.latent_for(patcher, latent)
        e = h.host.conditioning.text_embedding(den, tensor, extra)
        s = den.sample_timesteps(1, torch.Generator().manual_seed(0))
        flops = FlopCounterMode(display=False)
        with torch.no_grad(), flops:
            den.predict(x0, s, e)
    return int(flops.get_total_flops())


def count_one(h: Host, name: str, depths: dict | None, px: int, stage: str, ckpt: bool, forward: bool,
              dtype=None) -> dict:
    """One count on fake tensors (bf16 unless ``dtype``): the step's FLOPs and bytes, and the forward pass's FLOPs
    if asked."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    h.host.denoiser.changes_the_result = lambda *a, **k: False  # see host_loader_is_a_no_op
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    patcher, _ = build_model(h, name, depths, dtype or torch.bfloat16, mode)
    tensor, extra, latent = model_inputs(name, px, mode)
    den, run = training_step(h, patcher, tensor, extra, latent, px, stage, ckpt, counted)
    fake_everything_(patcher.model, mode)
    with mode, host_loader_is_a_no_op():
        row = run()
        if forward:
            row["forward_flops"] = forward_flops(h, den, patcher, tensor, extra, latent)
    return row


QUANTITIES = ("flops", "saved_bytes", "step_bytes", "weight_bytes", "forward_flops", "trainable_params")


def count_worker(names, sizes, stages, checkpointing, full_depth=False) -> dict:
    """Every count for ``names`` in this process (fake tensors: no memory).

    A count at full depth takes minutes (Flux.1: 150 s), so the block stacks are counted at depth 1 and with one
    block of each kind added: the difference is one block's cost, and the real depth is that many blocks more
    (exact for FLOPs; for memory while the peak falls where it does at depth 1 and 2, which the full-depth count
    of ``--full-depth`` checks). SDXL's UNet has no uniform stack and is counted whole.
    """

    h = Host()
    out = dict(attention=h.attention, families={})
    for name in names:
        full = family_config(name)
        fam = out["families"][name] = dict(setup={k: v for k, v in FAMILY_SETUP[name].items() if k != "real"},
                                           config={k: (v if isinstance(v, (int, float, str, list, bool, type(None))) else str(v))
                                                   for k, v in full.items()},
                                           counts=[], depth_counts=[])
        fam.update(full_parameter_counts(name))
        blocks = FAMILY_SETUP[name]["blocks"]
        for px in sizes:
            for stage in stages:
                for ckpt in checkpointing:
                    t0 = time.perf_counter()
                    forward = stage == STAGES[0] and not ckpt
                    if full_depth or not blocks:
                        row = count_one(h, name, None, px, stage, ckpt, forward)
                    else:
                        base = count_one(h, name, one_block(name), px, stage, ckpt, forward)
                        row = dict(base)
                        for k in blocks:
                            plus = count_one(h, name, dict(one_block(name), **{k: 2}), px, stage, ckpt, forward)
                            fam["depth_counts"].append(dict(px=px, stage=stage, checkpointing=ckpt, block=k,
                                                            one=base, two=plus))
                            for q in QUANTITIES:
                                if q in base:
                                    row[q] += (full[k] - 1) * (plus[q] - base[q])
                        row["extrapolated_from_depth"] = "1 and 2"
                    row.update(px=px, stage=stage, checkpointing=ckpt, seconds=round(time.perf_counter() - t0, 1))
                    fam["counts"].append(row)
                    print(f"{name} {px}px {stage} ckpt={ckpt}: {row['flops'] / 1e12:.1f} TFLOP, saved "
                          f"{row['saved_bytes'] / GB:.2f} GB, step peak {row['step_bytes'] / GB:.2f} GB over "
                          f"{row['weight_bytes'] / GB:.2f} GB weights ({row['seconds']} s)", file=sys.stderr, flush=True)
    return out


def full_parameter_counts(name: str) -> dict:
    """Parameter counts of the real configuration (built on the meta device: nothing allocated)."""
    import torch
    import comfy.supported_models

    mc = getattr(comfy.supported_models, FAMILY_SETUP[name]["host_class"])(family_config(name))
    mc.set_inference_dtype(torch.bfloat16, None)
    return parameter_counts(mc.get_model({}, device=torch.device("meta")).diffusion_model)


# ----------------------------------------------------------------------------- the CPU check (real tensors)
def matmul_flops_per_second(n: int = 1024, k: int = 3072, reps: int = 5) -> float:
    """This CPU's fp32 matmul rate at a transformer block's shape (tokens x hidden @ hidden x hidden)."""
    import torch

    a, b = torch.randn(n, k), torch.randn(k, k)
    torch.mm(a, b)
    t0 = time.process_time()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n * k * k * reps / (time.process_time() - t0)


def check_worker(name: str, px: int, stage: str, ckpt: bool, depths: dict | None = None) -> dict:
    """One step run for real (fp32 random weights, CPU) on the one-block model: CPU time and peak RSS, then the
    same step counted (real tensors), and the count of the fake model (what the table uses) at fp32."""
    import torch

    from speed.measure import maxrss_gb, reset_peak_rss, rss_gb

    h = Host()
    rate = matmul_flops_per_second()

    def timed(loss_fn, params, den):
        import gc
        gc.collect()
        before = rss_gb()
        reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        loss_fn().backward()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = maxrss_gb()
        for p in params:
            p.grad = None
        row = counted(loss_fn, params, den)
        row.update(cpu_seconds=round(cpu, 2), wall_seconds=round(wall, 2), rss_before_gb=round(before, 3),
                   rss_peak_gb=round(peak, 3), rss_step_gb=round(peak - before, 3))
        return row

    depths = depths or one_block(name)
    patcher, params = build_model(h, name, depths, torch.float32, None)
    tensor, extra, latent = model_inputs(name, px)
    _, run = training_step(h, patcher, tensor, extra, latent, px, stage, ckpt, timed)
    real = run()
    del patcher
    fake = count_one(h, name, depths, px, stage, ckpt, forward=False, dtype=torch.float32)
    return dict(family=name, px=px, stage=stage, checkpointing=ckpt, params=params, depths=depths, matmul_flops_per_s=rate,
                real=real, fake=fake, threads=torch.get_num_threads())


# ----------------------------------------------------------------------------- fits and the table
def quadratic_through(points):
    """(c0, c1, c2) of c0 + c1 m + c2 m^2 through three (m, y) points (m: megapixels), exactly."""
    (x0, y0), (x1, y1), (x2, y2) = points
    d = (x0 - x1) * (x0 - x2) * (x1 - x2)
    c2 = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / d
    c1 = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / d
    c0 = (x1 * x2 * (x1 - x2) * y0 + x2 * x0 * (x2 - x0) * y1 + x0 * x1 * (x0 - x1) * y2) / d
    return c0, c1, c2


def megapixels(px: int) -> float:
    return px * px / 1e6


def fit(counts: dict) -> dict:
    """The coefficients imagic/cost.py holds, per family: quadratics in megapixels through 512, 768, 1024 px,
    and how far they are from the 640 px count they were not fitted to."""
    coefficients, fit_errors = {}, {}
    for name, fam in counts["families"].items():
        c = dict(params=fam["params"], quantizable_params=fam["quantizable_params"],
                 largest_block_params=fam["largest_block_params"], text_tokens=FAMILY_SETUP[name]["text_tokens"])
        for stage in STAGES:
            for ckpt in (False, True):
                rows = {r["px"]: r for r in fam["counts"] if r["stage"] == stage and r["checkpointing"] == ckpt}
                if not all(px in rows for px in SIZES):
                    continue
                key = f"{stage}{'_ckpt' if ckpt else ''}"
                for what in ("flops", "step_bytes"):
                    q = quadratic_through([(megapixels(px), rows[px][what]) for px in SIZES])
                    c[f"{what}_{key}"] = tuple(float(f"{v:.6g}") for v in q)
                    if FIT_CHECK_SIZE in rows:
                        m = megapixels(FIT_CHECK_SIZE)
                        got = q[0] + q[1] * m + q[2] * m * m
                        fit_errors[f"{name} {what}_{key}"] = got / rows[FIT_CHECK_SIZE][what] - 1
        for stage in STAGES:  # what trains (fp32, with Adam's two states): made before the step, so not in its peak
            c[f"trainable_params_{stage}"] = max(r["trainable_params"] for r in fam["counts"] if r["stage"] == stage)
        fwd = {r["px"]: r["forward_flops"] for r in fam["counts"] if "forward_flops" in r}
        if all(px in fwd for px in SIZES):
            c["flops_forward"] = tuple(float(f"{v:.6g}") for v in quadratic_through([(megapixels(px), fwd[px]) for px in SIZES]))
        coefficients[name] = c
    return dict(coefficients=coefficients, fit_errors=fit_errors)


def coefficients_source(coefficients: dict) -> str:
    """The FAMILIES literal of imagic/cost.py."""
    lines = ["FAMILIES = {"]
    for name, c in coefficients.items():
        lines.append(f"    {name!r}: dict(")
        for k, v in c.items():
            lines.append(f"        {k}={v!r},")
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines)


def md_table(cost, families, sizes, formats=("bf16", "fp8", "Q8_0", "Q4_K")) -> list:
    head = ("| family | px | stage 1 TFLOP/step (ckpt) | stage 2 TFLOP/step (ckpt) | default edit PFLOP | "
            + " | ".join(f"GB {f} (st.1 / st.2, ckpt)" for f in formats) + " | min, 4090 | min, 3090 | min, H100 |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in families:
        for px in sizes:
            s1 = cost.estimate(name, px, px, stage="embedding")
            s2 = cost.estimate(name, px, px, stage="finetune", checkpointing=True)
            edit = cost.edit_estimate(name, px, px)
            mem = [f"{cost.estimate(name, px, px, stage='embedding', weight_format=f)['memory_bytes'] / GB:.1f} / "
                   f"{cost.estimate(name, px, px, stage='finetune', checkpointing=True, weight_format=f)['memory_bytes'] / GB:.1f}"
                   for f in formats]
            mins = [f"{edit['seconds'][g] / 60:.1f}" for g in ("RTX 4090", "RTX 3090", "H100 SXM")]
            out.append(f"| {name} | {px} | {s1['flops_per_step'] / 1e12:.1f} | {s2['flops_per_step'] / 1e12:.1f} | "
                       f"{edit['flops'] / 1e15:.0f} | " + " | ".join(mem) + " | " + " | ".join(mins) + " |")
    return out


def readme_rows(cost) -> list:
    """README's 'Will it fit, how long' table: each family's default edit at 1024 px (both stages, the larger
    stage's memory), as imagic.cost estimates it (tests/test_cost.py checks the README against it)."""
    out = ["| family | GB, bf16 | GB, fp8 | GB, Q4_K | min, RTX 4090 | min, RTX 3090 | min, H100 SXM |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for key in cost.FAMILIES:
        mem = [cost.edit_estimate(key, 1024, 1024, weight_format=f)["memory_bytes"] / GB for f in ("bf16", "fp8", "Q4_K")]
        secs = cost.edit_estimate(key, 1024, 1024, weight_format="fp8")["seconds"]
        out.append(f"| {cost.NAMES[key]} | " + " | ".join(f"{v:.0f}" for v in mem)
                   + f" | {secs['RTX 4090'] / 60:.0f} | {secs['RTX 3090'] / 60:.0f} | {secs['H100 SXM'] / 60:.0f} |")
    return out


def five_minute_plans(cost, name: str, fmt: str, keeps_dequantized: bool, gpu: str = "RTX 4090") -> list:
    """Per size, the most steps (the same in both stages) whose edit takes at most 5 estimated minutes on ``gpu``
    and whose larger stage fits its memory."""
    plans = []
    for px in (512, 640, 768, 1024):
        for steps in (500, 400, 300, 250, 200, 150, 100, 50):
            e = cost.edit_estimate(name, px, px, embedding_steps=steps, finetune_steps=steps, weight_format=fmt,
                                   keeps_dequantized=keeps_dequantized)
            fits = e["memory_bytes"] <= cost.GPUS[gpu]["memory_bytes"]
            if e["seconds"][gpu] <= 300 and fits:
                plans.append(dict(px=px, embedding_steps=steps, finetune_steps=steps, minutes=round(e["seconds"][gpu] / 60, 1),
                                  memory_gb=round(e["memory_bytes"] / GB, 1)))
                break
    return plans


def write_results(counts: dict, fitted: dict, check: list, out: Path):
    sys.path.insert(0, str(ROOT))
    from imagic import cost

    if cost.coefficients_differ(fitted["coefficients"]):
        print("note: imagic/cost.py holds other coefficients than this run's; paste --coefficients into it and "
              "rerun to write a table from these", file=sys.stderr)
    doc = dict(settings=dict(sizes=SIZES, fit_check_size=FIT_CHECK_SIZE, lora_rank=LORA_RANK, dtype="bfloat16",
                             attention=counts["attention"], margin=cost.MARGIN_NOTE, gpus=cost.GPUS,
                             utilisation=cost.UTILISATION),
               machine=machine_info("cpu", backend="host"), counts=counts, fit=fitted, check=check,
               five_minutes={f"{n} {f}": five_minute_plans(cost, n, f, False)
                             for n in ("Flux", "ZImage") for f in ("fp8", "Q8_0", "Q4_K")})
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
    m = doc["machine"]
    lines = [
        "# Cost model: memory and FLOPs of a training step at full width (ESTIMATES)",
        "",
        f"Counted on {m['cpu']}, torch {m['torch']}, ComfyUI {m.get('comfyui')}, {m['date']}, with "
        "`benchmarks/cost_model.py`: the host's own classes with the real configurations, fake tensors "
        "(nothing computed), the pack's training step (`ComfyDenoiser` + `imagic.train.loss_closure` + backward), "
        f"bf16 weights and activations, PyTorch attention ({counts['attention']}). **No number here is measured on a "
        "GPU**: memory is the counted peak of a step plus a stated margin; times are FLOPs over an assumed sustained "
        "throughput. They are estimates until a GPU measures them.",
        "",
        f"Assumptions: {cost.MARGIN_NOTE} Sustained throughput = {cost.UTILISATION:.0%} of the spec-sheet dense "
        "bf16 tensor peak (fp32 accumulate): " + ", ".join(f"{g} {v['peak_tflops']:g} TFLOP/s, {v['memory_bytes'] / GB:.0f} GB"
                                                            for g, v in cost.GPUS.items()) + ". "
        "Stage 1 is the Optimize Embedding node, stage 2 the Fine-tune node (LoRA rank "
        f"{LORA_RANK}), both with their default gradient checkpointing. The default edit is 500 + 500 steps "
        "(imagic/defaults.py), sampling not included. Quantized formats: each layer's weight is dequantized when "
        "the layer runs and made again in the backward pass, never kept for it (README, Weight formats): their "
        "memory is their size plus the same step as bf16 (the dequantization's own transient memory is not "
        "counted). Text encoders and the VAE are not resident while the nodes train "
        "(ComfyUI unloads them when the memory is needed) and are not counted.",
        "",
    ]
    lines += md_table(cost, counts["families"], SIZES)
    lines += ["", "## Per family", "", "| family | config | parameters | text tokens |", "|---|---|---:|---:|"]
    for name, fam in counts["families"].items():
        lines.append(f"| {name} | {FAMILY_SETUP[name]['config_note']} | {fam['params'] / 1e9:.2f} B | "
                     f"{FAMILY_SETUP[name]['text_tokens']} |")
    lines += ["", "## The counts (bf16)", "",
              "| family | px | stage | ckpt | TFLOP/step | saved for backward GB | step peak over weights GB | weights GB |",
              "|---|---:|---|---|---:|---:|---:|---:|"]
    for name, fam in counts["families"].items():
        for r in fam["counts"]:
            lines.append(f"| {name} | {r['px']} | {r['stage']} | {'yes' if r['checkpointing'] else 'no'} | "
                         f"{r['flops'] / 1e12:.2f} | {r['saved_bytes'] / GB:.2f} | {r['step_bytes'] / GB:.2f} | "
                         f"{r['weight_bytes'] / GB:.2f} |")
    if fitted["fit_errors"]:
        worst = max(fitted["fit_errors"].items(), key=lambda kv: abs(kv[1]))
        lines += ["", f"The quadratics in pixels (through 512, 768, 1024 px) against the {FIT_CHECK_SIZE} px counts they "
                      f"were not fitted to: largest difference {worst[1]:+.2%} ({worst[0]})."]
    if check:
        lines += ["", "## Check against real execution (CPU)", "",
                  "The same training step run for real on a one-block model at full width (fp32, random weights, CPU, "
                  "1 thread), against the count of the same model on fake tensors. Predicted time = counted FLOPs / this "
                  "CPU's fp32 matmul rate at a block's shape (measured in the same process).", "",
                  "| model | px | stage | TFLOP (fake count) | TFLOP (real count) | CPU s measured | CPU s predicted | measured / predicted | "
                  "step GB counted (fake) | step GB counted (real) | RSS growth GB measured |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in check:
            r, f = c["real"], c["fake"]
            pred = f["flops"] / c["matmul_flops_per_s"]
            lines.append(f"| {c['family']} {'+'.join(str(v) for v in c['depths'].values())} blocks ({c['params']['params'] / 1e6:.0f}M) | {c['px']} | {c['stage']}"
                         f"{' ckpt' if c['checkpointing'] else ''} | {f['flops'] / 1e12:.3f} | {r['flops'] / 1e12:.3f} | "
                         f"{r['cpu_seconds']:.1f} | {pred:.1f} | {r['cpu_seconds'] / pred:.2f} | {f['step_bytes'] / GB:.2f} | "
                         f"{r['step_bytes'] / GB:.2f} | {r['rss_step_gb']:.2f} |")
    lines += ["", "## Default edits in at most 5 minutes on a 4090-class card (estimates)", "",
              "The largest step count (the same for both stages) per size whose estimated edit takes <= 5 min on an RTX 4090 "
              "and whose estimated memory fits its 24 GB:", "", "| family, format | px | steps (each stage) | min | GB |", "|---|---:|---:|---:|---:|"]
    for key, plans in doc["five_minutes"].items():
        for p in plans:
            lines.append(f"| {key} | {p['px']} | {p['embedding_steps']} | {p['minutes']} | {p['memory_gb']} |")
        if not plans:
            lines.append(f"| {key} | none fits | | | |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json", file=sys.stderr)


# ----------------------------------------------------------------------------- the command line
def run_worker(argv: list) -> dict:
    """Run a worker in a fresh process (its own RSS peak; the host imported there, not here)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(argv)], env=env, capture_output=True,
                          text=True)
    sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "".join(
        line + "\n" for line in proc.stderr.splitlines() if " TFLOP" in line))
    if proc.returncode:
        raise SystemExit(f"worker {argv} failed (rc {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILY_SETUP), help="comma-separated: " + ", ".join(FAMILY_SETUP))
    p.add_argument("--check", action="store_true", help="also run the CPU check (real tensors, two sizes)")
    p.add_argument("--check-only", action="store_true", help="the CPU check alone, merged into the existing JSON")
    p.add_argument("--quick", action="store_true", help="Flux.1 dev at 512 px, stage 1, printed only (a fast check)")
    p.add_argument("--full-depth", action="store_true", help="count the whole stack instead of depth 1 and 2 "
                   "(minutes per count: checks the extrapolation; with --quick)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, count nothing")
    p.add_argument("--report", action="store_true", help="rewrite the table from the JSON's counts (after "
                   "imagic/cost.py got new coefficients)")
    p.add_argument("--resume", action="store_true", help="reuse the families a failed run finished")
    p.add_argument("--readme", action="store_true", help="print the README's table from imagic/cost.py")
    p.add_argument("--coefficients", action="store_true", help="print imagic/cost.py's FAMILIES from the JSON")
    p.add_argument("--out", default=str(RESULTS / "cost_model"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, *rest = json.loads(args.worker)
        result = count_worker(*rest) if kind == "count" else check_worker(*rest)
        print(json.dumps(result, default=str))
        return
    common.require("torch", extra="bench")
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILY_SETUP]
    if unknown:
        p.error(f"unknown families {unknown}; choose from {', '.join(FAMILY_SETUP)}")
    out = Path(args.out)
    if args.readme:
        sys.path.insert(0, str(ROOT))
        from imagic import cost
        print("\n".join(readme_rows(cost)))
        return
    if args.coefficients:
        print(coefficients_source(json.loads(out.with_suffix(".json").read_text())["fit"]["coefficients"]))
        return
    sizes = sorted(set(SIZES) | {FIT_CHECK_SIZE})
    if args.dry_run:
        print(f"families: {', '.join(names)}; sizes {sizes} px; stages {STAGES}; checkpointing off/on; "
              f"check: {'Flux one-block at ' + str(CHECK_SIZES) if args.check else 'no'}")
        for n in names:
            print(f"  {n}: {FAMILY_SETUP[n]['config_note']}; {FAMILY_SETUP[n]['text_tokens']} text tokens")
        return
    if comfyui_root() is None:
        sys.exit("cost_model.py: set COMFYUI_PATH to a ComfyUI folder (it builds the host's own model classes)")
    if args.quick:
        counts = run_worker(["count", ["Flux"], [512], ["embedding"], [False], args.full_depth])
        r = counts["families"]["Flux"]["counts"][0]
        print(f"Flux.1 dev 512 px stage 1: {r['flops'] / 1e12:.1f} TFLOP/step, step peak {r['step_bytes'] / GB:.2f} GB "
              f"over {r['weight_bytes'] / GB:.1f} GB of bf16 weights")
        return
    check = []
    if (args.check or args.check_only) and not args.report:
        for px in CHECK_SIZES:
            for stage, ckpt in (("embedding", False), ("finetune", True)):
                check.append(run_worker(["check", "Flux", px, stage, ckpt]))
        # One double block more: what checkpointing keeps per block, measured.
        check.append(run_worker(["check", "Flux", CHECK_SIZES[0], "finetune", True, dict(depth=2, depth_single_blocks=1)]))
    if args.check_only or args.report:
        doc = json.loads(out.with_suffix(".json").read_text())
        counts, fitted = doc["counts"], fit(doc["counts"])
        check = check or doc.get("check", [])
    else:
        counts = dict(families={})
        partial = out.with_name(out.name + "_partial.json")  # each family as it finishes (a later failure keeps them)
        done = json.loads(partial.read_text()) if args.resume and partial.exists() else {}
        for n in names:  # one process per family: the host's imports stay out of this one
            got = done.get(n) or run_worker(["count", [n], sizes, list(STAGES), [False, True]])
            done[n] = got
            partial.write_text(json.dumps(done, default=str))
            counts["attention"] = got["attention"]
            counts["families"].update(got["families"])
        fitted = fit(counts)
        out.with_suffix(".json").write_text(json.dumps(dict(counts=counts, fit=fitted), indent=1, default=str))
    counts["comfyui"] = host_version(comfyui_root())
    write_results(counts, fitted, check, out)


if __name__ == "__main__":
    main()
