"""Tiny single-file checkpoints that a real ComfyUI host detects as SD1.5, SD2.x-v or SDXL.

Built at test time, never committed. Every builder uses the host's own classes (UNetModel,
the text encoder classes, TAESD) on the meta device, fills seeded random weights, converts
with the host's own ``process_*_state_dict_for_saving`` (so the single-file prefixes are the
host's), saves with safetensors and asserts that the host's detection returns the intended
model class and prediction type. The host must be imported first (comfy_host.import_host).

Sizes are set by what detection needs:
- the text encoders are built from fixed configs (CLIP-L 123M, OpenCLIP-H 354M, CLIP-G 695M
  parameters): stored as fp8 (e4m3fn); the host loads them as fp16 on CPU;
- the UNet must have 320 model channels; everything else (levels, blocks, channel_mult) is
  kept as small as the matching rules allow; stored as fp16;
- the VAE is TAESD (keys ``taesd_*``, 2.45M parameters) instead of the 83.7M SD VAE.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

UNET_DTYPE = torch.float16
TE_DTYPE = torch.float8_e4m3fn
UNET_PREFIX = "model.diffusion_model."

_BASE_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}

# SD1.5: one level, one res block with one transformer block, 768-d context, conv proj_in.
SD15_UNET = {**_BASE_UNET, "adm_in_channels": None, "num_res_blocks": [1], "channel_mult": [1],
             "transformer_depth": [1], "transformer_depth_output": [1, 1],
             "transformer_depth_middle": 1, "context_dim": 768, "use_linear_in_transformer": False}

# SD2.x v-prediction: SD20.model_type (comfy/supported_models.py) calls a model v-prediction
# when output_blocks.11.1.transformer_blocks.0.norm1.bias has std > 0.09, so the UNet needs 12
# output blocks (4 levels x (2+1)) with a transformer in the last one. 1024-d context, linear
# proj_in. channel_mult stays 1 everywhere to keep it small.
SD2_UNET = {**_BASE_UNET, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2],
            "channel_mult": [1, 1, 1, 1], "transformer_depth": [1, 0, 0, 0, 0, 0, 0, 0],
            # (UNetModel pops transformer_depth_output from the end: entry 0 is output block 11)
            "transformer_depth_output": [1] + [0] * 11, "transformer_depth_middle": 1,
            "context_dim": 1024, "use_linear_in_transformer": True}
SD2_VPRED_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"

# SDXL: detection matches transformer_depth [0,0,2,2,10,10] exactly (3 levels x 2 res blocks),
# 2048-d context, adm 2816, linear proj_in. channel_mult 1 and thin output side keep it small.
SDXL_UNET = {**_BASE_UNET, "adm_in_channels": 2816, "num_classes": "sequential",
             "num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1],
             "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
             "transformer_depth_middle": 1, "context_dim": 2048, "use_linear_in_transformer": True}


@dataclass
class CheckpointInfo:
    path: Path
    model_class: str       # e.g. "SD15" (comfy.supported_models class name the host detected)
    model_type: str        # e.g. "EPS", "V_PREDICTION" (comfy.model_base.ModelType name)
    unet_params: int
    te_params: int
    vae_params: int
    size_bytes: int
    build_seconds: float


def _init_module_(module: torch.nn.Module, gen: torch.Generator, gain: float = 1.0,
                  embed_std: float = 0.02) -> None:
    """Seeded init in place: fan-in scaled Linear/Conv, unit norms, small embeddings, zero bias."""
    done = set()
    for m in module.modules():
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            if w is not None:
                w.data.fill_(1.0)
            if b is not None:
                b.data.zero_()
        elif isinstance(m, torch.nn.Embedding):
            w.data.normal_(0.0, embed_std, generator=gen)
        elif isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            fan_in = w[0].numel()
            w.data.normal_(0.0, gain / math.sqrt(fan_in), generator=gen)
            if b is not None:
                b.data.zero_()
        else:
            continue
        for p in (w, b):
            if p is not None:
                done.add(id(p))
    for name, p in module.named_parameters():
        if id(p) in done:
            continue
        if name.endswith("logit_scale"):
            p.data.fill_(4.6055)
        elif name.endswith("vae_scale"):
            p.data.fill_(1.0)
        elif name.endswith("vae_shift"):
            p.data.zero_()
        else:  # e.g. class_embedding, positional parameters
            p.data.normal_(0.0, embed_std, generator=gen)
    for name, buf in module.named_buffers():
        if buf.is_floating_point() and not torch.isfinite(buf).all():
            raise RuntimeError(f"uninitialised buffer {name} in {type(module).__name__}")


def _materialise(build, gen, **init_kw) -> torch.nn.Module:
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device="cpu")
    _init_module_(module, gen, **init_kw)
    return module


def _nparams(sd: dict) -> int:
    return sum(t.numel() for t in sd.values())


def _cast(sd: dict, dtype) -> dict:
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def detect(sd_or_path) -> tuple[str, str]:
    """(model class name, model type name) as the host's checkpoint loader would detect them."""
    import comfy.model_detection
    import comfy.utils
    sd = comfy.utils.load_torch_file(str(sd_or_path)) if isinstance(sd_or_path, (str, os.PathLike)) else dict(sd_or_path)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    mc = comfy.model_detection.model_config_from_unet(sd, prefix)
    if mc is None:
        return ("None", "None")
    return (type(mc).__name__, mc.model_type(sd, prefix).name)


