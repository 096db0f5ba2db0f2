"""Before the first step: will this training stage fit the device, and how long will it take?

``plan`` looks the MODEL's family up in the core's cost model (``imagic.cost``: FLOPs and memory per step,
counted at full width for each family; estimates until a GPU measures them), with the MODEL's own weight
bytes (``ModelPatcher.model_size``: the file's format as loaded) and the photo's size, and compares the
memory with what the device has free (``comfy.model_management.get_free_memory``). Three outcomes:

* it fits: the node says so, with the estimate;
* the weights do not all fit but the step does: the host's partial loading keeps the rest in RAM and
  streams it layer by layer (``ComfyDenoiser.loaded``), slower; the node says so;
* the step itself does not fit: refused before anything loads, with the levers (a smaller photo,
  checkpointing, an fp8 or GGUF file), instead of an out-of-memory error later.

On a CPU nothing is refused (the estimate is for a GPU's bf16 kernels, and RAM is the weights' home
anyway). Families without a cost model get no estimate and train as before. Internals touched: none.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

import comfy.model_management

from ...imagic import ImagicError, cost

GB = 1024 ** 3


@dataclass
class Plan:
    memory_required: int = 0  # bytes the step needs beside the weights: kept free when the model loads
    info: Optional[str] = None  # the estimate, for the node and the log


def gpu_class(device) -> Optional[str]:
    """The cost model's GPU class for a CUDA device, by its name (None when it is not one of them)."""
    if getattr(device, "type", None) != "cuda":
        return None
    name = torch.cuda.get_device_name(device).replace("NVIDIA", "").replace("GeForce", "").strip().lower()
    for gpu in sorted(cost.GPUS, key=len, reverse=True):
        if all(w.lower() in name for w in gpu.split()[:2]):
            return gpu
    return None


def decide(est: dict, free_bytes: int, on_gpu: bool, steps: int, gpu: Optional[str] = None) -> Plan:
    """The plan for an estimate and the device's free memory (a pure function: tests give it any numbers)."""
    ok, text = cost.fits(est, free_bytes, hints=False)  # (the levers below: what streaming leaves to change)
    beside = est["memory_bytes"] - est["weights_bytes"]
    if gpu is not None and steps > 0:
        s = cost.seconds_for(est["flops_per_step"], gpu)
        text += f" About {s:.1f} s/step on a {gpu}-class card, {s * steps / 60:.0f} min for {steps} steps (estimate)."
    if ok or not on_gpu:
        return Plan(beside, "estimate: " + text)
    if beside <= free_bytes:
        streamed = est["memory_bytes"] - free_bytes
        return Plan(beside, f"estimate: {text} The weights do not all fit: about {streamed / GB:.1f} GB of them stay in "
                            "RAM and stream to the GPU layer by layer, which is slower; an fp8 or GGUF file avoids it.")
    # What is left to change: the step's own memory (an fp8 or GGUF file shrinks the weights, which stream
    # from RAM already, not the step).
    levers = [f"a smaller photo (the step's memory grows with the pixels; {est['width']}x{est['height']} now)"]
    if not est["checkpointing"]:
        levers.append("gradient_checkpointing on")
    raise ImagicError(f"this training step will not fit the GPU: {text} Even with the weights streamed from RAM the "
                      f"step needs about {beside / GB:.1f} GB. Try " + "; or ".join(levers) + ".")


def plan(model, den, stage: str, method: str, checkpointing: bool, steps: int) -> Plan:
    """The plan for training ``model`` (a MODEL) in ``stage`` ("embedding" or "finetune") on ``den``'s photo size."""
    config = getattr(model.model, "model_config", None)
    try:
        family = cost.family_key(type(config).__name__)
        est = cost.estimate(family, int(den.width), int(den.height), stage=stage, method=method,
                            checkpointing=checkpointing, weight_format=None,
                            weight_bytes=int(model.model_size()), keeps_dequantized=False)
    except cost.CostError as e:
        logging.info("Imagic: no memory/time estimate: %s", e)
        return Plan()
    device = den.device
    free = int(comfy.model_management.get_free_memory(device)) + int(model.loaded_size())
    on_gpu = not comfy.model_management.is_device_cpu(device)
    result = decide(est, free, on_gpu, steps, gpu_class(device))
    logging.info("Imagic %s: %s", stage, result.info)
    return result
