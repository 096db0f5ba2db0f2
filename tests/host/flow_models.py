"""Tiny diffusion-model files (the stock "Load Diffusion Model" / UNETLoader kind) for flow-matching families.

Built at test time, never committed. Each builder makes the host's own network class on the meta
device (``comfy.supported_models.<Class>(cfg).get_model({}).diffusion_model``), fills seeded random
weights, saves the state dict with the host's diffusion-model key layout (no prefix: what
``comfy.sd.load_diffusion_model`` accepts) and asserts that the host's
``comfy.model_detection.model_config_from_unet(sd, "")`` returns the intended supported-models class
and reads back the intended config. The host must be imported first (comfy_host.import_host).

Which families can be tiny depends only on how much the host's detection reads from the file:

- ``flux_dev``, ``flux2``, ``sd35``: the widths, depths and text widths are read from the weights,
  so they are tiny (well under 5M parameters) with the real text-side widths.
- ``qwen_image``, ``lumina2``, ``zimage``: detection reads only a few sizes; every other size is a
  fixed default of the host's class (Qwen-Image: 24 heads x 128 = 3072 wide; Lumina 2: dim 2304 or
  the NextDiT default 4096 (32 heads x 128 rope dims); Z-Image: the ZImage class needs dim == 3840)
  and the refiner blocks (Lumina 2 / Z-Image: 2 + 2) are always built. With one joint layer (at
  least one is needed for the text to reach the image) they are hundreds of millions of
  parameters: ``heavy=True``, skip them in quick tests. Measured (bf16 file; CPU, 1 thread; one
  build + load + 5 + 5 + 5 training steps + 2 sampling steps): qwen_image 380M, 0.76 GB, ~15 s,
  3.2 GB RSS; lumina2 427M, 0.85 GB, ~35 s, 4.6 GB; zimage 909M, 1.8 GB, ~100 s, 8.4 GB.
- not provided: Chroma (the host fixes its guidance approximator at 5 x 5120-wide layers and the
  modulation width at 3072, so >600M parameters) and HiDream (every size is fixed by detection:
  16 + 32 layers, MoE, about 17B parameters).

``conditioning(spec, seed)`` builds a CONDITIONING as the family's text encoder hands it to the
model (widths as the model reads them; the extra keys its ``extra_conds`` reads), ``latent(spec,
seed)`` a LATENT dict in the ``process_latent_in`` input space (what VAE Encode gives).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import _init_module_

WEIGHT_DTYPE = torch.bfloat16


class NotOnThisHost(Exception):
    """The host cannot detect a tiny file of this family: it lacks the family, or its detection fixes
    sizes that the tiny config changes (ComfyUI 0.8 reads Flux's num_heads as 24, not from the file)."""


@dataclass
class FlowModelInfo:
    path: Path
    model_class: str          # comfy.supported_models class the host detected, e.g. "Flux"
    model_sampling: str       # comfy.model_sampling classes of its model sampling, e.g. "ModelSamplingFlux + CONST"
    params: int
    size_bytes: int
    build_seconds: float
    sampling_settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FlowFamily:
    """One family: the config the host detects back from the file, and its text/latent shapes."""
    name: str
    model_class: str                 # supported_models class detection must return
    unet_config: dict                # what detect_unet_config reads back (compared key by key)
    text_width: int                  # conditioning width, as the model reads it
    tokens: int                      # default number of text tokens in conditioning()
    latent_shape: tuple              # LATENT["samples"] shape (process_latent_in input space)
    pooled_width: int | None = None  # "pooled_output" width where the model reads one (Flux: vec_in_dim, SD3: y)
    guidance: float | None = None    # "guidance" (FluxGuidance) for guidance-distilled models
    attention_mask: bool = False     # the family's text encoder puts "attention_mask" in the dict
    heavy: bool = False              # hundreds of millions of parameters: not for quick tests
    stage1: tuple = (20, 0.02)       # (steps, learning rate) of the stage 1 checks
    note: str = ""

    def build(self, path, seed: int = 0) -> FlowModelInfo:
        return build(self, path, seed)


# Flux.1 dev: guidance-distilled (guidance_in), T5-XXL context 4096, CLIP-L pooled 768.
# axes_dim must sum to hidden_size / num_heads (detection sets num_heads = hidden / sum(axes_dim)).
_FLUX_DEV = dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=1, mlp_ratio=4.0, theta=10000,
                 out_channels=16, qkv_bias=True, txt_ids_dims=[], in_channels=16, hidden_size=128,
                 context_in_dim=4096, patch_size=2, vec_in_dim=768, depth=1, depth_single_blocks=1,
                 guidance_embed=True, yak_mlp=False, txt_norm=False)