def _build(path, model_config_cls, unet_config, te_factory, *, seed, expect_class, expect_type,
           unet_tweak=None) -> CheckpointInfo:
    import comfy.ops
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    mc = model_config_cls(dict(unet_config))

    unet = _materialise(lambda: UNetModel(**mc.unet_config, operations=comfy.ops.disable_weight_init), gen)
    unet_sd = unet.state_dict()
    if unet_tweak is not None:
        unet_tweak(unet_sd, gen)
    unet_sd = _cast(unet_sd, UNET_DTYPE)
    del unet

    te = _materialise(lambda: te_factory(dtype=torch.float32), gen)
    te_sd = _cast(te.state_dict(), TE_DTYPE)
    del te

    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    _init_module_(vae, gen)
    vae_sd = _cast(vae.state_dict(), torch.float16)
    del vae

    counts = (_nparams(unet_sd), _nparams(te_sd), _nparams(vae_sd))
    # (the host's prefix helpers rename keys in place: copy the dicts first)
    sd = dict(mc.process_unet_state_dict_for_saving(dict(unet_sd)))
    sd.update(mc.process_clip_state_dict_for_saving(dict(te_sd)))
    sd.update(mc.process_vae_state_dict_for_saving(dict(vae_sd)))
    sd = {k: v.contiguous() for k, v in sd.items()}

    got = detect(sd)
    if got != (expect_class, expect_type):
        raise AssertionError(f"host detects {got}, wanted {(expect_class, expect_type)} for {path.name}")

    import comfy.utils
    tmp = path.with_name(path.name + ".part")
    comfy.utils.save_torch_file(sd, str(tmp), metadata={"imagic_test": "tiny random weights"})
    os.replace(tmp, path)
    return CheckpointInfo(path=path, model_class=got[0], model_type=got[1],
                          unet_params=counts[0], te_params=counts[1],
                          vae_params=counts[2], size_bytes=path.stat().st_size,
                          build_seconds=time.perf_counter() - t0)


def make_sd15_checkpoint(path, seed: int = 0) -> CheckpointInfo:
    """SD1.5-shaped checkpoint (UNet ~19M fp16, CLIP-L fp8, TAESD): about 160 MB."""
    import comfy.sd1_clip
    import comfy.supported_models
    return _build(path, comfy.supported_models.SD15, SD15_UNET,
                  lambda dtype: comfy.sd1_clip.SD1ClipModel(device="meta", dtype=dtype),
                  seed=seed, expect_class="SD15", expect_type="EPS")


def make_sd2_vpred_checkpoint(path, seed: int = 0) -> CheckpointInfo:
    """SD2.x (768-v style) checkpoint detected as SD20 + V_PREDICTION; OpenCLIP-H fp8: ~480 MB."""
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip

    def tweak(unet_sd, gen):
        # SD20.model_type: std(norm1.bias of output block 11) > 0.09 means v-prediction.
        b = unet_sd[SD2_VPRED_KEY]
        sign = torch.ones(b.numel())
        sign[1::2] = -1.0
        unet_sd[SD2_VPRED_KEY] = (sign * 0.125).reshape(b.shape).to(b.dtype)

    return _build(path, comfy.supported_models.SD20, SD2_UNET,
                  lambda dtype: comfy.text_encoders.sd2_clip.SD2ClipModel(device="meta", dtype=dtype),
                  seed=seed, expect_class="SD20", expect_type="V_PREDICTION", unet_tweak=tweak)


def make_sdxl_checkpoint(path, seed: int = 0) -> CheckpointInfo:
    """SDXL-shaped checkpoint (CLIP-L + CLIP-G fp8, TAESD): about 1 GB, tens of seconds."""
    import comfy.sdxl_clip
    import comfy.supported_models
    return _build(path, comfy.supported_models.SDXL, SDXL_UNET,
                  lambda dtype: comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=dtype),
                  seed=seed, expect_class="SDXL", expect_type="EPS")


# Bump when a builder changes, so persistent caches (IMAGIC_HOST_CKPT_CACHE) are rebuilt.
BUILDER_VERSION = 1


def info_for(path) -> CheckpointInfo:
    """CheckpointInfo of an existing checkpoint file (detection and parameter counts)."""
    import comfy.utils
    path = Path(path)
    sd = comfy.utils.load_torch_file(str(path))
    cls, typ = detect(sd)
    unet = sum(v.numel() for k, v in sd.items() if k.startswith(UNET_PREFIX))
    vae = sum(v.numel() for k, v in sd.items() if k.startswith("first_stage_model."))
    return CheckpointInfo(path=path, model_class=cls, model_type=typ, unet_params=unet,
                          te_params=_nparams(sd) - unet - vae, vae_params=vae,
                          size_bytes=path.stat().st_size, build_seconds=0.0)


def cached_checkpoint(builder, cache_dir, name: str, link_dir, seed: int = 0) -> CheckpointInfo:
    """Build ``name`` into cache_dir once and link (or copy) it into link_dir.

    The cache key is the name, the seed and BUILDER_VERSION, so a persistent cache_dir lets a
    slow checkpoint (SDXL) be shared between pytest runs. Returns the info of the file in
    link_dir (build_seconds 0.0 when it came from the cache).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    src = cache_dir / f"v{BUILDER_VERSION}-s{seed}-{name}"
    dst = Path(link_dir) / name
    info = builder(src, seed=seed) if not src.exists() else None
    if not dst.exists():
        try:
            os.symlink(src, dst)
        except OSError:
            import shutil
            shutil.copyfile(src, dst)
    if info is None:
        return info_for(dst)
    info.path = dst
    return info
