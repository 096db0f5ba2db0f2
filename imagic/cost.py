"""Will it run on my GPU, and how long? Memory and FLOPs of the training steps, before the first one.

Every number here is an **estimate**. The per-family coefficients were counted, not measured on a GPU:
``benchmarks/cost_model.py`` built each family's real network with the host's own classes and ran the
pack's training step on fake tensors (shapes without memory) at 512, 768 and 1024 px, counting the FLOPs
and the peak of the memory a step holds (bf16, PyTorch attention, as ComfyUI runs these files on an NVIDIA
card). Per family and stage, both are quadratics in the megapixels through those three sizes (tokens grow
with the pixels; attention with their square). Times are FLOPs over an assumed sustained throughput.
``benchmarks/results/cost_model.md`` is the table, with the check against real execution on a CPU.

Nothing here imports torch or comfy, so a node can call it before anything is loaded::

    from imagic import cost
    e = cost.estimate("Flux", 1024, 1024, stage="finetune", checkpointing=True, weight_format="fp8")
    ok, text = cost.fits(e, free_bytes)

Family keys are the host's model classes (``comfy.supported_models``); ``family_key`` maps the class names.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

GB = 1024 ** 3

# The run that produced FAMILIES: `python benchmarks/cost_model.py` (2026-12-03, ComfyUI 0.33.0, torch 2.14.1, CPU, fake
# tensors; the pack with stage-1 checkpointing and the checkpointed in-place probe fixed; paste `python benchmarks/cost_model.py --coefficients` here after a new run).
# Per family: parameter counts (all; the weights of linear/conv layers, which a quantized file stores
# quantized; the largest block, what checkpointing recomputes at once); the text tokens assumed; and per
# stage, (c0, c1, c2) of c0 + c1 * m + c2 * m^2 at m megapixels for the FLOPs of one step and for the bytes
# a step holds above the weights at its peak (activations kept for the backward pass, temporaries,
# gradients), bf16. ``embedding``: stage 1 (only the text embedding trains); ``finetune``: stage 2, LoRA
# rank 4; ``_ckpt``: with gradient checkpointing. ``flops_forward``: one forward pass (a sampling step).
# ``trainable_params_<stage>``: what trains (the embedding; the LoRA factors).
FAMILIES: Dict[str, dict] = {
    'SDXL': dict(
        params=2567463684,
        quantizable_params=2565880320,
        largest_block_params=406558720,
        text_tokens=77,
        flops_embedding=[105058000000.0, 11379300000000.0, 2392580000000.0],
        step_bytes_embedding=[26639500.0, 6524050000.0, -1.00837e-06],
        flops_embedding_ckpt=[157574000000.0, 16542900000000.0, 3076170000000.0],
        step_bytes_embedding_ckpt=[5225100.0, 901930000.0, 1.26047e-07],
        flops_finetune=[53234600000.0, 11508500000000.0, 2392580000000.0],
        step_bytes_finetune=[49149900.0, 6593100000.0, 5.04186e-06],
        flops_finetune_ckpt=[106031000000.0, 17221300000000.0, 3076170000000.0],
        step_bytes_finetune_ckpt=[50915400.0, 898474000.0, 19754700.0],
        trainable_params_embedding=158976,
        trainable_params_finetune=12353184,
        flops_forward=[52531000000.0, 5681120000000.0, 683594000000.0],
    ),
    'Flux': dict(
        params=11901408320,
        quantizable_params=11898322944,
        largest_block_params=339831296,
        text_tokens=512,
        flops_embedding=[13901400000000.0, 110670000000000.0, 37406300000000.0],
        step_bytes_embedding=[4305760000.0, 32574000000.0, 24592900.0],
        flops_embedding_ckpt=[20701400000000.0, 163902000000000.0, 48093800000000.0],
        step_bytes_embedding_ckpt=[283825000.0, 2094140000.0, 5.04186e-07],
        flops_finetune=[13920200000000.0, 110912000000000.0, 37406200000000.0],
        step_bytes_finetune=[4342700000.0, 32739600000.0, 2.01675e-05],
        flops_finetune_ckpt=[20730800000000.0, 164225000000000.0, 48093800000000.0],
        step_bytes_finetune_ckpt=[294108000.0, 2166700000.0, 5.04186e-07],
        trainable_params_embedding=2097920,
        trainable_params_finetune=19351040,
        flops_forward=[6813010000000.0, 53234700000000.0, 10687500000000.0],
    ),
    'Flux2': dict(
        params=32223281152,
        quantizable_params=32223264768,
        largest_block_params=981467648,
        text_tokens=512,
        flops_embedding=[57738700000000.0, 447793000000000.0, 73500000000000.0],
        step_bytes_embedding=[8938160000.0, 67523500000.0, 1.6134e-05],
        flops_embedding_ckpt=[86240200000000.0, 667994000000000.0, 94500000000000.0],
        step_bytes_embedding_ckpt=[614435000.0, 4328270000.0, 2.01675e-06],
        flops_finetune=[57708300000000.0, 449172000000000.0, 73500000000000.0],
        step_bytes_finetune=[9842250000.0, 74062900000.0, 1.6134e-05],
        flops_finetune_ckpt=[86232700000000.0, 669544000000000.0, 94500000000000.0],
        step_bytes_finetune_ckpt=[646616000.0, 4615080000.0, 1.00837e-06],
        trainable_params_embedding=7864320,
        trainable_params_finetune=25181184,
        flops_forward=[28599500000000.0, 220213000000000.0, 21000000000000.0],
    ),
    'QwenImage': dict(
        params=20430401088,
        quantizable_params=20424818688,
        largest_block_params=339831296,
        text_tokens=128,
        flops_embedding=[3518740000000.0, 108532000000000.0, 39375000000000.0],
        step_bytes_embedding=[1000580000.0, 30311600000.0, 8.06698e-06],
        flops_embedding_ckpt=[5283910000000.0, 162354000000000.0, 50625000000000.0],
        step_bytes_embedding_ckpt=[-167994000.0, 9048560000.0, -0.0],
        flops_finetune=[3539770000000.0, 109065000000000.0, 39375000000000.0],
        step_bytes_finetune=[1022580000.0, 36300100000.0, -0.0],
        flops_finetune_ckpt=[5308370000000.0, 162990000000000.0, 50625000000000.0],
        step_bytes_finetune_ckpt=[348609000.0, 5044840000.0, -0.0],
        trainable_params_embedding=458752,
        trainable_params_finetune=36990464,
        flops_forward=[1768010000000.0, 53824500000000.0, 11250000000000.0],
    ),
    'ZImage': dict(
        params=6154908736,
        quantizable_params=6153863168,
        largest_block_params=180910336,
        text_tokens=128,
        flops_embedding=[2932700000000.0, 87327400000000.0, 25078100000000.0],
        step_bytes_embedding=[918582000.0, 26179000000.0, 8.06698e-06],
        flops_embedding_ckpt=[4390540000000.0, 129260000000000.0, 32109400000000.0],
        step_bytes_embedding_ckpt=[73406000.0, 2096450000.0, 7.56279e-07],
        flops_finetune=[2936900000000.0, 90288700000000.0, 26250000000000.0],
        step_bytes_finetune=[1056460000.0, 31721500000.0, 1.6134e-05],
        flops_finetune_ckpt=[4396970000000.0, 135054000000000.0, 33750000000000.0],
        step_bytes_finetune_ckpt=[114094000.0, 2251140000.0, 1.00837e-06],
        trainable_params_embedding=327680,
        trainable_params_finetune=10960384,
        flops_forward=[1460440000000.0, 44701400000000.0, 7500000000000.0],
    ),
    'Krea2': dict(
        params=12820073036,
        quantizable_params=12818579468,
        largest_block_params=434159872,
        text_tokens=128,
        flops_embedding=[7436360000000.0, 192341000000000.0, 36750000000000.0],
        step_bytes_embedding=[1680450000.0, 35797100000.0, 1.6134e-05],
        flops_embedding_ckpt=[11127000000000.0, 287991000000000.0, 47250000000000.0],
        step_bytes_embedding_ckpt=[-363666000.0, 4201580000.0, -787878000.0],
        flops_finetune=[7370960000000.0, 192657000000000.0, 36750000000000.0],
        step_bytes_finetune=[1879190000.0, 41180700000.0, 8.06698e-06],
        flops_finetune_ckpt=[11071100000000.0, 288415000000000.0, 47250000000000.0],
        step_bytes_finetune_ckpt=[185314000.0, 3103470000.0, 1.00837e-06],
        trainable_params_embedding=3932160,
        trainable_params_finetune=14663181,
        flops_forward=[3709450000000.0, 95655900000000.0, 10500000000000.0],
    ),
}

# Which host classes (comfy.supported_models) each key covers: the same network, so the same costs (Krea-dev
# and Kontext are Flux.1 dev files, detected as Flux).
HOST_CLASSES = {
    "SDXL": ("SDXL", "SDXL_instructpix2pix"),
    "Flux": ("Flux", "FluxSchnell", "FluxInpaint"),
    "Flux2": ("Flux2",),
    "QwenImage": ("QwenImage",),
    "ZImage": ("ZImage",),
    "Krea2": ("Krea2",),
}
# Smaller networks of the same kind: their key's estimate is an upper bound (Flux.2 Klein 4B/9B is detected
# as Flux2; KOALA, SSD-1B and Segmind Vega are SDXL with fewer blocks). Lumina 2 (2.6B) is not Z-Image's size.
UPPER_BOUND_CLASSES = {"KOALA_1B": "SDXL", "KOALA_700M": "SDXL", "SSD1B": "SDXL", "Segmind_Vega": "SDXL"}
NAMES = {"SDXL": "SDXL", "Flux": "Flux.1 dev", "Flux2": "Flux.2 dev", "QwenImage": "Qwen-Image",
         "ZImage": "Z-Image", "Krea2": "Krea 2"}

# Bytes per parameter by weight format: (weights of linear/conv layers, every other parameter). A
# quantized file keeps norms, biases and embeddings in 16 or 32 bits (GGUF: 32).
FORMATS = {
    "bf16": (2.0, 2.0), "fp16": (2.0, 2.0), "fp8": (1.0, 2.0),
    "Q8_0": (34 / 32, 4.0), "Q5_K": (176 / 256, 4.0), "Q4_K": (144 / 256, 4.0),
}
QUANTIZED = ("fp8", "Q8_0", "Q5_K", "Q4_K")
DEQUANTIZED_BYTES = 2  # the bf16 copy a quantized layer makes of its weight for each use
# What trains (stage 1: the text embedding; stage 2: the LoRA factors) is fp32 with Adam's two fp32 states;
# it exists before the step, so the counted peak does not hold it (its gradient is in the peak).
TRAINABLE_BYTES = 12

# Working margin on top of the counted peak: the CUDA context and the allocator's fragmentation.
MARGIN_FIXED = 1.0 * GB
MARGIN_FRACTION = 0.10
MARGIN_NOTE = (f"memory = weights in their format + the counted peak of a step above the weights + a working "
               f"margin of {MARGIN_FIXED / GB:.0f} GB plus {MARGIN_FRACTION:.0%} of that peak (CUDA context, allocator).")

# Named GPU classes: spec-sheet dense bf16 tensor peak with fp32 accumulate (no sparsity), not measured
# here, and the memory of the card. A training step at batch 1 mixes large matmuls with attention,
# norms and element-wise work: assumed to sustain UTILISATION of the peak.
GPUS = {
    "RTX 3060 12GB": dict(peak_tflops=25.6, memory_bytes=12 * GB),
    "RTX 4060 Ti 16GB": dict(peak_tflops=44.0, memory_bytes=16 * GB),
    "RTX 4070 Ti Super 16GB": dict(peak_tflops=88.2, memory_bytes=16 * GB),
    "RTX 3090": dict(peak_tflops=71.0, memory_bytes=24 * GB),
    "RTX 4090": dict(peak_tflops=165.2, memory_bytes=24 * GB),
    "A100 40GB": dict(peak_tflops=312.0, memory_bytes=40 * GB),
    "A100 80GB": dict(peak_tflops=312.0, memory_bytes=80 * GB),
    "H100 SXM": dict(peak_tflops=989.0, memory_bytes=80 * GB),
    "H200": dict(peak_tflops=989.0, memory_bytes=141 * GB),
}
UTILISATION = 0.40

STAGES = ("embedding", "finetune")


class CostError(ValueError):
    """Bad input to the estimate: the message says what and how to fix it."""


def family_key(host_class: str) -> str:
    """The FAMILIES key for a host model class name (``type(model.model.model_config).__name__``)."""
    for key, classes in HOST_CLASSES.items():
        if host_class == key or host_class in classes:
            return key
    if host_class in UPPER_BOUND_CLASSES:
        return UPPER_BOUND_CLASSES[host_class]
    raise CostError(f"no cost estimate for the model class {host_class!r}; estimates exist for "
                    + ", ".join(f"{k} ({', '.join(v)})" for k, v in HOST_CLASSES.items()))


def _family(family: str) -> dict:
    if family not in FAMILIES:
        try:
            family = family_key(family)
        except CostError:
            raise CostError(f"unknown family {family!r}: use one of {', '.join(FAMILIES)} "
                            "(or a host model class name, see imagic.cost.HOST_CLASSES)") from None
    return FAMILIES[family]


def _quadratic(c, m: float) -> float:
    return c[0] + c[1] * m + c[2] * m * m


def weight_bytes_of(family: str, weight_format: str = "bf16") -> int:
    """Bytes of the diffusion model's weights in ``weight_format`` (bf16, fp16, fp8, Q8_0, Q5_K, Q4_K)."""
    f = _family(family)
    if weight_format not in FORMATS:
        raise CostError(f"unknown weight format {weight_format!r}: use one of {', '.join(FORMATS)}, "
                        "or pass weight_bytes (the file's size)")
    quantized, other = FORMATS[weight_format]
    q = f["quantizable_params"]
    return int(q * quantized + (f["params"] - q) * other)