# Flux.2 dev: 128-channel latent, patch 1, rope dims 4 x 32 (so num_heads = hidden / 128),
# Mistral-Small-3 context (3 layers x 5120 = 15360), no pooled vector, guidance-distilled.
_FLUX2_DEV = dict(image_model="flux2", axes_dim=[32, 32, 32, 32], num_heads=1, mlp_ratio=3.0, theta=2000,
                  out_channels=128, global_modulation=True, mlp_silu_act=True, qkv_bias=False, ops_bias=False,
                  default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3], patch_size=1,
                  in_channels=128, hidden_size=128, context_in_dim=15360, vec_in_dim=None, depth=1,
                  depth_single_blocks=1, guidance_embed=True, yak_mlp=False, txt_norm=False)

# SD3.5 (MMDiT-X, as SD3.5 Medium): hidden = 64 * depth, heads = depth; RMS qk-norm (SD3.5) and
# a second self-attention in joint block 0 (x_block_self_attn, SD3.5 Medium). The host has no
# SD35 class: every MMDiT file is supported_models.SD3. Context T5 4096, pooled CLIP-L+G 2048.
_SD35 = dict(in_channels=16, patch_size=2, out_channels=16, depth=2, input_size=None, adm_in_channels=2048,
             context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
             num_patches=1024, pos_embed_max_size=32, qk_norm="rms", pos_embed_scaling_factor=None,
             x_block_self_attn_layers=[0])

# Qwen-Image: detection reads only in_channels and num_layers; the rest are the class defaults
# (3072 wide, Qwen2.5-VL-7B context 3584). One block: 380M parameters.
_QWEN_IMAGE = dict(image_model="qwen_image", in_channels=64, num_layers=1)

# Lumina 2 (Image 2.0): dim 2304 is the only tiny-ish dim detection configures (any other dim gets
# NextDiT's defaults, which need dim 4096). Gemma-2-2B context 2304. 1 joint layer: ~420M.
_LUMINA2 = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=2304, cap_feat_dim=2304, n_layers=1,
                qk_norm=True, n_heads=24, n_kv_heads=8, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512],
                rope_theta=10000.0, ffn_dim_multiplier=4.0)

# Z-Image: supported_models.ZImage matches only dim == 3840. Qwen3-4B context 2560, caption padded
# to a multiple of 32 tokens (cap_pad_token). 1 joint layer: ~900M.
_ZIMAGE = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=1,
               qk_norm=True, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
               rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
               pad_tokens_multiple=32)

# Flux.2 Klein (4B): the Flux2 class as Flux.2 dev, told apart only by its text encoder: Qwen3-4B,
# 3 layers x 2560 = 7680 context; no guidance embedding (klein is not guidance-distilled).
_FLUX2_KLEIN = dict(_FLUX2_DEV, context_in_dim=7680, guidance_embed=False)

# Krea 2: single-stream DiT; detection reads the widths, depths and the text fusion's width from the file
# (head dim 128, patch 2 and the fusion's 2 + 2 blocks at 20 heads are fixed). Its text encoder taps 12
# layers x 2560 of Qwen3-VL-4B (30720): at that width the fixed fusion tower alone is 343M, so the quick
# family keeps the layout (txtlayers x txtdim) at 2 x 160 and the heavy one has the real width.
_KREA2 = dict(image_model="krea2", features=128, channels=16, patch=2, layers=1, heads=1, kvheads=1,
              txtlayers=2, txtdim=160)
_KREA2_FULL_TEXT = dict(_KREA2, txtlayers=12, txtdim=2560)

