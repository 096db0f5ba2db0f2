"""The one objective both Imagic stages optimize: the diffusion model's own training loss.

Imagic never invents a new loss. Stage 1 (embedding) and stage 2 (fine-tune) both minimize the
denoising loss the model was trained with, on the single input latent. Which loss that is depends
on how the model was trained (its *prediction type*), so the host adapters only have to say these
things about their model (``Denoiser``), and this module does the rest:

* ``sample_timesteps(n, generator)``: n noise levels drawn uniformly over the model's training range,
  in the model's own units (diffusers: integer timesteps, ComfyUI: sigmas, flow models: t in [0, 1]);
* ``alpha_sigma(t)``: the signal and noise scales at those levels, ``x_t = alpha * x0 + sigma * noise``;
* ``predict(x_t, t, cond)``: the model's raw output in its own parameterization;
* ``noise_scale``: the factor the model's training noise was scaled by (1 for all but a few flow models).

Rectified-flow models fit the same form (alpha = 1 - t, sigma = t, target = noise - x0), so adding
one is a new adapter, not a new loss.
"""
from __future__ import annotations

from typing import ContextManager, Dict, Protocol, Tuple

import torch
import torch.nn.functional as F

Conditioning = Dict[str, torch.Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


class Denoiser(Protocol):
    """What a host (diffusers, ComfyUI) provides to the Imagic core."""

    prediction_type: str
    noise_scale: float  # x_t = alpha * x0 + sigma * (noise_scale * noise); 1 except e.g. HiDream-O1 (8)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def alpha_sigma(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...

    # Stage 2 only: the network whose weights may change (names and shapes), and a context in which
    # the denoiser computes with weight + delta(name) without writing to the network.
    def trainable_module(self) -> "torch.nn.Module": ...

    def attach(self, delta) -> "ContextManager[None]": ...


def training_target(prediction_type: str, x0, noise, alpha, sigma):
    """What the model learned to output for x_t = alpha * x0 + sigma * noise."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha * noise - sigma * x0
    if prediction_type == "flow":
        return noise - x0
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def expand_cond(cond: Conditioning, n: int) -> Conditioning:
    """Repeat a batch-1 conditioning for n noise samples (a view: gradients flow back to the one copy)."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def denoising_loss(denoiser: Denoiser, x0: torch.Tensor, cond: Conditioning,
                   noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the model's prediction and its training target.

    x0: the clean latent [1, C, H, W]; noise: [n, C, H, W]; t: [n] noise levels in the model's units.
    """
    n = noise.shape[0]
    # Some flow models were trained on scaled noise, x_t = (1 - t) x0 + t * (s * noise) (ComfyUI's
    # noise_scale, e.g. 8 for HiDream-O1): their velocity target is s * noise - x0.
    noise = noise * float(denoiser.noise_scale)
    alpha, sigma = denoiser.alpha_sigma(t)
    shape = (n,) + (1,) * (noise.ndim - 1)
    alpha = alpha.reshape(shape).to(noise)
    sigma = sigma.reshape(shape).to(noise)
    x0 = x0.to(noise).expand_as(noise)
    x_t = alpha * x0 + sigma * noise
    pred = denoiser.predict(x_t, t, expand_cond(cond, n))
    target = training_target(denoiser.prediction_type, x0, noise, alpha, sigma)
    # float32 reduction: under autocast the prediction may be half precision.
    return F.mse_loss(pred.float(), target.float())


def draw_noise(denoiser: Denoiser, x0: torch.Tensor, n: int, generator: torch.Generator):
    """Fresh Gaussian noise and noise levels, drawn on the CPU so a seed means the same on every device."""
    noise = torch.randn((n,) + tuple(x0.shape[1:]), generator=generator, dtype=torch.float32)
    t = denoiser.sample_timesteps(n, generator)
    return noise.to(x0.device), t


def held_out_pairs(denoiser: Denoiser, x0: torch.Tensor, count: int = 16, seed: int = 12345):
    """A fixed set of (noise, t) pairs, for measuring the objective the same way before and after."""
    g = torch.Generator().manual_seed(seed)
    return draw_noise(denoiser, x0, count, g)


@torch.no_grad()
def evaluate_objective(denoiser: Denoiser, x0: torch.Tensor, cond: Conditioning, pairs, batch: int = 4) -> float:
    """The objective averaged over fixed (noise, t) pairs: a noise-free measure of fit."""
    noise, t = pairs
    total = 0.0
    for i in range(0, noise.shape[0], batch):
        n = noise[i:i + batch]
        total += denoising_loss(denoiser, x0, cond, n, t[i:i + batch]).item() * n.shape[0]
    return total / noise.shape[0]
