"""Gradients through the host's inference code: in-place residual updates, and gradient checkpointing.

The DiTs update their residual stream in place (Flux's blocks: ``x += apply_mod(...)`` after a norm
that saved ``x`` for the backward pass), which autograd refuses, with or without checkpointing.
``OutOfPlaceAugmented`` runs such augmented assignments out of place while gradients are recorded;
it is switched on only for models where ``writes_saved_tensors`` finds such a write (a probe at the
first training call), because it costs every op a Python call (1.12x per step for SD1.5's stage 1
on a CPU). ``checkpointed`` wraps the network's highest modules in the host trainer's gradient
checkpointing, each block under the same mode, since autograd runs their forward again during the
backward pass, outside the model call. Internals touched: CPython bytecode of the calling frame
(``dis``, ``f_lasti``; see ``is_augmented_assignment``) and, through ``internals``, the host
trainer's checkpointing helpers.
"""
from __future__ import annotations

import contextlib
import dis
import functools
import re
import sys

import torch
import torch.utils.checkpoint

from ...imagic import ImagicError
from ...imagic.deltas import is_linear, is_tensor_subclass
from . import internals

_NB_OPS = getattr(dis, "_nb_ops", None)  # BINARY_OP's operator names (Python 3.11+)


def is_augmented_assignment(frame) -> bool:
    """Whether ``frame`` is executing ``a += b`` (or -=, *=, /=), as opposed to a call such as ``a.add_(b)``.

    Python 3.11-3.13 compile an augmented assignment to BINARY_OP with an NB_INPLACE_* argument (3.10:
    INPLACE_* opcodes); ``f_lasti`` is the offset of the instruction being executed. A method call is
    a CALL instruction, so explicit ``t.add_(u)`` is never matched.
    """
    code, i = frame.f_code.co_code, frame.f_lasti
    if i < 0 or i + 1 >= len(code):
        return False
    name, arg = dis.opname[code[i]], code[i + 1]
    if name == "BINARY_OP":
        return _NB_OPS is not None and arg < len(_NB_OPS) and _NB_OPS[arg][0].startswith("NB_INPLACE")
    return name.startswith("INPLACE_")


class OutOfPlaceAugmented(torch.overrides.TorchFunctionMode):
    """Runs ``x += y`` (and -=, *=, /=) as ``x = x + y`` while gradients are recorded.

    Python rebinds the name of an augmented assignment to whatever the operator returns, so returning
    a new tensor is the same computation without the write. Explicit calls such as ``t.add_(u)``,
    whose result the caller may ignore, are left as they are; so is everything under no_grad.
    ``x[i] += y`` stores its result back into ``x`` either way. What the mode cannot keep is a write
    through a view bound to a name (``v = x[:2]; v += y`` leaves ``x`` as it was): whether that
    matters depends on whether ``x`` is read again, so ``changes_the_result`` checks the whole model
    once, and a model where the mode changes the output is refused instead of trained.
    """

    OPS = {torch.Tensor.add_: torch.add, torch.Tensor.sub_: torch.sub, torch.Tensor.mul_: torch.mul,
           torch.Tensor.div_: torch.div}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out_of_place = self.OPS.get(func)
        if out_of_place is not None and torch.is_grad_enabled() and is_augmented_assignment(sys._getframe(1)):
            return out_of_place(*args, **kwargs)
        return func(*args, **kwargs)


def autograd_safe(forward, when=lambda: True):
    """``forward`` run under ``OutOfPlaceAugmented`` while ``when()`` holds."""
    @functools.wraps(forward)
    def safe(*args, **kwargs):
        if not when():
            return forward(*args, **kwargs)
        with OutOfPlaceAugmented():
            return forward(*args, **kwargs)

    return safe


def writes_saved_tensors(forward, x: torch.Tensor, *args, **kwargs) -> bool:
    """Does ``forward(x, ...)`` write, in place, a tensor autograd saved for the backward pass?

    Runs the forward with ``x`` requiring a gradient (so every activation does) and the backward pass
    for ``x`` only, so nothing accumulates into any parameter.
    """
    x = x.detach().clone().requires_grad_(True)
    try:
        out = forward(x, *args, **kwargs)
        torch.autograd.grad(out.float().sum(), [x], allow_unused=True)
    except RuntimeError as e:
        if "modified by an inplace operation" in str(e):
            return True
        kernel = re.search(r"backward through (\S+) but no autograd formula", str(e))
        if kernel:
            raise ImagicError(f"this ComfyUI runs the model with a kernel gradients cannot pass through "
                              f"({kernel.group(1)} has no backward), so Imagic cannot train it here: update "
                              "ComfyUI (newer versions switch to autograd-safe kernels while training)") from None
        raise
    return False


