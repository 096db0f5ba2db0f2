"""Training-free editors for rectified-flow models, the baselines Imagic is measured against.

Neither fine-tunes the model nor optimizes an embedding: both only call the model's velocity.

* ``flowedit``: FlowEdit (Kulikov, Kleiner, Huberman-Spiegelglas and Michaeli, "FlowEdit: Inversion-Free
  Text-Based Editing Using Pre-Trained Flow Models", 2024, arXiv:2412.08629). An ODE from the photo to the
  edit, driven by the difference between the target text's velocity at a point ``z_tar`` and the source
  text's at ``z_src``, where ``z_src`` is the photo noised afresh at each step and ``z_tar`` is the edit
  moved by the same noise. No inversion: the photo itself is the start. ``n_max`` (here ``strength`` times
  the steps) says how many of the steps, counted from the noisy end, are taken.
* ``rf_inversion``: RF-Inversion (Rout, Chen, Ruiz, Kumar, Caramanis, Shakkottai and Chu, "Semantic Image
  Inversion and Editing using Rectified Stochastic Differential Equations", 2024, arXiv:2410.10792). A
  controlled forward ODE from the photo to noise, pulled (strength ``gamma``) towards a fixed noise sample,
  then a controlled reverse ODE with the target text, pulled (strength ``eta_control``) towards the photo for
  the first ``stop`` fraction of the steps; after that the target text's velocity alone finishes.

Both follow diffusers' flow convention: x_sigma = (1 - sigma) x0 + sigma noise, the model predicts the
velocity noise - x0, and a step from sigma to sigma' adds (sigma' - sigma) times it. The code is this
project's; the papers' settings are scaled to the toy in ``benchmarks/edit_quality.py``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from .pipeline import ImagicPipeline, sampling_scheduler
from .train import ImagicError


def _flow_setup(pipe: ImagicPipeline, image, steps: int):
    den = pipe.denoiser(*pipe.load_image(image).size)
    if den.prediction_type != "flow":
        raise ImagicError("FlowEdit and RF-Inversion need a rectified-flow model (a FlowMatch scheduler); "
                          f"this model predicts {den.prediction_type!r}: use SDEdit (strength) for it instead")
    scheduler = sampling_scheduler(pipe.scheduler)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.float()  # steps + 1 values, from 1 (noise) down to 0 (image)
    photo = pipe.load_image(image)
    return den, sigmas, pipe.encode_image(photo)


def _velocity(den, x, sigma, cond, uncond, guidance):
    """Classifier-free guided velocity at noise level ``sigma`` for a batch x, cond/uncond one row each."""
    n = x.shape[0]
    ctx = {k: torch.cat([uncond[k].expand(n, *uncond[k].shape[1:]), cond[k].expand(n, *cond[k].shape[1:])])
           for k in cond}
    v_u, v_c = den.predict(torch.cat([x, x]), torch.full((2 * n,), float(sigma)), ctx).float().chunk(2)
    return v_u + guidance * (v_c - v_u)


def _check_strengths(strengths):
    bad = [s for s in strengths if not 0 <= s <= 1]
    if bad:
        raise ImagicError(f"strengths must be in [0, 1] (0 returns the photo, 1 takes every step), got {bad}")


@torch.no_grad()
def flowedit(pipe: ImagicPipeline, image, source_text: str, target_text: str, strengths: Sequence[float], *,
             steps: int, guidance_source: float, guidance_target: float, n_avg: int = 1,
             seed: int = 0) -> List:
    """FlowEdit of ``image`` from ``source_text`` to ``target_text``: one PIL image per strength (n_max / steps).

    The strengths run as one batch; each starts at its own step and all share the per-step noise.
    """
    _check_strengths(strengths)
    den, sigmas, x_src = _flow_setup(pipe, image, steps)
    c_src, c_tgt, uncond = pipe.encode_text(source_text), pipe.encode_text(target_text), pipe.encode_text("")
    b = len(strengths)
    first = torch.tensor([steps - int(round(s * steps)) for s in strengths])  # the step each one starts at
    z = x_src.expand(b, -1, -1, -1).clone()  # z^FE: starts at the photo itself (no inversion)
    g = torch.Generator().manual_seed(int(seed))
    for i in range(steps):
        active = first <= i
        if not active.any():
            continue
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v_delta = torch.zeros_like(z[active])
        for _ in range(n_avg):
            noise = torch.randn(x_src.shape, generator=g).to(x_src.device)
            z_src = (1 - sigma) * x_src + sigma * noise
            z_tar = z[active] + z_src - x_src
            v_delta += (_velocity(den, z_tar, sigma, c_tgt, uncond, guidance_target)
                        - _velocity(den, z_src, sigma, c_src, uncond, guidance_source)) / n_avg
        z[active] = z[active] + (sigma_next - sigma) * v_delta
    return pipe.decode(z)


@torch.no_grad()
def rf_inversion(pipe: ImagicPipeline, image, target_text: str, strengths: Sequence[float], *, steps: int,
                 guidance: float, gamma: float = 0.5, eta_control: float = 0.9, inversion_text: str = "",
                 seed: int = 0) -> List:
    """RF-Inversion edit of ``image`` towards ``target_text``: one PIL image per strength.

    Strength s sets the stopping time: the reverse ODE is pulled towards the photo for the first
    (1 - s) of its steps (the paper's tau = 1 - s; its Flux edits use tau about 0.25, i.e. s = 0.75).
    The inversion (with ``inversion_text``, the paper's empty prompt, unguided) is shared by all.
    """
    _check_strengths(strengths)
    den, sigmas, y0 = _flow_setup(pipe, image, steps)
    c_tgt, c_inv, uncond = pipe.encode_text(target_text), pipe.encode_text(inversion_text), pipe.encode_text("")
    g = torch.Generator().manual_seed(int(seed))
    y1 = torch.randn(y0.shape, generator=g).to(y0.device)  # the noise the inversion is pulled towards
    # Controlled forward ODE: image (sigma 0) to noise (sigma 1). Towards noise, the model's field is +v;
    # the conditional field towards y1 from Y at sigma is (y1 - Y) / (1 - sigma).
    rising = sigmas.flip(0)
    y = y0.clone()
    for i in range(steps):
        sigma, sigma_next = rising[i], rising[i + 1]
        u = _velocity(den, y, sigma, c_inv, uncond, 1.0)
        u_cond = (y1 - y) / (1 - sigma)
        y = y + (sigma_next - sigma) * (u + gamma * (u_cond - u))
    # Controlled reverse ODE: noise to image with the target text. Towards the image the model's field is -v;
    # the conditional field towards y0 from X at sigma is (y0 - X) / sigma.
    b = len(strengths)
    stop = torch.tensor([(1 - s) * steps for s in strengths])
    x = y.expand(b, -1, -1, -1).clone()
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        w = -_velocity(den, x, sigma, c_tgt, uncond, guidance)
        w_cond = (y0 - x) / sigma
        eta_i = torch.where(i < stop, eta_control, 0.0).view(b, 1, 1, 1).to(x.device)
        x = x + (sigma - sigma_next) * (w + eta_i * (w_cond - w))
    return pipe.decode(x)
