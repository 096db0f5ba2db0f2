"""The standalone path: Imagic on a diffusers Stable Diffusion folder, no ComfyUI needed.

    from imagic import ImagicPipeline
    pipe = ImagicPipeline.from_pretrained("path/to/stable-diffusion-v1-5")
    result = pipe.train("dog.jpg", "a photo of a sitting dog")
    images = pipe.sample(result, etas=[0.6, 0.7, 0.8])

SD 1.x, SD 2.x (epsilon and v-prediction, read from the scheduler config), SDXL (two text
encoders, pooled vector and size conditioning) and pixel-space models without a VAE (the toy
model) are supported.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.nn.utils import parametrize

from .defaults import DEFAULTS, lr_finetune_default
from .deltas import WeightDelta, applied, check_fits
from .model_folder import check_model_folder, is_local_model
from .objective import Conditioning
from .results import ImagicResult
from .train import ImagicError, ProgressFn, CancelFn, finetune, interpolate, optimize_embedding


class DiffusersDenoiser:
    """The ``Denoiser`` adapter for a diffusers UNet and its noise schedule: a DDPM schedule
    (epsilon or v-prediction), or rectified flow (a ``FlowMatchEulerDiscreteScheduler``).

    ``lora_side_branch`` (default): a LoRA delta runs beside each layer instead of being merged into
    its weight; same function up to rounding, about one copy of the UNet less memory in training.
    ``offload_base`` (default): while a full fine-tune trains its copy of the weights, the UNet's own
    values wait on the CPU (GPU models) or in a temporary file (CPU models): one copy of the UNet
    less memory; they are back, bit for bit, when the stage ends.
    """

    def __init__(self, unet, scheduler, time_ids: Optional[torch.Tensor] = None,
                 autocast_dtype: Optional[torch.dtype] = None, gradient_checkpointing: bool = False,
                 lora_side_branch: bool = True, offload_base: bool = True):
        self.unet = unet.requires_grad_(False)
        self.noise_scale = 1.0  # diffusers' schedulers train on unscaled noise
        self.offload_base = offload_base
        self.gradient_checkpointing = gradient_checkpointing
        self.lora_side_branch = lora_side_branch
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        if is_flow_scheduler(scheduler):
            self.prediction_type = "flow"
            if getattr(scheduler.config, "use_dynamic_shifting", False):
                raise ImagicError("this flow scheduler shifts its noise levels by image size (use_dynamic_shifting); "
                                  "only a fixed shift is supported in the standalone path")
            self.shift = float(getattr(scheduler.config, "shift", 1.0))
        else:
            self.prediction_type = scheduler.config.prediction_type
            if self.prediction_type not in ("epsilon", "v_prediction"):
                raise ImagicError(f"scheduler prediction_type {self.prediction_type!r} is not supported "
                                  "(expected 'epsilon' or 'v_prediction')")
            self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        self.time_ids = time_ids
        self.autocast_dtype = autocast_dtype

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def sample_timesteps(self, n, generator):
        if self.prediction_type == "flow":
            # t uniform in [0, 1), through the scheduler's shift as the model's noise levels were drawn.
            u = torch.rand(n, generator=generator)
            return self.shift * u / (1 + (self.shift - 1) * u)
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def alpha_sigma(self, t):
        if self.prediction_type == "flow":
            t = t.float().to(self.device)
            return 1 - t, t
        ac = self.alphas_cumprod[t.cpu().long()]
        return ac.sqrt().float().to(self.device), (1 - ac).sqrt().float().to(self.device)

    def model_timestep(self, t):
        """The timestep the network reads: flow models take 1000 t (diffusers' sigma * num_train_timesteps)."""
        return t.float() * self.num_train_timesteps if self.prediction_type == "flow" else t

    def predict(self, x_t, t, cond):
        kwargs = {}
        if "pooled" in cond:
            n = x_t.shape[0]
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"].to(self.dtype),
                                           "time_ids": self.time_ids.to(self.device, self.dtype).expand(n, -1)}
        ac = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext())
        with ac:
            return self.unet(x_t.to(self.dtype), self.model_timestep(t).to(self.device), encoder_hidden_states=cond["context"].to(self.dtype),
                             return_dict=False, **kwargs)[0]

    def trainable_module(self):
        return self.unet

    @contextmanager
    def training(self):
        """Gradient checkpointing (when asked) for the duration of a training stage only."""
        use = self.gradient_checkpointing and self.unet._supports_gradient_checkpointing
        was = self.unet.is_gradient_checkpointing
        if use and not was:
            self.unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if use and not was:
                self.unet.disable_gradient_checkpointing()

    def attach(self, delta: Optional[WeightDelta], inference: bool = False, forwards: Optional[int] = None):
        """Compute with weight + delta inside the block; the UNet is exactly as before afterwards
        (``inference``: without gradients, ``forwards``: the passes it will run; see ``imagic.deltas.applied``)."""
        return applied(delta, self.unet, side_branch=self.lora_side_branch, offload_base=self.offload_base,
                       inference=inference, forwards=forwards)