# HunyuanImage 2.1: the HunyuanVideo network with 2-D patches and no vector_in; head dim 128 (axes
# [64, 64]), Qwen2.5-VL-7B context 3584 (read), no ByT5 glyph branch, no guidance embedding (the
# distilled variant has one). Wan-style 64-channel 2-D latent (32x VAE).
_HUNYUAN_IMAGE21 = dict(image_model="hunyuan_video", in_channels=64, patch_size=[1, 1], out_channels=64,
                        vec_in_dim=None, axes_dim=[64, 64], meanflow=False, context_in_dim=3584, hidden_size=128,
                        mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, theta=256, qkv_bias=True,
                        byt5=False, guidance_embed=False, use_cond_type_embedding=False, vision_in_dim=None,
                        meanflow_sum=False)

# Chroma: Flux.1 schnell-like network whose modulation comes from a fixed 5 x 5120 approximator with
# 3072-wide outputs, so hidden is 3072 (24 heads) and one double block: ~0.5B. T5-XXL context 4096.
_CHROMA = dict(image_model="chroma", in_channels=64, out_channels=64, in_dim=64, out_dim=3072, hidden_dim=5120,
               n_layers=5, axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, qkv_bias=True,
               txt_ids_dims=[], patch_size=2, hidden_size=3072, context_in_dim=4096, vec_in_dim=None, depth=1,
               depth_single_blocks=0)
# Chroma Radiance: the same in pixel space (3 channels, 16 px patches, a small NeRF-style head).
_CHROMA_RADIANCE = dict(_CHROMA, image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=16,
                        nerf_hidden_size=64, nerf_mlp_ratio=4, nerf_depth=4, nerf_max_freqs=8, nerf_tile_size=512,
                        nerf_final_head_type="linear", nerf_embedder_dtype=torch.float32, use_x0=False,
                        use_sequential_txt_ids=False)

FAMILIES: dict[str, FlowFamily] = {
    "flux_dev": FlowFamily(
        "flux_dev", "Flux", _FLUX_DEV, text_width=4096, tokens=12, latent_shape=(1, 16, 16, 16),
        pooled_width=768, guidance=3.5,
        note="ModelType.FLUX: ModelSamplingFlux (shift 1.15 is mu: sigma = e^mu / (e^mu + 1/t - 1)), timestep = sigma"),
    "flux2": FlowFamily(
        "flux2", "Flux2", _FLUX2_DEV, text_width=15360, tokens=12, latent_shape=(1, 128, 8, 8),
        guidance=4.0, attention_mask=True,
        note="extra_conds left-pads the context to 512 tokens; ModelSamplingFlux with shift (mu) 2.02; "
             "latent_format Flux2 is the identity"),
    "sd35": FlowFamily(
        "sd35", "SD3", _SD35, text_width=4096, tokens=12, latent_shape=(1, 16, 16, 16), pooled_width=2048,
        note="ModelType.FLOW: ModelSamplingDiscreteFlow shift 3.0, multiplier 1000 (timestep = 1000 * sigma); "
             "pooled_output is required (encode_adm reads kwargs['pooled_output'])"),
    "qwen_image": FlowFamily(
        "qwen_image", "QwenImage", _QWEN_IMAGE, text_width=3584, tokens=12, latent_shape=(1, 16, 1, 8, 8),
        heavy=True,
        note="Wan 2.1 latent format: 5-D [B, 16, T, H, W] latents (KSampler unsqueezes a 4-D one); "
             "ModelType.FLUX: ModelSamplingFlux shift 1.15 (sampling_settings' multiplier 1.0 is unused)"),
    "lumina2": FlowFamily(
        "lumina2", "Lumina2", _LUMINA2, text_width=2304, tokens=12, latent_shape=(1, 16, 8, 8),
        attention_mask=True, heavy=True,
        note="ModelSamplingDiscreteFlow shift 6.0, multiplier 1.0 (timestep = sigma); extra_conds gives "
             "num_tokens (and attention_mask when some tokens are masked), but the 0.33 NextDiT ignores both "
             "(patchify_and_embed sets cap_mask = None)"),
    "zimage": FlowFamily(
        "zimage", "ZImage", _ZIMAGE, text_width=2560, tokens=12, latent_shape=(1, 16, 8, 8),
        attention_mask=True, heavy=True,
        note="model_base.Lumina2 (NextDiT with z_image_modulation); ModelSamplingDiscreteFlow shift 3.0, "
             "multiplier 1.0; the mask is ignored as for lumina2"),
    "flux2_klein": FlowFamily(
        "flux2_klein", "Flux2", _FLUX2_KLEIN, text_width=7680, tokens=12, latent_shape=(1, 128, 8, 8),
        attention_mask=True,
        note="detected as Flux2 (the class of Flux.2 dev); no guidance key in the conditioning"),
    "krea2": FlowFamily(
        "krea2", "Krea2", _KREA2, text_width=320, tokens=12, latent_shape=(1, 16, 1, 8, 8), stage1=(40, 0.005),
        note="stage 1: the tiny random network's text path moves the objective by well under 1%, so it is checked "
             "over 40 small steps (at 20 steps of 0.02 the held-out value is within noise); "
             "ModelType.FLUX: ModelSamplingFlux shift 1.15; Wan 2.1 latent (5-D); context = txtlayers x txtdim, "
             "unpacked per layer by the model; text side scaled down (the real 30720 is krea2_full_text)"),
    "krea2_full_text": FlowFamily(
        "krea2_full_text", "Krea2", _KREA2_FULL_TEXT, text_width=30720, tokens=12, latent_shape=(1, 16, 1, 8, 8),
        heavy=True, note="Krea 2 with the real text width (12 x 2560): the fusion tower is 343M"),
    "hunyuan_image21": FlowFamily(
        "hunyuan_image21", "HunyuanImage21", _HUNYUAN_IMAGE21, text_width=3584, tokens=12,
        latent_shape=(1, 64, 8, 8), attention_mask=True,
        note="ModelType.FLOW: ModelSamplingDiscreteFlow shift 5.0, multiplier 1000; extra_conds adds guidance 6.0 "
             "by default (unused without a guidance embedding)"),
    "chroma": FlowFamily(
        "chroma", "Chroma", _CHROMA, text_width=4096, tokens=12, latent_shape=(1, 16, 16, 16), heavy=True,
        note="ModelType.FLUX: ModelSamplingFlux shift 1.15; no pooled vector, no guidance; ~0.5B at the smallest"),
    "chroma_radiance": FlowFamily(
        "chroma_radiance", "ChromaRadiance", _CHROMA_RADIANCE, text_width=4096, tokens=12,
        latent_shape=(1, 3, 64, 64), heavy=True,
        note="pixel space: the LATENT is the image (3 channels, no VAE compression); as Chroma otherwise"),
}


