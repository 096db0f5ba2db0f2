"""The Imagic core on ComfyUI's model management: the ``Denoiser`` adapter and conditioning glue.

Training runs on a private, non-dynamic model made once per stage outside inference mode
(``training_model``): a DynamicVRAM MODEL is reloaded as the host's own trainer does
(``clone(force_deepcopy=True)``), so the dynamic patcher, which may hand autograd a VRAM-resident
inference tensor or a reused transfer buffer, is never trained through; a plain ModelPatcher gets a
private network whose weights are ordinary tensors on the input's own memory (no copy). Either way
the frozen weights are used as they are at every step (no per-call copy), and the private model
carries the MODEL's patches (an upstream LoRA), wrappers and options. The trained delta is applied
by ``imagic.deltas.applied``, the same code the diffusers path uses: LoRA as a side branch of each
layer. The input MODEL, and every other user of it, never sees a change; the private model is
dropped when the stage ends.
"""
from __future__ import annotations

import contextlib
import copy
import dis
import functools
import inspect
import sys
from typing import List

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sd
import comfy.utils

from ..imagic import ImagicCancelled, ImagicError
from ..imagic.deltas import WeightDelta, applied

PREFIX = "diffusion_model."


def _kind(ms) -> str:
    """The host's names for a model sampling: the noise schedule and the prediction kind it combines."""
    names = [c.__name__ for c in type(ms).__mro__ if c.__module__ == comfy.model_sampling.__name__]
    return " + ".join(names) if names else type(ms).__name__


def prediction_type_of(model) -> str:
    """The parameterization the MODEL was trained in, from the model sampling the sampler uses."""
    ms = model.get_model_object("model_sampling")
    kinds = comfy.model_sampling
    img2img_flow = getattr(kinds, "IMG_TO_IMG_FLOW", None)
    if img2img_flow is not None and isinstance(ms, img2img_flow):
        raise ImagicError(f"this model's parameterization ({_kind(ms)}: an image-to-image flow model that "
                          "predicts the clean image from the image, with no noise) has no denoising objective Imagic "
                          "can train; use a text-to-image model")
    if isinstance(ms, kinds.CONST):
        return "flow"
    if isinstance(ms, kinds.V_PREDICTION) and not isinstance(ms, kinds.EDM):
        return "v_prediction"
    if isinstance(ms, kinds.EPS) and not isinstance(ms, (kinds.V_PREDICTION, kinds.X0)):
        return "epsilon"
    raise ImagicError(f"this model's parameterization ({_kind(ms)}) is not supported by Imagic yet: it trains "
                      "epsilon, v-prediction and flow (velocity) models")


def _unload_where(match) -> None:
    """Unload, and forget, every loaded patcher for which ``match(patcher)`` holds."""
    mm = comfy.model_management
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        patcher = mm.current_loaded_models[i].model
        if patcher is not None and match(patcher):
            mm.current_loaded_models.pop(i).model_unload()


