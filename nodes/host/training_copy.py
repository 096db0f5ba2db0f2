"""The private model a training stage runs on, so that the input MODEL is never trained through or changed.

``training_model`` gives a non-dynamic ModelPatcher whose weights are ordinary tensors (autograd
refuses to save the inference tensors the host's loaders make). A DynamicVRAM MODEL (0.33 on NVIDIA)
is reloaded as the host's own trainer does (``clone(force_deepcopy=True)``): the dynamic patcher may
hand autograd a VRAM-resident inference tensor or a reused transfer buffer, so it is never trained
through. A plain ModelPatcher gets a private network on the input's own memory (no copy): new
parameter objects, hooks and weight-function lists, the same storage. The private model carries the
MODEL's patches (an upstream LoRA), wrappers and options. Internals touched: torch's
``Module._parameters`` / ``_buffers`` / ``_modules`` (the structural copy below) and, through
``internals``, the patcher's restore bookkeeping and the loaded-model list.
"""
from __future__ import annotations

import copy

import torch

import comfy.utils

from ...imagic import ImagicError
from ...imagic.deltas import is_tensor_subclass
from . import internals


def _alias(t: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor on the same memory as ``t`` (an inference tensor, say): no copy is made.

    Autograd may save it for the backward pass. Only safe for tensors nobody writes: the frozen weights.
    """
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _private(t: torch.Tensor, parameter: bool) -> torch.Tensor:
    """The training network's own object for one of the input's tensors, on the same memory.

    A plain tensor gets an alias (a new ordinary tensor object on its storage). A tensor subclass (the
    host's QuantizedTensor for fp8 / mixed-precision files, ComfyUI-GGUF's GGMLTensor) is shared as it
    is: its storage is its quantized encoding, not its values (an alias would read the bytes as
    numbers), and its layer only ever reads it through its own dequantization into a new tensor, so
    autograd never saves it and nothing writes it.
    """
    if is_tensor_subclass(t):
        return t
    return torch.nn.Parameter(_alias(t), requires_grad=False) if parameter else _alias(t)


def aliased_network(module: torch.nn.Module) -> torch.nn.Module:
    """The same network with its own parameter and buffer objects on the same memory (``_alias``), and
    its own hooks and weight-function lists, so nothing done to it reaches the original module.

    A structural copy rather than ``copy.deepcopy``: the host's model objects hold state deepcopy
    cannot rebuild, and only the tensors and the per-module mutable containers must not be shared.
    """
    new = copy.copy(module)
    new._parameters = {k: None if v is None else _private(v, True) for k, v in module._parameters.items()}
    new._buffers = {k: None if v is None else _private(v, False) for k, v in module._buffers.items()}
    new._modules = {k: None if v is None else aliased_network(v) for k, v in module._modules.items()}
    for k, v in module.__dict__.items():
        if k.endswith("hooks") and isinstance(v, dict):
            setattr(new, k, type(v)(v))
        elif k in ("weight_function", "bias_function") and isinstance(v, list):
            setattr(new, k, list(v))
    return new


def training_model(model, reload: bool | None = None):
    """(private non-dynamic ModelPatcher of ``model``, whether its weights are memory of their own).

    Call outside inference mode. ``reload`` forces the host's reload (True) or the aliased network
    (False); by default a DynamicVRAM MODEL is reloaded and a plain one aliased. A DynamicVRAM MODEL
    the host cannot reload is refused with the way out.
    """
    if reload is None:
        reload = internals.is_dynamic(model)
    if reload:
        if not internals.can_reload(model):
            raise ImagicError("this MODEL cannot be copied for training: it uses DynamicVRAM and was not made by a "
                              "core loader node; load it with Load Checkpoint or Load Diffusion Model, or start "
                              "ComfyUI with --disable-dynamic-vram")
        return model.clone(force_deepcopy=True), True
    if internals.shares_patched_weights(model):
        # Another clone patched the shared weights in place: unloading it restores the originals first.
        internals.unload_where(lambda p: p.model is model.model)
    clone = model.clone()
    clone.model = aliased_network(model.model)
    internals.forget_restore_state(clone)
    if internals.patches_in_place(clone):
        # Patched weights would be written into the shared memory: give those keys memory of their own.
        for key in clone.patches:
            comfy.utils.set_attr_param(clone.model, key, comfy.utils.get_attr(clone.model, key).clone())
    return clone, False