def _nparams(sd: dict) -> int:
    return sum(t.numel() for t in sd.values())


def _init_buffers_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Saved (persistent) floating buffers get seeded values: to_empty leaves them uninitialised."""
    persistent = set(module.state_dict().keys())
    for name, buf in module.named_buffers():
        if name in persistent and buf.is_floating_point() and buf.numel() > 0:
            buf.data.normal_(0.0, 0.02, generator=gen)  # e.g. MMDiT's pos_embed


def _init_norms_(module: torch.nn.Module) -> None:
    """The host's norm layers (RMSNorm, QK-norms) keep a unit scale (checkpoints' init knows only torch's)."""
    for m in module.modules():
        if "norm" not in type(m).__name__.lower():
            continue
        for pname, p in m.named_parameters(recurse=False):
            if pname in ("weight", "scale"):
                p.data.fill_(1.0)
            elif pname == "bias":
                p.data.zero_()


def _sampling_names(ms) -> str:
    import comfy.model_sampling
    names = [c.__name__ for c in type(ms).__mro__ if c.__module__ == comfy.model_sampling.__name__]
    return " + ".join(names)


def _diff(want: dict, got: dict) -> dict:
    return {k: (v, got.get(k, "<missing>")) for k, v in want.items() if got.get(k, "<missing>") != v}


def state_dict(spec: FlowFamily | str, seed: int = 0):
    """(state dict in the host's diffusion-model layout, model config, model-sampling class names)."""
    import comfy.supported_models
    spec = FAMILIES[spec] if isinstance(spec, str) else spec
    gen = torch.Generator().manual_seed(seed)
    if not hasattr(comfy.supported_models, spec.model_class):
        raise NotOnThisHost(f"this host has no {spec.model_class} model (comfy.supported_models)")
    mc = getattr(comfy.supported_models, spec.model_class)(dict(spec.unet_config))
    with torch.device("meta"):
        base = mc.get_model({})
    sampling = _sampling_names(base.model_sampling)
    net = base.diffusion_model.to_empty(device="cpu")
    del base
    _init_buffers_(net, gen)
    _init_module_(net, gen)
    _init_norms_(net)
    sd = {k: v.detach().to(WEIGHT_DTYPE).contiguous() for k, v in net.state_dict().items()}
    del net
    return sd, mc, sampling