def changes_the_result(forward, x: torch.Tensor, *args, **kwargs) -> bool:
    """Does running ``forward(x, ...)`` under ``OutOfPlaceAugmented`` give another output than running it as
    written? Out of place and in place compute the same values, so any difference means the code wrote
    through a view whose base it reads again, which the mode does not keep."""
    with torch.no_grad():
        as_written = forward(x.detach(), *args, **kwargs).float()
    with torch.enable_grad(), OutOfPlaceAugmented():
        out_of_place = forward(x.detach().requires_grad_(True), *args, **kwargs).float()
    return not torch.allclose(as_written, out_of_place.detach(), rtol=1e-4, atol=1e-5)


LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def weight_made_per_call(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether the layer computes with a new tensor made from its stored weight at this call, rather than the
    stored weight itself: a quantized encoding (fp8 with a scale, mixed precision, GGUF) dequantized, a weight
    cast to the input's dtype or moved to its device (fp8 weight dtypes, weights the host streams from the
    CPU), or patched on the fly (an upstream LoRA on a streamed layer). Autograd would keep that tensor for
    the backward pass: one full-precision copy of the model over all layers."""
    w = layer._parameters.get("weight")
    if w is None:
        return False
    return (is_tensor_subclass(w) or w.dtype != x.dtype or w.device != x.device
            or bool(getattr(layer, "weight_function", None)))


@contextlib.contextmanager
def weights_made_again(network: torch.nn.Module):
    """Every frozen Linear/Conv of the network whose weight is made per call (``weight_made_per_call``) keeps
    only its input for the backward pass and makes the weight again there: the memory of
    quantized or streamed weights stays one layer's, at the cost of one more forward of those layers in the
    backward pass. A layer with a trained tensor (a full fine-tune's weight) runs as written."""
    done = []

    def wrap(layer, forward):
        @functools.wraps(forward)
        def made_again(x, *args, **kwargs):
            if (args or kwargs or not torch.is_grad_enabled() or not x.requires_grad
                    or not weight_made_per_call(layer, x) or layer.weight.requires_grad
                    or (layer.bias is not None and layer.bias.requires_grad)):
                return forward(x, *args, **kwargs)
            # Per-layer checkpointing, like the host trainer's OffloadCheckpointFunction for offloaded weights;
            # torch's own form, since the model code may write views of a layer's output in place, which a
            # custom Function's output refuses. No random numbers in a layer: no RNG state to keep.
            return torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False, preserve_rng_state=False)
        return made_again

    try:
        for m in network.modules():
            if isinstance(m, LAYERS) or is_linear(m):
                own = m.__dict__.get("forward")
                m.forward = wrap(m, m.forward)
                done.append((m, own))
        yield
    finally:
        for m, own in reversed(done):
            _restore(m, own)


class Checkpointing:
    """The blocks ``checkpointed`` wrapped, and a way to run the network without the wrapping for a while."""

    def __init__(self, blocks):
        self.blocks = blocks  # (module, its forward as checkpointed, its own instance forward or None)

    @contextlib.contextmanager
    def paused(self):
        """Every block runs its forward directly meanwhile. The probe for in-place writes needs this: inside a
        checkpointed block autograd keeps no saved tensors, so a write of one goes unseen, and the block's
        recomputation in the backward pass then reads the written values (silently wrong gradients)."""
        for m, _, own in self.blocks:
            _restore(m, own)
        try:
            yield
        finally:
            for m, wrapped, _ in self.blocks:
                m.forward = wrapped


def _restore(m, own):
    if own is None:
        m.__dict__.pop("forward", None)
    else:
        m.forward = own


@contextlib.contextmanager
def checkpointed(network: torch.nn.Module, when=lambda: True):
    """Gradient checkpointing on the network's highest modules with a forward (the host trainer's choice),
    each block's forward autograd-safe while ``when()`` holds; every module is as before afterwards.
    Yields a ``Checkpointing`` (``paused()`` runs the network unwrapped)."""
    find, patch, unpatch = internals.checkpointing_helpers()
    done = []
    try:
        for m in find(network):
            own = m.__dict__.get("forward")  # an instance forward, or None for the class's
            m.forward = autograd_safe(m.forward, when)
            patch(m)
            done.append((m, m.forward, own))
        yield Checkpointing(done)
    finally:
        for m, _, own in reversed(done):
            unpatch(m)
            _restore(m, own)