def _alias(t: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor on the same memory as ``t`` (an inference tensor, say): no copy is made.

    Autograd may save it for the backward pass, which it refuses for the inference tensors the
    host's loaders make. Only safe for tensors nobody writes: the frozen weights.
    """
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _aliased_network(module: torch.nn.Module) -> torch.nn.Module:
    """The same network with its own parameter and buffer objects on the same memory (``_alias``), and
    its own hooks and weight-function lists, so nothing done to it reaches the original module.

    A structural copy rather than ``copy.deepcopy``: the host's model objects hold state deepcopy
    cannot rebuild, and only the tensors and the per-module mutable containers must not be shared.
    """
    new = copy.copy(module)
    new._parameters = {k: None if v is None else torch.nn.Parameter(_alias(v), requires_grad=False)
                       for k, v in module._parameters.items()}
    new._buffers = {k: None if v is None else _alias(v) for k, v in module._buffers.items()}
    new._modules = {k: None if v is None else _aliased_network(v) for k, v in module._modules.items()}
    for k, v in module.__dict__.items():
        if k.endswith("hooks") and isinstance(v, dict):
            setattr(new, k, type(v)(v))
        elif k in ("weight_function", "bias_function") and isinstance(v, list):
            setattr(new, k, list(v))
    return new


def training_model(model, reload: bool | None = None):
    """(private, non-dynamic ModelPatcher of ``model`` with ordinary weight tensors, whether its weights
    are copies of their own) for a training stage. Call outside inference mode.

    A DynamicVRAM MODEL (0.33 on NVIDIA) is reloaded as the host's own trainer does
    (``clone(force_deepcopy=True)``, a fresh non-dynamic load through the loader's
    ``cached_patcher_init``): its weights are never trained through, and it stays loaded where it
    is. A plain ModelPatcher gets a private network whose weights share the input's memory
    (``_aliased_network``): no copy, and the input's weights are only ever read. ``reload`` forces
    one or the other (tests). A DynamicVRAM MODEL that cannot be reloaded is refused.
    """
    dynamic = getattr(model, "is_dynamic", lambda: False)()
    can_reload = ("force_deepcopy" in inspect.signature(model.clone).parameters
                  and getattr(model, "cached_patcher_init", None) is not None)
    if reload is None:
        reload = dynamic
    if reload:
        if not can_reload:
            raise ImagicError("this MODEL cannot be copied for training: it uses DynamicVRAM and was not made by a "
                              "core loader node; load it with Load Checkpoint or Load Diffusion Model, or start "
                              "ComfyUI with --disable-dynamic-vram")
        return model.clone(force_deepcopy=True), True
    if getattr(model, "backup", None):
        # Another clone patched the shared weights in place: unloading it restores the originals first.
        _unload_where(lambda p: p.model is model.model)
    clone = model.clone()
    clone.model = _aliased_network(model.model)
    clone.backup, clone.object_patches_backup = {}, {}
    if hasattr(clone, "pinned"):
        clone.pinned = set()
    if getattr(clone, "weight_inplace_update", False):
        # Patched weights would be written into the shared memory: give those keys memory of their own.
        for key in clone.patches:
            comfy.utils.set_attr_param(clone.model, key, comfy.utils.get_attr(clone.model, key).clone())
    return clone, False


# ---------------------------------------------------------------------------------------------
# Autograd through the host's inference code

_NB_OPS = getattr(dis, "_nb_ops", None)  # BINARY_OP's operator names (Python 3.11+)


def _is_augmented_assignment(frame) -> bool:
    """Whether ``frame`` is executing ``a += b`` (or -=, *=, /=), as opposed to a call such as ``a.add_(b)``."""
    code, i = frame.f_code.co_code, frame.f_lasti
    if i < 0 or i + 1 >= len(code):
        return False
    name, arg = dis.opname[code[i]], code[i + 1]
    if name == "BINARY_OP":
        return _NB_OPS is not None and arg < len(_NB_OPS) and _NB_OPS[arg][0].startswith("NB_INPLACE")
    return name.startswith("INPLACE_")  # Python 3.10


class _OutOfPlaceAugmented(torch.overrides.TorchFunctionMode):
    """Runs ``x += y`` in the host's model code as ``x = x + y`` while gradients are recorded.

    The DiTs update their residual stream in place (Flux's blocks: ``x += apply_mod(...)`` after a
    norm that saved ``x`` for the backward pass), which autograd refuses, with or without gradient
    checkpointing. Python rebinds the name of an augmented assignment to whatever the operator
    returns, so returning a new tensor is the same computation without the write; explicit calls
    such as ``t.add_(u)``, whose result the caller may ignore, are left as they are.
    """

    OPS = {torch.Tensor.add_: torch.add, torch.Tensor.sub_: torch.sub, torch.Tensor.mul_: torch.mul,
           torch.Tensor.div_: torch.div}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out_of_place = self.OPS.get(func)
        if out_of_place is not None and torch.is_grad_enabled() and _is_augmented_assignment(sys._getframe(1)):
            return out_of_place(*args, **kwargs)
        return func(*args, **kwargs)


def _autograd_safe(forward, when=lambda: True):
    """``forward`` run under ``_OutOfPlaceAugmented`` while ``when()`` holds: for the model call, and for
    each checkpointed block, whose forward autograd runs again during the backward pass, outside the
    model call."""
    @functools.wraps(forward)
    def safe(*args, **kwargs):
        if not when():
            return forward(*args, **kwargs)
        with _OutOfPlaceAugmented():
            return forward(*args, **kwargs)

    return safe


def _writes_saved_tensors(error: RuntimeError) -> bool:
    return "modified by an inplace operation" in str(error)


class ComfyDenoiser:
    """``imagic.objective.Denoiser`` for a ComfyUI ModelPatcher (SD1.x, SD2.x v-pred, SDXL, flow models).

    The training copy exists only inside ``loaded()``.
    """

    def __init__(self, model, cond_extra: dict, width: int, height: int):
        self.source = model
        self.prediction_type = prediction_type_of(model)
        self.ms = model.get_model_object("model_sampling")
        self.noise_scale = float(getattr(self.ms, "noise_scale", 1.0))  # CONST.noise_scaling's factor
        self.cond_extra = dict(cond_extra)
        self.width, self.height = width, height
        self.patcher = self.base = self._apply_model = None
        self.owns_weights = False  # whether the training copy's weights are its own memory
        self.reload = None  # training_model's choice (tests force one)
        self.device = comfy.model_management.get_torch_device()
        self._checkpointed: List[tuple] = []  # (module, its own instance forward or None)
        # Whether the model code writes tensors autograd saved (Flux's x += ...), so training must run
        # it out of place: found out by a probe at the first training call (None: not yet). The probe
        # costs one small forward and backward; running every model under the mode would cost each op
        # a Python call (measured: 1.12x per step for SD1.5's stage 1 on a CPU).
        self.out_of_place = None

    # -- Denoiser protocol ---------------------------------------------------------------
    def sample_timesteps(self, n, generator):
        sigmas = self.ms.sigmas.float().cpu()
        idx = torch.randint(0, len(sigmas), (n,), generator=generator)
        return sigmas[idx].to(self.device)

    def alpha_sigma(self, s):
        s = s.float()
        if self.prediction_type == "flow":
            return 1 - s, s
        # The host's k-diffusion form x = x0 + s * noise is the DDPM form scaled by sqrt(1 + s^2).
        norm = torch.rsqrt(1 + s * s)
        return norm, s * norm

    def predict(self, x_t, s, cond):
        n = x_t.shape[0]
        shape = (n,) + (1,) * (x_t.ndim - 1)
        sv = s.float().reshape(shape)
        x_in = x_t if self.prediction_type == "flow" else x_t * torch.sqrt(1 + sv * sv)
        model_options = self.patcher.model_options
        transformer_options = dict(model_options.get("transformer_options", {}))
        transformer_options["sigmas"] = s
        transformer_options["cond_or_uncond"] = [0] * n
        wrapper = model_options.get("model_function_wrapper")
        c = dict(self.model_inputs(cond, x_in), transformer_options=transformer_options)
        if self.out_of_place is None and torch.is_grad_enabled():
            self.out_of_place = self._probe_in_place_writes(x_in, s, c)
        if wrapper is not None:
            x0 = wrapper(self._apply_model, {"input": x_in, "timestep": s, "c": c, "cond_or_uncond": [0] * n})
        else:
            x0 = self._apply_model(x_in, s, **c)
        x0 = x0.float()
        out = (x_in - x0) / sv  # epsilon, or the flow velocity for CONST models
        if self.prediction_type == "v_prediction":
            alpha, sigma = self.alpha_sigma(sv)
            return alpha * out - sigma * x0
        return out

    def _probe_in_place_writes(self, x_in, s, c) -> bool:
        """The model on this input with the input requiring a gradient (so every activation does), and
        the backward pass for the input only (nothing accumulates into any parameter): does autograd
        find a tensor it saved written in place?"""
        x = x_in.detach().clone().requires_grad_(True)
        try:
            out = self.base.apply_model(x, s, **c)
            torch.autograd.grad(out.float().sum(), [x], allow_unused=True)
        except RuntimeError as e:
            if _writes_saved_tensors(e):
                return True
            raise
        return False

    def trainable_module(self):
        return self.base.diffusion_model

    def attach(self, delta):
        # A full fine-tune reads only its trained copy: the base values wait outside memory meanwhile. On
        # the aliased path they are the input MODEL's own memory, so its parameters wait with them (no
        # other node runs meanwhile) and are back, bit for bit and where they were, when training ends.
        also = None if self.owns_weights else self.source.model.diffusion_model
        return applied(delta, self.base.diffusion_model, offload_base=True, offload_also=also)

    # -- host specifics --------------------------------------------------------------------
    def model_inputs(self, cond, x_in):
        """The model's keyword inputs for this conditioning, made as the sampler makes them.

        The host's own conversion (``encode_model_conds`` with the model's ``extra_conds``, then each
        input's ``process_cond`` for the batch, as ``calc_cond_batch`` does): the text embedding as
        cross-attention, SDXL's pooled vector and size conditioning as ``y``, and every other key the
        model reads from the conditioning dict. The trained tensors (``context``, ``pooled``) stay
        differentiable through it.
        """
        import comfy.samplers

        entry = {k: v for k, v in self.cond_extra.items() if k not in ("pooled_output", "model_conds")}
        entry.update(cross_attn=cond["context"], model_conds={}, width=self.width, height=self.height)
        if "pooled" in cond:
            entry["pooled_output"] = cond["pooled"]
        elif self.cond_extra.get("pooled_output") is not None:
            entry["pooled_output"] = self.cond_extra["pooled_output"].to(x_in.device)
        (converted,) = comfy.samplers.encode_model_conds(self.base.extra_conds, [entry], x_in, x_in.device, "positive")
        n = x_in.shape[0]
        return {k: v.process_cond(batch_size=n, area=None).concat([]) for k, v in converted["model_conds"].items()}

    def uses_pooled(self, pooled) -> bool:
        """Whether the model reads the pooled vector (SDXL, Flux: its ``encode_adm`` gives a vector)."""
        return pooled is not None and self.base.encode_adm(pooled_output=pooled, width=self.width,
                                                           height=self.height) is not None

    @contextlib.contextmanager
    def loaded(self, gradient_checkpointing: bool = False):
        """Make and load the training copy; always unload it, undo checkpointing and drop the copy."""
        from comfy_extras.nodes_train import find_all_highest_child_module_with_forward, patch, unpatch

        mm = comfy.model_management
        with torch.inference_mode(False), torch.enable_grad():
            was_training = getattr(mm, "in_training", None)
            try:
                self.patcher, self.owns_weights = training_model(self.source, self.reload)
                self.base = self.patcher.model
                self.base.requires_grad_(False)
                self._apply_model = _autograd_safe(self.base.apply_model, lambda: bool(self.out_of_place))
                mm.load_models_gpu([self.patcher], memory_required=0, force_full_load=True)
                if was_training is not None:
                    # Some models switch to autograd-safe kernels while this is set (the host's trainer sets it).
                    mm.in_training = True
                if gradient_checkpointing:
                    for m in find_all_highest_child_module_with_forward(self.base.diffusion_model):
                        own = m.__dict__.get("forward")
                        m.forward = _autograd_safe(m.forward, lambda: bool(self.out_of_place))  # run again in backward
                        patch(m)
                        self._checkpointed.append((m, own))
                yield self
            finally:
                if was_training is not None:
                    mm.in_training = was_training
                for m, own in self._checkpointed:
                    unpatch(m)
                    if own is None:
                        del m.forward  # the class's forward again
                    else:
                        m.forward = own
                self._checkpointed.clear()
                self.unload()

    def unload(self):
        if self.patcher is None:
            return
        _unload_where(lambda p: p is self.patcher)
        self.patcher.unpatch_model()
        self.patcher = self.base = self._apply_model = None
        comfy.model_management.soft_empty_cache()


# ---------------------------------------------------------------------------------------------
# Conditioning, latent and progress glue


def single_conditioning(conditioning, what: str):
    """The one [tensor, dict] entry of a CONDITIONING, with a clear error for anything else."""
    if not isinstance(conditioning, list) or len(conditioning) == 0:
        raise ImagicError(f"{what} is empty: connect the output of a CLIP Text Encode node")
    if len(conditioning) != 1:
        raise ImagicError(f"{what} has {len(conditioning)} entries (e.g. from Conditioning Combine or Concat "
                          "with several areas); Imagic needs exactly one text: connect a single CLIP Text Encode")
    tensor, extra = conditioning[0]
    if tensor.ndim != 3 or tensor.shape[0] != 1:
        raise ImagicError(f"{what} has shape {tuple(tensor.shape)}; expected [1, tokens, width] from one text")
    return tensor, extra


def check_family(model, tensor, what: str):
    unet_config = getattr(model.model, "model_config", None)
    width = (getattr(unet_config, "unet_config", {}) or {}).get("context_dim") if unet_config else None
    if width is not None and tensor.shape[-1] != width:
        raise ImagicError(f"{what} is {tensor.shape[-1]} wide but this MODEL expects {width}: the text encoder "
                          "(CLIP) and the MODEL come from different model families; load both from the same checkpoint")


def latent_for(model, latent: dict) -> torch.Tensor:
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


def prepare_training(model, conditioning, latent, what):
    """(text tensor, its dict, the ComfyDenoiser) for a training node's inputs, with their errors checked."""
    tensor, extra = single_conditioning(conditioning, what)
    check_family(model, tensor, what)
    h, w = latent["samples"].shape[-2:]
    # SDXL's size conditioning is in pixels; the host's SD/SDXL latents are 8x downscaled.
    return tensor, extra, ComfyDenoiser(model, extra, int(extra.get("width", w * 8)), int(extra.get("height", h * 8)))


def text_embedding(den, tensor, extra):
    """The conditioning as the core sees it; the pooled vector only where the model uses it (SDXL)."""
    e = {"context": tensor.clone().float().to(den.device)}
    pooled = extra.get("pooled_output")
    if pooled is not None:
        pooled = pooled.clone().float().to(den.device)
        if den.uses_pooled(pooled):
            e["pooled"] = pooled
    return e


class NodeProgress:
    """The host's progress bar plus a loss read-out on the node, and the Cancel check."""

    def __init__(self, total: int, node_id, label: str, note: str | None = None):
        self.bar = comfy.utils.ProgressBar(total)
        self.node_id, self.label, self.note = node_id, label, note

    def text(self, step, total, loss) -> str:
        line = f"{self.label} {step}/{total}  loss {loss:.4f}"
        return f"warning: {self.note}\n{line}" if self.note else line

    def __call__(self, step, total, loss):
        self.bar.update_absolute(step, total)
        try:
            from server import PromptServer

            server = getattr(PromptServer, "instance", None)
            if server is not None and self.node_id is not None and (step == total or step % 10 == 0 or step == 1):
                server.send_progress_text(self.text(step, total, loss), self.node_id)
        except ImportError:
            pass

    @staticmethod
    def cancel():
        return comfy.model_management.processing_interrupted()


def run_cancellable(fn):
    """Turn the core's cancellation into the host's interrupt, which it reports as 'cancelled'."""
    try:
        return fn()
    except ImagicCancelled:
        raise comfy.model_management.InterruptProcessingException()


def lora_patched_model(model, delta: WeightDelta):
    """(MODEL with the delta as ordinary LoRA/diff patches, LORA_MODEL state dict for Save LoRA)."""
    lora_sd = delta.to_state_dict(prefix=PREFIX)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
    return patched, lora_sd