def detect(sd: dict):
    """(supported_models class name, detected unet config) as UNETLoader's load_diffusion_model sees them."""
    import comfy.model_detection
    mc = comfy.model_detection.model_config_from_unet(sd, "")
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    return (type(mc).__name__ if mc is not None else "None"), cfg


def detected_state_dict(spec: FlowFamily | str, seed: int = 0):
    """``state_dict(spec, seed)``, checked to be detected by this host as the family with its config
    (AssertionError for another class, NotOnThisHost where the host reads other sizes)."""
    spec = FAMILIES[spec] if isinstance(spec, str) else spec
    sd, mc, sampling = state_dict(spec, seed)
    got_class, got_cfg = detect(sd)
    if got_class != spec.model_class:
        raise AssertionError(f"host detects {got_class}, wanted {spec.model_class} for {spec.name}")
    diff = _diff(spec.unet_config, got_cfg or {})
    if diff:
        raise NotOnThisHost(f"this host's detection reads a different config for a tiny {spec.name} "
                            f"(wanted, got): {diff}")
    return sd, mc, sampling


def build(spec: FlowFamily | str, path, seed: int = 0) -> FlowModelInfo:
    """Write ``path`` (.safetensors) for the family; assert the host detects it as intended."""
    import comfy.utils
    spec = FAMILIES[spec] if isinstance(spec, str) else spec
    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd, mc, sampling = detected_state_dict(spec, seed)
    got_class = type(mc).__name__
    tmp = path.with_name(path.name + ".part")
    comfy.utils.save_torch_file(sd, str(tmp), metadata={"imagic_test": "tiny random weights"})
    os.replace(tmp, path)
    return FlowModelInfo(path=path, model_class=got_class, model_sampling=sampling, params=_nparams(sd),
                         size_bytes=path.stat().st_size, build_seconds=time.perf_counter() - t0,
                         sampling_settings=dict(mc.sampling_settings))


def conditioning(spec: FlowFamily | str, seed: int = 0, tokens: int | None = None, masked: int = 0):
    """A CONDITIONING ``[[context [1, tokens, width], extra]]`` as the family's text encoder gives it.

    ``extra`` holds what the family's ``extra_conds`` reads: ``pooled_output`` (Flux.1: vec_in_dim,
    SD3: the y embedder's width), ``guidance`` (guidance-distilled Flux), ``attention_mask`` (the
    LLM text encoders: all ones, as an unpadded prompt gives; ``masked`` zeroes the last tokens, as
    a padded batch would). Qwen-Image's encoder drops an all-ones mask, so it only gets one when masked.
    """
    spec = FAMILIES[spec] if isinstance(spec, str) else spec
    n = tokens or spec.tokens
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, n, spec.text_width, generator=g)
    extra = {}
    if spec.pooled_width is not None:
        extra["pooled_output"] = torch.randn(1, spec.pooled_width, generator=g)
    if spec.guidance is not None:
        extra["guidance"] = spec.guidance
    if spec.attention_mask or masked:
        mask = torch.ones(1, n, dtype=torch.long)
        if masked:
            mask[:, n - masked:] = 0
        extra["attention_mask"] = mask
    return [[context, extra]]


def latent(spec: FlowFamily | str, seed: int = 0, shape: tuple | None = None) -> dict:
    """A LATENT dict in the process_latent_in input space (as VAE Encode gives it)."""
    spec = FAMILIES[spec] if isinstance(spec, str) else spec
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(*(shape or spec.latent_shape), generator=g)}


def register_diffusion_models_folder(folder) -> None:
    """Point the host's ``diffusion_models`` folder (UNETLoader's list) at ``folder``."""
    import folder_paths
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(folder)], {".safetensors"})
    folder_paths.filename_list_cache.clear()
