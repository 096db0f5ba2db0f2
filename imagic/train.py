"""The three Imagic stages on any host that provides a ``Denoiser`` (see ``objective.py``).

1. ``optimize_embedding``: e_opt starts at e_tgt and is fitted to the image, the model frozen.
2. ``finetune``: e_opt frozen, a weight delta (LoRA or full) is fitted so that e_opt reconstructs
   the image. The model itself is never written to.
3. ``interpolate``: e = eta * e_tgt + (1 - eta) * e_opt.

Both training stages run the same loop (``run_training``) on the same objective.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .defaults import finetune_lr_warning
from .deltas import WeightDelta, make_delta
from .errors import ImagicCancelled, ImagicError, ImagicWarning
from .objective import Conditioning, Denoiser, denoising_loss, draw_noise

ProgressFn = Callable[[int, int, float], None]
CancelFn = Callable[[], bool]


def check_steps(name: str, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) and not (isinstance(steps, float) and steps.is_integer()):
        raise ImagicError(f"{name} must be a whole number, got {steps!r}")
    if steps < 0:
        raise ImagicError(f"{name} must be 0 (skip this stage) or more, got {steps}")
    return int(steps)


def check_conditioning(cond: Conditioning, what: str) -> None:
    if not cond:
        raise ImagicError(f"{what} is empty: connect the output of a text encoder")
    for k, v in cond.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise ImagicError(f"{what}[{k!r}] is not a floating-point tensor")
        if v.shape[0] != 1:
            raise ImagicError(f"{what}[{k!r}] has batch {v.shape[0]}; Imagic edits one image with one text (batch 1)")
        if not torch.isfinite(v).all():
            raise ImagicError(f"{what}[{k!r}] contains NaN or infinite values")


def check_latent(x0: torch.Tensor) -> None:
    if x0.ndim not in (4, 5):  # 5: [1, C, 1, H, W], the form video-VAE image models read (Qwen-Image)
        raise ImagicError(f"the image latent must be [1, C, H, W], got shape {tuple(x0.shape)}")
    if x0.shape[0] != 1:
        raise ImagicError(f"the image latent has a batch of {x0.shape[0]} images; Imagic edits one image: "
                          "pick one (e.g. with a 'Latent From Batch' node) before this node")
    if not torch.isfinite(x0).all():
        raise ImagicError("the image latent contains NaN or infinite values")


def run_training(params: Iterable[nn.Parameter], loss_fn: Callable[[], torch.Tensor], steps: int, lr: float,
                 stage: str, progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                 adam: str = "fast", step_in_backward: bool = False) -> List[float]:
    """Adam on ``params`` for ``steps`` steps of ``loss_fn``; the loss of each step is returned.

    Cancel is checked before every step, and a non-finite loss stops the run before it can
    corrupt the parameters. ``step_in_backward``: each tensor takes its Adam step as soon as its
    gradient is complete and then drops the gradient, so the gradients of all tensors never exist
    at once (one model-sized buffer less for a full fine-tune). The update is the same Adam: its
    state and step are per tensor either way.
    """
    params = [p for p in params]
    if lr <= 0 or not math.isfinite(lr):
        raise ImagicError(f"{stage}: learning rate must be a positive number, got {lr}")
    if adam not in ADAM_KINDS:
        raise ImagicError(f"adam must be one of {ADAM_KINDS}, got {adam!r}")

    def adam_on(ps):
        return torch.optim.Adam(ps, lr=lr, **(_fast_adam_kwargs(ps) if adam == "fast" else {"foreach": False}))

    hooks = []
    if step_in_backward:
        per_tensor = {id(p): adam_on([p]) for p in params}

        def step_now(p):
            per_tensor[id(p)].step()
            p.grad = None

        hooks = [p.register_post_accumulate_grad_hook(step_now) for p in params]
        opt = None
    else:
        opt = adam_on(params)
    losses: List[float] = []
    try:
        for step in range(steps):
            if cancel is not None and cancel():
                raise ImagicCancelled(f"{stage} cancelled at step {step} of {steps}")
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ImagicError(f"{stage}: the loss became {value} at step {step + 1} of {steps}. "
                                  f"Lower the learning rate (now {lr:g}) and try again.")
            loss.backward()
            if opt is not None:
                opt.step()
            losses.append(value)
            if progress is not None:
                progress(step + 1, steps, value)
    finally:
        for h in hooks:
            h.remove()
    return losses


ADAM_KINDS = ("fast", "plain")  # fast: fused on CUDA, the per-tensor loop elsewhere; plain: always that loop


def _fast_adam_kwargs(params: List[torch.Tensor]) -> dict:
    # fused Adam is one kernel for all tensors on CUDA.  On the CPU the per-tensor loop is the fast
    # one: foreach was 1.3x slower with 2.8 GB more peak memory for a full SD1.5 fine-tune
    # (benchmarks/results/speed_memory_cpu_sd15.md), because of its temporary per-step lists.
    if params and all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params):
        return {"fused": True}
    return {"foreach": False}


def loss_closure(denoiser: Denoiser, x0: torch.Tensor, cond_fn, noise_samples: int = 1, seed: int = 0):
    """The training loss of one step, as a function: fresh noise and noise levels from ``seed``'s stream
    at every call, and the denoising objective of the conditioning ``cond_fn()`` returns."""
    g = torch.Generator().manual_seed(int(seed))

    def loss_fn():
        noise, t = draw_noise(denoiser, x0, noise_samples, g)
        return denoising_loss(denoiser, x0, cond_fn(), noise, t)

    return loss_fn


def _watched(progress: Optional[ProgressFn], watch, state) -> Optional[ProgressFn]:
    """The progress callback, plus ``watch(step, state)`` after every step (state: what is being trained)."""
    if watch is None:
        return progress

    def both(step, total, loss):
        if progress is not None:
            progress(step, total, loss)
        watch(step, state)

    return both


def optimize_embedding(denoiser: Denoiser, x0: torch.Tensor, e_tgt: Conditioning, *, steps: int, lr: float,
                       seed: int = 0, noise_samples: int = 1, progress: Optional[ProgressFn] = None,
                       cancel: Optional[CancelFn] = None, adam: str = "fast", watch=None
                       ) -> Tuple[Conditioning, List[float]]:
    """Stage 1: e_opt, the embedding that best reconstructs x0 under the frozen model.

    Every tensor of the conditioning is optimized (for SDXL that includes the pooled vector).
    Returns e_opt (new tensors; e_tgt is untouched) and the loss per step. ``watch(step, e_opt)``,
    if given, sees the embedding being trained after every step (benchmarks measure with it).
    """
    steps = check_steps("embedding steps", steps)
    check_latent(x0)
    check_conditioning(e_tgt, "the target conditioning")
    e_opt = {k: nn.Parameter(v.detach().clone().float()) for k, v in e_tgt.items()}
    losses: List[float] = []
    if steps:
        loss_fn = loss_closure(denoiser, x0, lambda: e_opt, noise_samples, seed)
        losses = run_training(e_opt.values(), loss_fn, steps, lr, "embedding optimization",
                              _watched(progress, watch, e_opt), cancel, adam)
    return {k: v.detach().to(e_tgt[k].dtype) for k, v in e_opt.items()}, losses


def finetune(denoiser: Denoiser, x0: torch.Tensor, e_opt: Conditioning, *, steps: int, lr: float,
             method: str = "lora", rank: int = 4, seed: int = 0, noise_samples: int = 1,
             progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None, adam: str = "fast",
             watch=None, warn: Optional[Callable[[str], None]] = None, keep_trained_weights: bool = False
             ) -> Tuple[Optional[WeightDelta], List[float]]:
    """Stage 2: a weight delta with which the model reconstructs x0 from the frozen e_opt.

    The denoiser must provide ``trainable_module()`` (the network whose weights may change; used
    for names and shapes only) and ``attach(delta)`` (a context in which it computes with
    weight + delta). Returns the trained delta (None when steps is 0) and the loss per step.
    ``watch(step, delta)``, if given, is called after every step while the delta is attached.
    ``warn(message)`` reports a learning rate of the other method's size before training starts
    (``defaults.finetune_lr_warning``; default: an ImagicWarning).
    ``keep_trained_weights`` (full only): hand back the trained weights W' themselves, bound to this
    network (``FullDelta.bound_to``), instead of the differences W' - W: sampling the same network then
    reads W' as it is, with nothing to add per call, and saving forms the differences. For a caller that
    keeps the network; a caller that hands the model on (the ComfyUI node) takes the differences.
    """
    steps = check_steps("fine-tune steps", steps)
    check_latent(x0)
    check_conditioning(e_opt, "the optimized conditioning")
    if steps == 0:
        return None, []
    warning = finetune_lr_warning(method, lr)
    if warning:
        if warn is None:
            warnings.warn(warning, ImagicWarning, stacklevel=2)
        else:
            warn(warning)
    module = denoiser.trainable_module()
    delta = make_delta(method, module, rank, seed, device=x0.device)
    frozen = {k: v.detach() for k, v in e_opt.items()}
    loss_fn = loss_closure(denoiser, x0, lambda: frozen, noise_samples, seed)
    with denoiser.attach(delta):
        # A full fine-tune's gradients are model-sized: step each tensor as its gradient completes.
        losses = run_training(delta.parameters(), loss_fn, steps, lr, f"fine-tuning ({method})",
                              _watched(progress, watch, delta), cancel, adam, step_in_backward=method == "full")
    if not keep_trained_weights:  # a full delta's trained copies become the differences in place: no second copy
        delta.finish()
    return delta.requires_grad_(False), losses


def interpolate(e_tgt: Union[Conditioning, torch.Tensor], e_opt: Union[Conditioning, torch.Tensor], eta: float):
    """e = eta * e_tgt + (1 - eta) * e_opt; eta 0 gives e_opt, 1 gives e_tgt, both exactly.

    Values outside [0, 1] extrapolate along the same line.
    """
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise ImagicError(f"eta must be a number, got {eta!r}") from None
    if not math.isfinite(eta):
        raise ImagicError(f"eta must be a finite number, got {eta}")
    if isinstance(e_tgt, torch.Tensor) and isinstance(e_opt, torch.Tensor):
        return _lerp(e_tgt, e_opt, eta, "embedding")
    if set(e_tgt) != set(e_opt):
        raise ImagicError(f"target and optimized conditioning carry different parts: {sorted(e_tgt)} vs {sorted(e_opt)}")
    return {k: _lerp(e_tgt[k], e_opt[k], eta, k) for k in e_tgt}


def _lerp(a: torch.Tensor, b: torch.Tensor, eta: float, what: str) -> torch.Tensor:
    if a.shape != b.shape:
        raise ImagicError(f"cannot interpolate {what}: target has shape {tuple(a.shape)} and optimized has "
                          f"{tuple(b.shape)}. Use the optimized conditioning made from this same target text "
                          "and model (same token length and width).")
    # The endpoints are returned as copies, not computed, so they are exact whatever the dtype.
    if eta == 0.0:
        return b.clone()
    if eta == 1.0:
        return a.clone()
    return eta * a + (1.0 - eta) * b.to(a.dtype)