def estimate(family: str, width: int, height: int, stage: str = "finetune", method: str = "lora",
             checkpointing: Optional[bool] = None, weight_format: Optional[str] = "bf16",
             weight_bytes: Optional[int] = None, keeps_dequantized: bool = False) -> dict:
    """Estimated GPU memory and FLOPs of one training step of ``family`` at ``width`` x ``height`` pixels.

    stage: "embedding" (stage 1, Optimize Embedding) or "finetune" (stage 2, LoRA); checkpointing defaults
    to on, both nodes' default. weight_format: how the file stores the weights (see FORMATS); weight_bytes
    overrides the weights' size (e.g. the model as loaded; then the weights are labelled "as loaded", and
    weight_format=None says the format is not known: the hint to load an fp8 or GGUF file is given only
    where the weights take 1.5 bytes or more each). Quantized weights are made again per layer in the backward
    pass, never kept for it; keeps_dequantized=True gives the memory of the pack before that (each layer's
    dequantized bf16 weight kept: all of them without checkpointing, one block's with it), for comparison.

    Returns memory_bytes (weights + step + dequantized copies + what trains + margin), weights_bytes,
    step_bytes, dequantized_bytes, trainable_bytes,
    margin_bytes, flops_per_step, megapixels and the inputs, all estimates.
    """
    f = _family(family)
    if stage not in STAGES:
        raise CostError(f"stage must be one of {STAGES} (stage 1: embedding, stage 2: finetune), got {stage!r}")
    if method != "lora":
        raise CostError(f"only method 'lora' has a cost estimate (got {method!r}): a full fine-tune's was not counted")
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 64:
            raise CostError(f"{name} must be a whole number of pixels, 64 or more, got {v!r}")
    if checkpointing is None:
        checkpointing = True
    m = width * height / 1e6
    key = stage + ("_ckpt" if checkpointing else "")
    flops = _quadratic(f["flops_" + key], m)
    step = _quadratic(f["step_bytes_" + key], m)
    if weight_bytes is None and weight_format is None:
        raise CostError("the weights need a size: pass weight_format (see FORMATS) or weight_bytes")
    weights = int(weight_bytes) if weight_bytes is not None else weight_bytes_of(family, weight_format)
    label = weight_format if weight_bytes is None else "as loaded"
    sixteen_bit = weight_format in ("bf16", "fp16") if weight_format is not None else weights >= 1.5 * f["params"]
    dequantized = 0
    if weight_format in QUANTIZED and keeps_dequantized:
        kept = f["largest_block_params"] if checkpointing else f["quantizable_params"]
        dequantized = kept * DEQUANTIZED_BYTES
    trainable = f["trainable_params_" + stage] * TRAINABLE_BYTES
    margin = MARGIN_FIXED + MARGIN_FRACTION * (step + dequantized)
    return dict(family=family, width=width, height=height, megapixels=m, stage=stage, method=method,
                checkpointing=checkpointing, weight_format=weight_format, weights_label=label,
                sixteen_bit_weights=sixteen_bit, memory_bytes=int(weights + step + dequantized + trainable + margin), weights_bytes=weights,
                step_bytes=int(step), trainable_bytes=int(trainable),
                dequantized_bytes=int(dequantized), margin_bytes=int(margin), flops_per_step=flops, estimate=True)


