"""The two training stages as the nodes run them: prepare, load, run cancellable with progress, hand back.

``optimize_embedding_stage`` and ``finetune_stage`` are the whole of what Optimize Embedding and
Fine-tune UNet do with their inputs; the nodes only translate widgets to arguments, and the speed
benchmark calls the same functions, so what it times is what a node runs. ``on_start`` (called once
the training copy is loaded, with the core's embedding) and ``on_step`` (after every step) let a
caller watch without changing anything. Internals touched: none beyond the rooms it calls.
"""
from __future__ import annotations

import logging

import torch

import comfy.sd

from ...imagic import ImagicError, finetune, optimize_embedding
from ...imagic.deltas import WeightDelta
from . import estimate, families
from .conditioning import check_family, conditioning_of, image_size, latent_for, single_conditioning, text_embedding
from .denoiser import ComfyDenoiser
from .progress import NodeProgress, cancellable

PREFIX = "diffusion_model."  # where the host's LoRA loader looks for the diffusion model's keys


def prepare(model, conditioning, latent, what: str):
    """(text tensor, its dict, the ComfyDenoiser) for a training node's inputs, with their errors checked."""
    tensor, extra = single_conditioning(conditioning, what)
    check_family(model, tensor, what)
    # SDXL's size conditioning is in pixels; the host's SD/SDXL latents are 8x downscaled.
    return tensor, extra, ComfyDenoiser(model, extra, *image_size(extra, latent))


def family_warning(model):
    """None for a tested family; the warning for an untested one; ImagicError for a refused one."""
    config = getattr(model.model, "model_config", None)
    name, verdict, note = families.verdict(type(config).__name__ if config is not None else "unknown")
    if verdict == families.REFUSED:
        raise ImagicError(f"{name} cannot be edited with Imagic: {note}")
    if verdict == families.UNTESTED:
        message = (f"{name} is not tested with Imagic ({note}); the objective follows its model sampling, but "
                   "check the loss goes down and the eta 0 image reproduces the photo")
        logging.warning("Imagic: %s", message)
        return message
    return None


def _notes(*notes):
    return "\n".join(n for n in notes if n) or None


def planned(model, den, progress, stage, method, gradient_checkpointing, steps) -> int:
    """The estimate on the node before the first step (refused here if the step cannot fit); the bytes to keep free."""
    plan = estimate.plan(model, den, stage, method, gradient_checkpointing, steps)
    progress.info = plan.info
    return plan.memory_required


def streamed_note(den, progress):
    """Say on the node how much of the model streams from RAM, once it is loaded."""
    if den.offloaded_bytes > 0:
        progress.info = _notes(progress.info, f"{den.offloaded_bytes / estimate.GB:.1f} GB of the weights stream from "
                                              "RAM layer by layer (they do not fit beside the training step)")


def optimize_embedding_stage(model, conditioning, latent, *, steps: int, lr: float, seed: int,
                             gradient_checkpointing: bool = False, node_id=None, adam: str = "fast", on_start=None,
                             on_step=None):
    """Stage 1 on a MODEL: (e_opt as a CONDITIONING with the input's keys, loss per step). The MODEL is not changed."""
    tensor, extra, den = prepare(model, conditioning, latent, "the conditioning")
    progress = NodeProgress(max(steps, 1), node_id, "embedding", note=family_warning(model), also=on_step)
    keep_free = planned(model, den, progress, "embedding", "lora", gradient_checkpointing, steps)
    with den.loaded(gradient_checkpointing, keep_free):
        streamed_note(den, progress)
        x0 = latent_for(model, latent).to(den.device)
        e_tgt = text_embedding(den, tensor, extra)
        if on_start is not None:
            on_start(den, e_tgt)
        e_opt, losses = cancellable(lambda: optimize_embedding(
            den, x0, e_tgt, steps=steps, lr=lr, seed=seed, progress=progress, cancel=progress.cancel, adam=adam))
    return conditioning_of({k: v.cpu() for k, v in e_opt.items()}, extra, like=tensor), losses


def finetune_stage(model, conditioning, latent, *, steps: int, lr: float, seed: int, method: str, rank: int,
                   gradient_checkpointing: bool, node_id=None, adam: str = "fast", on_start=None, on_step=None):
    """Stage 2 on a MODEL: (a patched clone of it, the LORA_MODEL for Save LoRA, loss per step).

    The learning-rate warning of the core (``defaults.finetune_lr_warning``) goes to the log and above
    the node's progress read-out.
    """
    tensor, extra, den = prepare(model, conditioning, latent, "the optimized conditioning")
    if steps == 0:
        return model.clone(), {}, []
    progress = NodeProgress(steps, node_id, f"fine-tune ({method})", note=family_warning(model), also=on_step)

    def warn(message):
        logging.warning("Imagic Fine-tune UNet: %s", message)
        progress.note = _notes(progress.note, message)

    keep_free = planned(model, den, progress, "finetune", method, gradient_checkpointing, steps)
    with den.loaded(gradient_checkpointing, keep_free):
        streamed_note(den, progress)
        x0 = latent_for(model, latent).to(den.device)
        e_opt = text_embedding(den, tensor, extra)
        if on_start is not None:
            on_start(den, e_opt)
        delta, losses = cancellable(lambda: finetune(
            den, x0, e_opt, steps=steps, lr=lr, method=method, rank=rank, seed=seed, progress=progress,
            cancel=progress.cancel, adam=adam, warn=warn))
    with torch.inference_mode(False):
        delta = delta.cpu()
    patched, lora_sd = patched_model(model, delta)
    return patched, lora_sd, losses


def patched_model(model, delta: WeightDelta):
    """(MODEL with the delta as ordinary LoRA/diff patches, LORA_MODEL state dict for Save LoRA)."""
    lora_sd = delta.to_state_dict(prefix=PREFIX)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
    return patched, lora_sd
