"""The memory a row needs, estimated before it runs (rows that cannot fit are skipped, not crashed)."""
from __future__ import annotations

from .configs import lora_side_branch, param_count
from .measure import GB

# For the estimates: activations in GB at latent 32 (scaled by area), and what stage 2 needs besides
# activations and the weight copies (per-layer transients, allocator slack). Measured on SD1.5
# (stage 1 +0.8 GB; LoRA stage 2 +2.2 GB at latent 32 and +1.8 GB at latent 8 over the merged
# weights); SDXL assumed to scale with its parameter count.
ACTIVATION_GB_32 = {"sd15": dict(embedding=0.8, finetune=0.6), "sdxl": dict(embedding=1.6, finetune=1.2)}
STAGE2_FIXED_GB = {"sd15": 1.6, "sdxl": 5.0}
# The worker process itself (Python, torch, allocator slack); importing the host adds about 0.4 GB
# (measured: 0.79 GB RSS after loading a 5 M-parameter host model, 0.39 GB with diffusers).
PROCESS_GB = {"diffusers": 0.5, "host": 0.9}


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
        copies = {"none": 1, "side": 1, "merged": 2 if cfg["method"] == "full" else 1, "cached": 3, "in_place": 2}
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
