"""``imagic.objective.Denoiser`` for a ComfyUI MODEL: the core's objective through the host's sampling math.

Noise levels are drawn from the model's own sigma table (so with its shift), x_t is formed in the
model's parameterization, and the network is called the way the sampler calls it: the host's
conditioning conversion (``encode_model_conds`` with the model's ``extra_conds``, then each input's
``process_cond``), the MODEL's ``model_function_wrapper`` and ``transformer_options``. Its output is
turned back into the training parameterization (epsilon, v, flow velocity). Training runs on the
private copy of ``training_copy``, which exists only inside ``loaded()``. Internals touched: through
``internals``, the loaded-model list and the ``in_training`` flag.
"""
from __future__ import annotations

import contextlib

import torch

import comfy.model_management

from ...imagic import ImagicError
from ...imagic.deltas import applied
from . import internals
from .autograd_safety import autograd_safe, changes_the_result, checkpointed, weights_made_again, writes_saved_tensors
from .conditioning import POOLED, entry_of
from .kinds import prediction_type_of, training_sigmas
from .training_copy import training_model


class ComfyDenoiser:
    """The Denoiser protocol for a ComfyUI ModelPatcher (SD1.x, SD2.x v-pred, SDXL, flow models)."""

    def __init__(self, model, cond_extra: dict, width: int, height: int):
        self.source = model
        self.prediction_type = prediction_type_of(model)
        self.ms = model.get_model_object("model_sampling")
        self.sigmas = training_sigmas(self.ms)
        self.noise_scale = float(getattr(self.ms, "noise_scale", 1.0))  # CONST.noise_scaling's factor
        self.cond_extra = dict(cond_extra)
        self.width, self.height = width, height
        self.patcher = self.base = self._apply_model = None
        self.owns_weights = False  # whether the training copy's weights are its own memory
        self.reload = None  # training_model's choice (tests force one)
        self.weights_on_device = None  # bytes of weights to keep loaded (tests force partial loading with it)
        self.offloaded_bytes = 0  # bytes of the training copy's weights streamed from RAM (set by loaded())
        self.device = comfy.model_management.get_torch_device()
        # Whether the model code writes tensors autograd saved (Flux's x += ...), so training must run
        # it out of place: found out by a probe at the first training call (None: not yet).
        self.out_of_place = None
        self.checkpointing = None  # the Checkpointing while the blocks are checkpointed

    # -- Denoiser protocol ---------------------------------------------------------------
    def sample_timesteps(self, n, generator):
        idx = torch.randint(0, len(self.sigmas), (n,), generator=generator)
        return self.sigmas[idx].to(self.device)

    def alpha_sigma(self, s):
        s = s.float()
        if self.prediction_type == "flow":
            return 1 - s, s
        # The host's k-diffusion form x = x0 + s * noise is the DDPM form scaled by sqrt(1 + s^2).
        norm = torch.rsqrt(1 + s * s)
        return norm, s * norm

    def predict(self, x_t, s, cond):
        n = x_t.shape[0]
        sv = s.float().reshape((n,) + (1,) * (x_t.ndim - 1))
        x_in = x_t if self.prediction_type == "flow" else x_t * torch.sqrt(1 + sv * sv)
        model_options = self.patcher.model_options
        transformer_options = dict(model_options.get("transformer_options", {}))
        transformer_options["sigmas"] = s
        transformer_options["cond_or_uncond"] = [0] * n
        c = dict(self.model_inputs(cond, x_in), transformer_options=transformer_options)
        if self.out_of_place is None and torch.is_grad_enabled():
            self.out_of_place = self._needs_out_of_place(x_in, s, c)
        wrapper = model_options.get("model_function_wrapper")
        if wrapper is not None:
            x0 = wrapper(self._apply_model, {"input": x_in, "timestep": s, "c": c, "cond_or_uncond": [0] * n})
        else:
            x0 = self._apply_model(x_in, s, **c)
        x0 = x0.float()
        out = (x_in - x0) / sv  # epsilon, or the flow velocity for CONST models (sigma > 0: training_sigmas)
        if self.prediction_type == "v_prediction":
            alpha, sigma = self.alpha_sigma(sv)
            return alpha * out - sigma * x0
        return out

    def _needs_out_of_place(self, x_in, s, c) -> bool:
        """The first call with gradients: does the model write tensors autograd saved (then it trains under
        ``OutOfPlaceAugmented``), and if so, does the mode keep its output (else it is refused)? Checkpointing
        is paused meanwhile: inside a checkpointed block no write of a saved tensor can be seen."""
        with self.checkpointing.paused() if self.checkpointing is not None else contextlib.nullcontext():
            return self._probe(x_in, s, c)

    def _probe(self, x_in, s, c) -> bool:
        if not writes_saved_tensors(self.base.apply_model, x_in, s, **c):
            return False
        if writes_saved_tensors(autograd_safe(self.base.apply_model), x_in, s, **c):
            raise ImagicError(f"this model ({type(self.base).__name__}) updates tensors in place that gradients need, "
                              "with explicit in-place calls (such as addcmul_ or mul_ on an activation) that Imagic "
                              "cannot run out of place: it cannot be trained; please report the model")
        if changes_the_result(self.base.apply_model, x_in, s, **c):
            raise ImagicError(f"this model ({type(self.base).__name__}) updates tensors in place in a way gradients "
                              "cannot pass through: its code writes through a view that it reads again, and running "
                              "it out of place changes its output. Imagic cannot train it; please report the model")
        return True

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
        """The model's keyword inputs for the core's conditioning, made as the sampler makes them.

        The trained tensors (``context``, ``pooled``) stay differentiable through the host's conversion.
        """
        import comfy.samplers

        context, extra = entry_of(cond, self.cond_extra)
        entry = {k: v for k, v in extra.items() if k != "model_conds" and not (k == POOLED and v is None)}
        if isinstance(entry.get(POOLED), torch.Tensor):
            entry[POOLED] = entry[POOLED].to(x_in.device)
        entry.update(cross_attn=context, model_conds={}, width=self.width, height=self.height)
        (converted,) = comfy.samplers.encode_model_conds(self.base.extra_conds, [entry], x_in, x_in.device, "positive")
        n = x_in.shape[0]
        return {k: v.process_cond(batch_size=n, area=None).concat([]) for k, v in converted["model_conds"].items()}

    def uses_pooled(self, pooled) -> bool:
        """Whether the model reads the pooled vector (SDXL, Flux: its ``encode_adm`` gives a vector)."""
        model = self.base if self.base is not None else self.source.model
        return pooled is not None and model.encode_adm(pooled_output=pooled, width=self.width,
                                                       height=self.height) is not None

    @contextlib.contextmanager
    def loaded(self, gradient_checkpointing: bool = False, memory_required: int = 0):
        """Make and load the training copy; always undo checkpointing, unload it and drop it.

        Loading is the host's own, as for sampling: ``memory_required`` (bytes the training step needs
        beside the weights: the estimate) is kept free, and weights that do not fit beside it stay in RAM
        and are streamed to the GPU layer by layer when the layer runs (the host's partial loading). A
        streamed weight is made again in the backward pass (``weights_made_again``), never kept for it.
        ``offloaded_bytes`` says how much of the model streams.
        """
        def when():
            return bool(self.out_of_place)

        with torch.inference_mode(False), torch.enable_grad():
            try:
                with contextlib.ExitStack() as stack:
                    self.patcher, self.owns_weights = training_model(self.source, self.reload)
                    self.base = self.patcher.model
                    self.base.requires_grad_(False)
                    self._apply_model = autograd_safe(self.base.apply_model, when)
                    comfy.model_management.load_models_gpu([self.patcher], memory_required=memory_required,
                                                           minimum_memory_required=memory_required)
                    if self.weights_on_device is not None:  # tests: the partial loading a small GPU would get
                        self.patcher.partially_unload(self.patcher.offload_device,
                                                      self.patcher.loaded_size() - self.weights_on_device)
                    self.offloaded_bytes = self.patcher.model_size() - self.patcher.loaded_size()
                    # Some models switch to autograd-safe kernels while this is set.
                    stack.enter_context(internals.in_training())
                    stack.enter_context(weights_made_again(self.base.diffusion_model))
                    if gradient_checkpointing:
                        self.checkpointing = stack.enter_context(checkpointed(self.base.diffusion_model, when))
                    yield self
            finally:
                self.unload()

    def unload(self):
        if self.patcher is None:
            return
        internals.unload_where(lambda p: p is self.patcher)
        self.patcher.unpatch_model()
        self.patcher = self.base = self._apply_model = self.checkpointing = None
        comfy.model_management.soft_empty_cache()