def seconds_for(flops: float, gpu: str) -> float:
    """Estimated seconds for ``flops`` on a named GPU class (GPUS) at the assumed sustained throughput."""
    if gpu not in GPUS:
        raise CostError(f"unknown GPU class {gpu!r}: use one of {', '.join(GPUS)}")
    return flops / (GPUS[gpu]["peak_tflops"] * 1e12 * UTILISATION)


def edit_estimate(family: str, width: int, height: int, embedding_steps: int = 500, finetune_steps: int = 500,
                  weight_format: str = "bf16", checkpointing: bool = True, **kwargs) -> dict:
    """Both training stages of one edit (defaults: imagic/defaults.py's 500 + 500 steps, the Fine-tune node's
    checkpointing): total FLOPs, estimated seconds per GPU class, and the larger stage's memory. Sampling not included."""
    s1 = estimate(family, width, height, "embedding", checkpointing=checkpointing, weight_format=weight_format, **kwargs)
    s2 = estimate(family, width, height, "finetune", checkpointing=checkpointing, weight_format=weight_format, **kwargs)
    flops = embedding_steps * s1["flops_per_step"] + finetune_steps * s2["flops_per_step"]
    return dict(flops=flops, seconds={g: seconds_for(flops, g) for g in GPUS},
                memory_bytes=max(s1["memory_bytes"], s2["memory_bytes"]), stages=(s1, s2), estimate=True)