def is_flow_scheduler(scheduler) -> bool:
    """Rectified-flow schedulers (SD3, Flux, the flow toy): diffusers' FlowMatch* classes (an instance,
    or a scheduler config's ``_class_name``)."""
    name = scheduler if isinstance(scheduler, str) else type(scheduler).__name__
    return name.startswith("FlowMatch")


def load_scheduler(model, local: bool):
    """The model's training schedule: a FlowMatch scheduler as saved, any DDPM-family one as DDIM."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    config = DDIMScheduler.load_config(model, subfolder="scheduler", local_files_only=local)
    if is_flow_scheduler(str(config.get("_class_name", ""))):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    return DDIMScheduler.from_config(config)


def sampling_scheduler(scheduler):
    """A fresh sampler on the model's schedule: DDIM for DDPM models, the Euler flow sampler for flow models."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if is_flow_scheduler(scheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    return DDIMScheduler.from_config(scheduler.config)


class ImagicPipeline:
    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, text_encoder_2=None, tokenizer_2=None,
                 autocast_dtype=None, gradient_checkpointing: Optional[bool] = None):
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.scheduler, self.vae = scheduler, vae
        on_cuda = next(unet.parameters()).is_cuda
        # Mixed precision and checkpointing pay off on GPUs; on CPU both cost time (README, Performance).
        if autocast_dtype == "auto":
            autocast_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_cuda else None
        self.autocast_dtype = autocast_dtype
        self.gradient_checkpointing = on_cuda if gradient_checkpointing is None else gradient_checkpointing
        for m in (unet, text_encoder, vae, text_encoder_2):
            if m is not None:
                m.requires_grad_(False).eval()
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.size_multiple = self.vae_factor * 2 ** (len(unet.config.down_block_types) - 1)
        sample_size = unet.config.sample_size
        self.default_size = (sample_size if isinstance(sample_size, int) else max(sample_size)) * self.vae_factor

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model: Union[str, Path], device: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None, autocast_dtype="auto",
                        gradient_checkpointing: Optional[bool] = None):
        """Load a local diffusers folder (or a hub id where the machine has internet). Safetensors only."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or torch.float32
        path = Path(model)
        if is_local_model(model):
            index = check_model_folder(path)
            local = True
        else:
            index, local = None, False  # a hub id: diffusers checks it
        kw = dict(local_files_only=local, use_safetensors=True)

        def has(c):
            return index is None and c in ("vae",) or index is not None and isinstance(index.get(c), list) and index[c][0]

        try:
            unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kw)
            text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype, **kw)
            tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=local)
            scheduler = load_scheduler(model, local)
            vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kw) if has("vae") else None
            te2 = tok2 = None
            if has("text_encoder_2"):
                te2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", torch_dtype=dtype, **kw)
                tok2 = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2", local_files_only=local)
        except ImagicError:
            raise
        except Exception as e:  # diffusers/transformers raise many types for missing or broken files
            raise ImagicError(f"could not load the model from {model}: {type(e).__name__}: {e}") from None
        pipe = cls(unet.to(device), text_encoder.to(device), tokenizer, scheduler,
                   vae.to(device) if vae is not None else None,
                   te2.to(device) if te2 is not None else None, tok2, autocast_dtype=autocast_dtype,
                   gradient_checkpointing=gradient_checkpointing)
        return pipe

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def is_sdxl(self):
        return self.text_encoder_2 is not None

    # ---------------------------------------------------------------- inputs
    def working_size(self, width: int, height: int, size: Optional[int] = None) -> Tuple[int, int]:
        """Keep the aspect ratio, long side ``size``, both sides multiples of what the model needs."""
        long_side = int(size or self.default_size)
        m = self.size_multiple
        if long_side < m:
            raise ImagicError(f"size {long_side} is too small: this model needs at least {m} pixels")
        scale = long_side / max(width, height)
        return (max(m, int(round(width * scale / m)) * m), max(m, int(round(height * scale / m)) * m))

    def load_image(self, image: Union[str, Path, Image.Image], size: Optional[int] = None) -> Image.Image:
        if not isinstance(image, Image.Image):
            path = Path(image)
            if not path.is_file():
                raise ImagicError(f"image not found: {path}")
            try:
                image = Image.open(path)
                image.load()
            except (UnidentifiedImageError, OSError) as e:
                raise ImagicError(f"{path} is not an image that can be read ({e})") from None
        image = ImageOps.exif_transpose(image).convert("RGB")
        w, h = self.working_size(*image.size, size)
        return image.resize((w, h), Image.LANCZOS)

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        x = x.to(self.device, self.unet.dtype)
        if self.vae is None:
            return x.float()
        # The mean, not a sample: the input photo should map to one deterministic latent.
        latent = self.vae.encode(x).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latent - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> List[Image.Image]:
        if self.vae is not None:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            z = (latents / self.vae.config.scaling_factor + shift).to(self.vae.dtype)
            if z.device.type == "cpu" and z.dim() == 4:
                # oneDNN's convolutions run on channels-last activations about 7% faster here (SD1.5's VAE at
                # 256 px, 1 thread: 3.33 s against 3.58; the image within 3e-5); the VAE's weights stay as they are.
                z = z.contiguous(memory_format=torch.channels_last)
            latents = self.vae.decode(z).sample
        arr = ((latents.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    @torch.no_grad()
    def encode_text(self, text: str) -> Conditioning:
        def ids(tok, t):
            return tok(t, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(self.device)

        if not self.is_sdxl:
            return {"context": self.text_encoder(ids(self.tokenizer, text))[0].float()}
        # SDXL: penultimate hidden states of both encoders side by side, pooled vector from the second.
        h1 = self.text_encoder(ids(self.tokenizer, text), output_hidden_states=True).hidden_states[-2]
        out2 = self.text_encoder_2(ids(self.tokenizer_2, text), output_hidden_states=True)
        return {"context": torch.cat([h1, out2.hidden_states[-2]], dim=-1).float(), "pooled": out2.text_embeds.float()}

    def denoiser(self, width: int, height: int) -> DiffusersDenoiser:
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32) if self.is_sdxl else None
        return DiffusersDenoiser(self.unet, self.scheduler, time_ids=time_ids, autocast_dtype=self.autocast_dtype,
                                 gradient_checkpointing=self.gradient_checkpointing)

    # ---------------------------------------------------------------- Imagic
    def train(self, image, target_text: str, *, embedding_steps: int = DEFAULTS["embedding_steps"],
              finetune_steps: int = DEFAULTS["finetune_steps"], lr_embedding: float = DEFAULTS["lr_embedding"],
              lr_finetune: Optional[float] = None, method: str = DEFAULTS["method"], rank: int = DEFAULTS["rank"],
              seed: int = DEFAULTS["seed"], size: Optional[int] = None, noise_samples: int = DEFAULTS["noise_samples"],
              progress: Optional[Callable[[str], ProgressFn]] = None, cancel: Optional[CancelFn] = None,
              warn: Optional[Callable[[str], None]] = None) -> ImagicResult:
        """Stages 1 and 2 on one image; ``progress(stage_name)`` may return a per-step callback; ``warn``: see
        ``imagic.finetune``."""
        if not isinstance(target_text, str) or not target_text.strip():
            raise ImagicError("the target text is empty: describe the edited image, e.g. 'a photo of a sitting dog'")
        if lr_finetune is None:
            lr_finetune = lr_finetune_default(method)
        img = self.load_image(image, size)
        x0 = self.encode_image(img)
        e_tgt = self.encode_text(target_text)
        den = self.denoiser(*img.size)
        cb = progress or (lambda stage: None)
        with den.training():
            e_opt, loss_emb = optimize_embedding(den, x0, e_tgt, steps=embedding_steps, lr=lr_embedding, seed=seed,
                                                 noise_samples=noise_samples, progress=cb("embedding"), cancel=cancel)
            # A full fine-tune's result keeps the trained weights W' (bound to this UNet): sampling reads them
            # as they are, where differences would be added at every call (benchmarks/sampling_vs_peer.py).
            delta, loss_ft = finetune(den, x0, e_opt, steps=finetune_steps, lr=lr_finetune, method=method,
                                      rank=rank, seed=seed, noise_samples=noise_samples, progress=cb("finetune"),
                                      cancel=cancel, warn=warn, keep_trained_weights=True)
        settings = dict(target_text=target_text, width=img.size[0], height=img.size[1],
                        embedding_steps=embedding_steps, lr_embedding=lr_embedding, finetune_steps=finetune_steps,
                        lr_finetune=lr_finetune, method=method, rank=rank, seed=seed, noise_samples=noise_samples,
                        model_family="sdxl" if self.is_sdxl else "sd", prediction_type=den.prediction_type,
                        loss_embedding=loss_emb, loss_finetune=loss_ft)
        return ImagicResult(e_tgt=e_tgt, e_opt=e_opt, delta=delta, settings=settings)

    def empty_text(self) -> Conditioning:
        """The empty prompt's embedding (classifier-free guidance's unconditional side), encoded once per
        pipeline and again only when a text encoder or one of its weights is replaced or changed."""
        encoders = [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]
        try:  # tensors count their in-place writes (_version): a weight edited in place is seen too
            key = tuple((id(m), tuple((id(p), p._version) for p in m.parameters())) for m in encoders) + (self.device,)
        except RuntimeError:  # inference tensors keep no count: encode every time
            return self.encode_text("")
        cached = getattr(self, "_empty_text", None)
        if cached is None or cached[0] != key:
            self._empty_text = cached = (key, self.encode_text(""))
        return dict(cached[1])

    def check_result(self, result: ImagicResult, uncond: Optional[Conditioning] = None) -> None:
        """Refuse a result made with another model family or whose fine-tune does not fit this UNet
        (``uncond``: this model's empty-prompt embedding, when the caller has it)."""
        mine = uncond if uncond is not None else self.empty_text()
        for k, v in result.e_tgt.items():
            if k not in mine or mine[k].shape[1:] != v.shape[1:]:
                raise ImagicError(f"this Imagic result was made with another model family: its {k!r} embedding has "
                                  f"shape {tuple(v.shape)}, this model's is "
                                  f"{tuple(mine[k].shape) if k in mine else 'absent'}")
        if result.delta is not None:
            misfit = check_fits(result.delta, self.unet)
            if misfit is not None:
                raise ImagicError(f"this Imagic result's fine-tune does not fit this model's UNet ({misfit})")

    @torch.no_grad()
    def sample(self, result: ImagicResult, etas: Sequence[float] = (DEFAULTS["eta"],), *, seed: int = 0,
               steps: int = DEFAULTS["sample_steps"], guidance: float = DEFAULTS["guidance"],
               init_image=None, strength: Optional[float] = None, use_finetuned: bool = True,
               progress: Optional[ProgressFn] = None) -> List[Image.Image]:
        """One image per eta, all from the same starting noise, with the fine-tuned model.

        ``init_image`` with ``strength`` in (0, 1] starts from the noised input (SDEdit) instead of
        pure noise; the benchmark uses it as a baseline.
        """
        uncond = self.empty_text()
        self.check_result(result, uncond)
        conds = [interpolate(result.e_tgt, result.e_opt, eta) for eta in etas]
        width, height = int(result.settings["width"]), int(result.settings["height"])
        den = self.denoiser(width, height)
        flow = den.prediction_type == "flow"
        batch = len(conds)
        cond = {k: torch.cat([uncond[k].expand(batch, *uncond[k].shape[1:])] + [c[k] for c in conds]).to(self.device)
                for k in uncond}
        scheduler = sampling_scheduler(self.scheduler)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps
        channels = self.unet.config.in_channels
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((1, channels, height // self.vae_factor, width // self.vae_factor), generator=g)
        noise = noise.to(self.device).expand(batch, -1, -1, -1)
        if init_image is not None:
            if strength is None or not 0 < strength <= 1:
                raise ImagicError(f"strength must be in (0, 1] when starting from an image, got {strength}")
            x0 = self.encode_image(self.load_image(init_image, max(width, height)).resize((width, height)))
            start = len(timesteps) - int(round(strength * len(timesteps)))
            timesteps = timesteps[start:]
            if flow:
                scheduler.set_begin_index(start)
                latents = scheduler.scale_noise(x0.expand(batch, -1, -1, -1), timesteps[:1], noise)
            else:
                latents = scheduler.add_noise(x0.expand(batch, -1, -1, -1), noise, timesteps[:1].repeat(batch))
        else:
            latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        delta = result.delta.to(self.device) if (use_finetuned and result.delta is not None) else None
        # LoRA stays a side branch, added into each layer's output in place (merging it would write a
        # model-sized copy of the weights at every call), except in layers whose weight is small beside
        # their activations, merged once where that costs less over the call's steps. A full fine-tune from ``train`` holds W' itself and
        # each layer reads it; a full difference loaded from a file is bound to this UNet at its first call
        # (FullDelta.bind: W + D written over D, the way back to D kept exact) and then read the same way:
        # adding it at every call cost 1.27x the peer's time, a fresh model-sized copy more on a CPU
        # (benchmarks/sampling_vs_peer.py).
        # parametrize.cached: a layer whose merged weight is formed (weight + difference) forms it once.
        with den.attach(delta, inference=True, forwards=len(timesteps)), parametrize.cached():
            for i, t in enumerate(timesteps):
                x_in = torch.cat([latents, latents])
                if not flow:
                    x_in = scheduler.scale_model_input(x_in, t)
                # The scheduler's timesteps are already what the network reads (flow: 1000 t).
                t_in = t.expand(2 * batch) / (self.scheduler.config.num_train_timesteps if flow else 1)
                out = den.predict(x_in, t_in, cond).float()
                out_u, out_c = out.chunk(2)
                latents = scheduler.step(out_u + guidance * (out_c - out_u), t, latents).prev_sample
                if progress is not None:
                    progress(i + 1, len(timesteps), float("nan"))
        return self.decode(latents)
