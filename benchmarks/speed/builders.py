"""The models the benchmark trains: the real SD1.5 / SDXL UNet architectures with seeded random weights,
as diffusers modules or as the ComfyUI host's own model classes in a ModelPatcher (nothing is downloaded)."""
from __future__ import annotations

import math

from .configs import HOST_MODEL_CLASS, HOST_UNET_CONFIGS, param_count, unet_config


def fill_random_(module, device, seed: int = 0):
    """Seeded random weights in place, for a module materialized with ``to_empty`` (whose memory
    is uninitialized): every parameter and buffer is written."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    done = set()
    with torch.no_grad():
        for m in module.modules():  # (the host's ops are subclasses of these torch classes)
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                # uniform with the std of 1/sqrt(fan_in): cheaper than normal_, same scale.
                bound = math.sqrt(3.0 / m.weight[0].numel())
                m.weight.uniform_(-bound, bound, generator=g)
                done.add(id(m.weight))
                if m.bias is not None:
                    m.bias.zero_()
                    done.add(id(m.bias))
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                for p, v in ((m.weight, 1.0), (m.bias, 0.0)):
                    if p is not None:
                        p.fill_(v)
                        done.add(id(p))
        for p in module.parameters():
            if id(p) not in done:  # none in the SD configs, but never leave memory uninitialized
                p.normal_(0.0, 0.02, generator=g)
        for b in module.buffers():
            b.zero_()
    return module


def build_unet(model: str, device: str, seed: int = 0, tiny: bool = False):
    """The UNet architecture with seeded random weights: built on the meta device, then filled."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("diffusers", model, tiny))
    return fill_random_(unet.to_empty(device=device), device, seed).eval()


def build_host_model(model: str, dtype_kind: str, tiny: bool, seed: int = 0):
    """The host's own SD1.5/SDXL model (comfy.supported_models.SD15 / SDXL, ``get_model``) with
    seeded random weights, in a ModelPatcher as the host's checkpoint loader returns it."""
    import torch
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = dict(unet_config("host", model, tiny))
    model_config = getattr(comfy.supported_models, HOST_MODEL_CLASS[model])(config)
    load_device = mm.get_torch_device()
    n_params = param_count("host", model, tiny)
    if dtype_kind == "host":  # what comfy.sd.load_state_dict_guess_config picks for this device
        dtype = mm.unet_dtype(model_params=n_params, supported_dtypes=model_config.supported_inference_dtypes)
        manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    else:
        dtype, manual_cast = torch.float32, None
    model_config.set_inference_dtype(dtype, manual_cast)
    # The UNet on the meta device (no memory; the host's BaseModel passes the device to every layer,
    # while its model_sampling buffers are computed on the CPU as usual).
    base = model_config.get_model({}, device=torch.device("meta"))
    info = dict(host_class=type(model_config).__name__, weight_dtype=str(dtype).replace("torch.", ""),
                manual_cast_dtype=str(manual_cast).replace("torch.", "") if manual_cast is not None else None)
    if not tiny:  # what a real checkpoint of this layout loads as (detection reads key names and shapes)
        sd = base.diffusion_model.state_dict()
        detected = comfy.model_detection.detect_unet_config(sd, "")
        detected_class = type(comfy.model_detection.model_config_from_unet(sd, "")).__name__
        if detected != HOST_UNET_CONFIGS[model] or detected_class != HOST_MODEL_CLASS[model]:
            raise RuntimeError(f"the host detects this UNet as {detected_class} {detected}")
        info["detected_as"] = detected_class
        del sd
    # Materialized once, where the host's loader would put it, and filled.
    device = mm.unet_inital_load_device(n_params, dtype)
    fill_random_(base.diffusion_model.to_empty(device=device), device, seed)
    base.device = device  # (get_model was told "meta"; the host's loader records the real device)
    left = [n for n, t in [*base.named_parameters(), *base.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    info["params"] = sum(p.numel() for p in base.diffusion_model.parameters())
    if info["params"] != n_params:  # the memory estimates use the table
        raise RuntimeError(f"{info['params']} UNet parameters, but PARAMS/TINY_PARAMS say {n_params}")
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())
    return patcher, info


# SD1.5's text encoder (CLIP ViT-L/14's text tower) and VAE, as in the published model folder.
SD15_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                         hidden_act="quick_gelu")
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)


def build_sd15_parts(folder, device: str = "cpu", seed: int = 0, tiny: bool = False):
    """The rest of an SD1.5 model folder with seeded random weights: its CLIP text encoder, a
    tokenizer (the toy's word-level CLIP tokenizer, written to ``folder``: a text's cost does not
    depend on its words, all are padded to 77 tokens) and its VAE. ``tiny``: a few layers each."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from imagic.toy.tokenizer import write_tokenizer

    te_cfg, vae_cfg = dict(SD15_TEXT_ENCODER), dict(SD15_VAE)
    if tiny:
        # (the width stays 768: the UNet's cross-attention reads it; four VAE levels: 8x downsampling)
        te_cfg.update(intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        vae_cfg.update(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
        vae = AutoencoderKL(**vae_cfg)
    text_encoder = fill_random_(text_encoder.to_empty(device=device), device, seed + 1).eval()
    # (the position ids are a buffer that fill_random_ zeroes: they must count the positions)
    with torch.no_grad():
        for name, b in text_encoder.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    vae = fill_random_(vae.to_empty(device=device), device, seed + 2).eval()
    write_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    return text_encoder, tokenizer, vae
