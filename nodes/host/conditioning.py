"""The one conversion between ComfyUI's CONDITIONING and the core's embedding dict, both ways, and the
photo's latent as the model reads it.

A CONDITIONING is ``[[tensor, dict]]``: the text embedding, and a dict of everything else (the pooled
vector as ``pooled_output``, Flux's guidance, ControlNet's ``control``, areas, SDXL's sizes). The core
trains a dict ``{"context": tensor, "pooled": vector}``. ``embedding_of`` goes to the core,
``entry_of`` / ``conditioning_of`` come back keeping every other key of the dict, so nothing
downstream loses what the user connected. Internals touched: none (the model's ``model_config``,
``latent_format`` and ``process_latent_in`` are read as the sampler reads them).
"""
from __future__ import annotations

import torch

from ...imagic import ImagicError

POOLED = "pooled_output"  # the host's key for the pooled text vector


def single_conditioning(conditioning, what: str):
    """The one [tensor, dict] entry of a CONDITIONING, with a clear error for anything else."""
    if not isinstance(conditioning, list) or len(conditioning) == 0:
        raise ImagicError(f"{what} is empty: connect the output of a CLIP Text Encode node")
    if len(conditioning) != 1:
        raise ImagicError(f"{what} has {len(conditioning)} entries (e.g. from Conditioning Combine or Concat "
                          "with several areas); Imagic needs exactly one text: connect a single CLIP Text Encode")
    tensor, extra = conditioning[0]
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[0] != 1:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ImagicError(f"{what} has shape {shape}; expected [1, tokens, width] from one text")
    if not tensor.is_floating_point():
        raise ImagicError(f"{what} holds token ids ({tensor.dtype}), not a text embedding: this model reads its text "
                          "as tokens and encodes it inside the network, so there is no embedding for Imagic to optimize")
    return tensor, extra


def embedding_of(tensor: torch.Tensor, extra: dict) -> dict:
    """CONDITIONING entry -> the core's embedding: the text tensor, and the pooled vector where there is one."""
    e = {"context": tensor}
    if extra.get(POOLED) is not None:
        e["pooled"] = extra[POOLED]
    return e


def entry_of(e: dict, extra: dict, like: torch.Tensor | None = None):
    """The core's embedding -> a CONDITIONING entry ``(tensor, dict)``: ``extra``'s keys kept, the pooled
    vector replaced where ``e`` has one. ``like``: the text tensor the entry stands for; the new tensors get
    its dtype (the pooled vector that of ``extra``'s), as a node's output should have."""
    context, out = e["context"], dict(extra)
    if "pooled" in e:
        pooled = e["pooled"]
        if like is not None:
            old = extra.get(POOLED)
            pooled = pooled.to(old.dtype if old is not None else like.dtype)
        out[POOLED] = pooled
    if like is not None:
        context = context.to(like.dtype)
    return context, out


def conditioning_of(e: dict, extra: dict, like: torch.Tensor | None = None) -> list:
    """The core's embedding -> a CONDITIONING (``[[tensor, dict]]``), see ``entry_of``."""
    return [list(entry_of(e, extra, like))]


def text_embedding(den, tensor: torch.Tensor, extra: dict) -> dict:
    """The conditioning as the core trains it: float copies on the training device, the pooled vector only
    where the model reads it (SDXL, Flux), so stage 1 optimizes nothing the model ignores."""
    e = {k: v.clone().float().to(den.device) for k, v in embedding_of(tensor, extra).items()}
    if "pooled" in e and not den.uses_pooled(e["pooled"]):
        del e["pooled"]
    return e


def check_family(model, tensor: torch.Tensor, what: str) -> None:
    unet_config = getattr(model.model, "model_config", None)
    width = (getattr(unet_config, "unet_config", {}) or {}).get("context_dim") if unet_config else None
    if width is not None and tensor.shape[-1] != width:
        raise ImagicError(f"{what} is {tensor.shape[-1]} wide but this MODEL expects {width}: the text encoder "
                          "(CLIP) and the MODEL come from different model families; load both from the same checkpoint")


def image_size(extra: dict, latent: dict) -> tuple[int, int]:
    """(width, height) in pixels for size conditioning (SDXL): the conditioning's own, else the latent's x8."""
    h, w = latent["samples"].shape[-2:]
    return int(extra.get("width", w * 8)), int(extra.get("height", h * 8))


def latent_for(model, latent: dict) -> torch.Tensor:
    """The photo's latent as the model reads it (``process_latent_in``), with clear errors for anything else."""
    samples = latent["samples"]
    if getattr(samples, "is_nested", False) or samples.ndim not in (4, 5):
        raise ImagicError(f"the latent has shape {tuple(samples.shape)}; Imagic needs one image latent [1, C, H, W]")
    # As the sampler does (comfy.sample.fix_empty_latent_channels): models with video-style latents
    # (Qwen-Image) read an image as [B, C, 1, H, W].
    if getattr(model.model.latent_format, "latent_dimensions", 2) == 3 and samples.ndim == 4:
        samples = samples.unsqueeze(2)
    if samples.shape[0] != 1:
        raise ImagicError(f"the latent holds a batch of {samples.shape[0]} images; Imagic edits one image: pick one "
                          "with 'Latent From Batch' (batch_index, length 1) before this node")
    if samples.ndim == 5 and samples.shape[2] != 1:
        raise ImagicError(f"the latent holds {samples.shape[2]} frames; Imagic edits one image (one frame)")
    channels = model.model.latent_format.latent_channels
    if samples.shape[1] != channels:
        raise ImagicError(f"the latent has {samples.shape[1]} channels but this MODEL works on {channels}: "
                          "encode the photo with the VAE of the same checkpoint")
    return model.model.process_latent_in(samples.clone().float())
