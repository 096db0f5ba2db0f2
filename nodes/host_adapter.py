"""The Imagic core on ComfyUI's model management: the ``Denoiser`` adapter and conditioning glue.

Training runs on a private clone of the incoming MODEL. Weight wrappers on that clone add the
trained delta to each weight at cast time (and force a fresh copy of the host's inference-tensor
weights, which is what lets gradients reach the embedding at all). The clone is unloaded when
training ends, so the MODEL the graph passed in, and every other user of it, never sees a change.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional

import torch

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.sd
import comfy.utils

from ..imagic import ImagicCancelled, ImagicError
from ..imagic.deltas import WeightDelta

PREFIX = "diffusion_model."


class _DeltaHolder:
    """Shared by all weight wrappers of one training clone; ``attach`` swaps what it holds."""

    def __init__(self):
        self.delta: Optional[WeightDelta] = None
        self.names = frozenset()

    def set(self, delta: Optional[WeightDelta]):
        self.delta = delta
        self.names = frozenset(delta.names()) if delta is not None else frozenset()


class _WeightWrapper(torch.nn.Module):
    """weight -> weight + delta(name). An nn.Module, as the host's own training adapters are."""

    def __init__(self, holder: _DeltaHolder, name: str):
        super().__init__()
        self.holder, self.name = holder, name

    def forward(self, weight):
        if self.name in self.holder.names:
            return weight + self.holder.delta.delta(self.name).to(weight.dtype)
        return weight


class ComfyDenoiser:
    """``imagic.objective.Denoiser`` for a ComfyUI ModelPatcher (SD1.x, SD2.x v-pred, SDXL, flow models)."""

    def __init__(self, model, cond_extra: dict, width: int, height: int):
        self.patcher = model.clone()
        self.base = self.patcher.model
        ms = self.base.model_sampling
        self.ms = ms
        kinds = comfy.model_sampling
        if isinstance(ms, kinds.CONST):
            self.prediction_type = "flow"
        elif isinstance(ms, kinds.V_PREDICTION) and not isinstance(ms, kinds.EDM):
            self.prediction_type = "v_prediction"
        elif isinstance(ms, kinds.EPS) and not isinstance(ms, (kinds.V_PREDICTION, kinds.X0)):
            self.prediction_type = "epsilon"
        else:
            raise ImagicError(f"this model's parameterization ({type(ms).__name__}) is not supported by Imagic yet")
        self.cond_extra = dict(cond_extra)
        self.width, self.height = width, height
        self.holder = _DeltaHolder()
        self.model_options = self.patcher.model_options
        for name, module in self.base.diffusion_model.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            for p in ("weight", "bias"):
                if getattr(module, p, None) is not None:
                    key = f"{name}.{p}"
                    self.patcher.add_weight_wrapper(PREFIX + key, _WeightWrapper(self.holder, key))
        self.device = comfy.model_management.get_torch_device()
        self._checkpointed: List[torch.nn.Module] = []

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
        kwargs = {}
        if "pooled" in cond:
            kwargs["y"] = self.adm(cond["pooled"])
        transformer_options = dict(self.model_options.get("transformer_options", {}))
        transformer_options["sigmas"] = s
        transformer_options["cond_or_uncond"] = [0] * n
        wrapper = self.model_options.get("model_function_wrapper")
        c = {"c_crossattn": cond["context"], "transformer_options": transformer_options, **kwargs}
        if wrapper is not None:
            x0 = wrapper(self.base.apply_model, {"input": x_in, "timestep": s, "c": c, "cond_or_uncond": [0] * n})
        else:
            x0 = self.base.apply_model(x_in, s, **c)
        x0 = x0.float()
        out = (x_in - x0) / sv  # epsilon, or the flow velocity for CONST models
        if self.prediction_type == "v_prediction":
            alpha, sigma = self.alpha_sigma(sv)
            return alpha * out - sigma * x0
        return out

    def trainable_module(self):
        return self.base.diffusion_model

    @contextlib.contextmanager
    def attach(self, delta):
        self.holder.set(delta)
        try:
            yield
        finally:
            self.holder.set(None)

    # -- host specifics --------------------------------------------------------------------
    def adm(self, pooled):
        """The model's extra vector input (SDXL: pooled text + size embedding), differentiable in pooled."""
        extra = {k: v for k, v in self.cond_extra.items() if k in ("width", "height", "crop_w", "crop_h",
                                                                   "target_width", "target_height")}
        kw = dict(width=self.width, height=self.height, crop_w=0, crop_h=0, target_width=self.width,
                  target_height=self.height)
        kw.update(extra)
        return self.base.encode_adm(pooled_output=pooled, **kw)

    def uses_pooled(self, pooled) -> bool:
        return pooled is not None and self.adm(pooled) is not None

    @contextlib.contextmanager
    def loaded(self, gradient_checkpointing: bool = False):
        """Load the training clone on the compute device; always unload it and undo checkpointing."""
        from comfy_extras.nodes_train import find_all_highest_child_module_with_forward, patch, unpatch

        with torch.inference_mode(False), torch.enable_grad():
            try:
                comfy.model_management.load_models_gpu([self.patcher], memory_required=0, force_full_load=True)
                if gradient_checkpointing:
                    for m in find_all_highest_child_module_with_forward(self.base.diffusion_model):
                        patch(m)
                        self._checkpointed.append(m)
                yield self
            finally:
                for m in self._checkpointed:
                    unpatch(m)
                self._checkpointed.clear()
                self.unload()

    def unload(self):
        mm = comfy.model_management
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            if mm.current_loaded_models[i].model is self.patcher:
                mm.current_loaded_models.pop(i).model_unload()
        self.patcher.unpatch_model()
        mm.soft_empty_cache()


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
    if samples.ndim != 4:
        raise ImagicError(f"the latent has shape {tuple(samples.shape)}; Imagic needs one image latent [1, C, H, W]")
    if samples.shape[0] != 1:
        raise ImagicError(f"the latent holds a batch of {samples.shape[0]} images; Imagic edits one image: pick one "
                          "with 'Latent From Batch' (batch_index, length 1) before this node")
    channels = model.model.latent_format.latent_channels
    if samples.shape[1] != channels:
        raise ImagicError(f"the latent has {samples.shape[1]} channels but this MODEL works on {channels}: "
                          "encode the photo with the VAE of the same checkpoint")
    return model.model.process_latent_in(samples.clone().float())


class NodeProgress:
    """The host's progress bar plus a loss read-out on the node, and the Cancel check."""

    def __init__(self, total: int, node_id, label: str):
        self.bar = comfy.utils.ProgressBar(total)
        self.node_id, self.label = node_id, label

    def __call__(self, step, total, loss):
        self.bar.update_absolute(step, total)
        try:
            from server import PromptServer

            server = getattr(PromptServer, "instance", None)
            if server is not None and self.node_id is not None and (step == total or step % 10 == 0):
                server.send_progress_text(f"{self.label} {step}/{total}  loss {loss:.4f}", self.node_id)
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