def fits(est: dict, free_bytes: int, hints: bool = True) -> Tuple[bool, str]:
    """(whether the estimate fits ``free_bytes`` of GPU memory, a sentence for the user; with ``hints``, one
    that does not fit names what to change)."""
    need = est["memory_bytes"]
    parts = (f"{est['weights_bytes'] / GB:.1f} GB weights ({est['weights_label']}) + {est['step_bytes'] / GB:.1f} GB "
             f"for the step" + (f" + {est['dequantized_bytes'] / GB:.1f} GB of dequantized weight copies"
                                if est["dequantized_bytes"] else "")
             + f" + {est['trainable_bytes'] / GB:.1f} GB trained values and Adam state"
             + f" + {est['margin_bytes'] / GB:.1f} GB margin")
    what = (f"{NAMES.get(est['family'], est['family'])} at {est['width']}x{est['height']}, "
            + ("stage 1 (embedding" if est["stage"] == "embedding" else "stage 2 (LoRA")
            + (", checkpointing)" if est["checkpointing"] else ")"))
    text = f"{what} needs about {need / GB:.1f} GB (an estimate: {parts}); {free_bytes / GB:.1f} GB free"
    if need <= free_bytes:
        return True, text + ": it should fit."
    if not hints:
        return False, text + ": it may not fit."
    levers = []
    if not est["checkpointing"]:
        levers.append("turn on gradient checkpointing")
    if est["megapixels"] > 0.3:
        levers.append("edit a smaller image (memory grows with the pixels)")
    if est["sixteen_bit_weights"]:
        levers.append("load an fp8 or GGUF file")
    return False, text + ": it may not fit" + (f"; try to {', or '.join(levers)}." if levers else ".")


def summary(family: str, width: int, height: int, free_bytes: Optional[int] = None, gpu: Optional[str] = None,
            embedding_steps: int = 500, finetune_steps: int = 500, weight_format: str = "bf16") -> str:
    """A few lines for the user: memory per stage, and the edit's estimated time on ``gpu``."""
    e = edit_estimate(family, width, height, embedding_steps, finetune_steps, weight_format)
    lines = []
    for s in e["stages"]:
        ok, text = fits(s, free_bytes) if free_bytes is not None else (None, None)
        lines.append(text if text else f"{s['stage']}: about {s['memory_bytes'] / GB:.1f} GB (estimate)")
    if gpu is not None:
        lines.append(f"{embedding_steps} + {finetune_steps} steps: about {e['seconds'][gpu] / 60:.0f} min on a {gpu}-class "
                     f"card (estimate: {e['flops'] / 1e15:.0f} PFLOP at {UTILISATION:.0%} of its "
                     f"{GPUS[gpu]['peak_tflops']:g} TFLOP/s peak)")
    return "\n".join(lines)


def coefficients_differ(other: dict) -> bool:
    """Whether ``other`` (a cost_model.py run's coefficients) differ from FAMILIES beyond their 6 digits."""
    def close(a, b):
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        return abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1.0)
    return set(other) != set(FAMILIES) or any(set(other[k]) != set(FAMILIES[k]) or not all(
        close(other[k][q], FAMILIES[k][q]) for q in other[k]) for k in other)
