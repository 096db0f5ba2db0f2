"""What the speed benchmark builds and runs: the UNet configurations and the rows (one change each from
the paper's baseline), for both backends."""
from __future__ import annotations

UNET_CONFIGS = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
# --tiny (for testing the script only): the same families, a few million parameters.
TINY_UNET_CONFIGS = {
    "sd15": dict(UNET_CONFIGS["sd15"], layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(UNET_CONFIGS["sdxl"], layers_per_block=1, block_out_channels=(64, 128),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2), attention_head_dim=(1, 2)),
}

# The host backend: ComfyUI's own UNet config, exactly what its detection
# (comfy.model_detection.detect_unet_config) returns for the real SD1.5 and SDXL base checkpoints;
# the host worker checks that detection on the built model gives this config and model class.
# The class then adds its unet_extra_config (SD15: 8 heads; SDXL: 64 channels per head).
_HOST_UNET = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                  in_channels=4, out_channels=4, model_channels=320,
                  use_temporal_resblock=False, use_temporal_attention=False)
HOST_UNET_CONFIGS = {
    "sd15": dict(_HOST_UNET, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 use_linear_in_transformer=False, context_dim=768),
    "sdxl": dict(_HOST_UNET, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 use_linear_in_transformer=True, context_dim=2048),
}
# --tiny on the host: the same classes (SD15, SDXL) with 64 model channels and two levels. Detection
# would not call these SD1.5/SDXL (it needs 320 channels), so the class is used as given.
HOST_TINY_UNET_CONFIGS = {
    "sd15": dict(HOST_UNET_CONFIGS["sd15"], model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1]),
    "sdxl": dict(HOST_UNET_CONFIGS["sdxl"], model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[0, 2], transformer_depth_middle=1, transformer_depth_output=[0, 0, 2, 2]),
}
HOST_MODEL_CLASS = {"sd15": "SD15", "sdxl": "SDXL"}  # comfy.supported_models

TEXT_SHAPES = {"sd15": dict(context=(1, 77, 768)), "sdxl": dict(context=(1, 77, 2048), pooled=(1, 1280))}
# Parameter counts of the configs above (checked by the worker), for memory estimates without a build.
# The host's UNets have the same counts as the diffusers ones (checked on ComfyUI v0.3.64).
PARAMS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}
TINY_PARAMS = {("diffusers", "sd15"): 1_028_484, ("diffusers", "sdxl"): 10_022_596,
               ("host", "sd15"): 5_184_132, ("host", "sdxl"): 9_201_220}

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def unet_config(backend: str, model: str, tiny: bool = False) -> dict:
    if backend == "host":
        return (HOST_TINY_UNET_CONFIGS if tiny else HOST_UNET_CONFIGS)[model]
    return (TINY_UNET_CONFIGS if tiny else UNET_CONFIGS)[model]


def param_count(backend: str, model: str, tiny: bool = False) -> int:
    return TINY_PARAMS[(backend, model)] if tiny else PARAMS[model]


# The baseline is the paper / diffusers community Imagic pipeline: full fine-tune, fp32, plain Adam,
# no gradient checkpointing, classic attention. Each other row changes one thing, except "defaults".
BASE = dict(method="full", autocast=None, ckpt=False, adam="plain", attn="classic", channels_last=False,
            compile=False, full_impl="core")
OPTIONS = [
    ("baseline", {}),
    ("lora", dict(method="lora")),
    ("bf16 autocast", dict(autocast="bf16")),
    ("fp16 autocast", dict(autocast="fp16")),  # CUDA only
    ("grad checkpointing", dict(ckpt=True)),
    ("fast adam", dict(adam="fast")),
    ("sdpa", dict(attn="sdpa")),
    ("channels_last", dict(channels_last=True)),
    ("torch.compile", dict(compile=True)),
]


def project_defaults(cuda: bool, bf16_ok: bool) -> dict:
    """What ImagicPipeline does by default (pipeline.py): LoRA, fast Adam, diffusers' default SDPA
    attention, and on CUDA autocast (bf16 where supported, else fp16) and gradient checkpointing."""
    d = dict(BASE, method="lora", adam="fast", attn="sdpa")
    if cuda:
        d.update(autocast="bf16" if bf16_ok else "fp16", ckpt=True)
    return d


# The host backend trains what the nodes train: the host picks the attention, the full fine-tune is
# always the core's FullDelta, and the weights are fp32 except in "project defaults" (dtype "host":
# what the host's loader picks for the device, fp32 on CPU). Each row changes one thing from the
# baseline, except "project defaults". Autocast, attention and compile rows are diffusers-only.
HOST_BASE = dict(BASE, attn="host", dtype="fp32")
HOST_OPTIONS = ("baseline", "lora", "grad checkpointing", "fast adam")


def host_project_defaults() -> dict:
    """What the nodes do by default: Fine-tune UNet trains LoRA (rank from imagic.defaults) with
    gradient checkpointing on (its widget's default), both stages use the core's fast Adam, and the
    weights are in the dtype the host picks for the device (what its checkpoint loader uses).
    Optimize Embedding has no checkpointing: plan_rows turns it off for stage 1."""
    return dict(HOST_BASE, method="lora", adam="fast", ckpt=True, dtype="host")


def configurations(cuda: bool, bf16_ok: bool, stage2_base: str, backend: str = "diffusers"):
    host = backend == "host"
    rows = []
    for name, change in OPTIONS:
        if (name == "fp16 autocast" and not cuda) or (host and name not in HOST_OPTIONS):
            continue
        cfg = dict(HOST_BASE if host else BASE, method=stage2_base)
        cfg.update(change)
        if name == "lora" and stage2_base == "lora":
            name, cfg["method"] = "full fine-tune", "full"
        rows.append((name, cfg))
    if host:
        rows.append(("project defaults", host_project_defaults()))
        return rows
    rows.append(("project defaults", project_defaults(cuda, bf16_ok)))
    if not cuda:  # what the defaults do on a GPU, measured here too (bf16 autocast + checkpointing)
        rows.append(("project defaults, GPU settings", project_defaults(True, True)))
    # The core runs LoRA as a side branch of each layer; this row merges it into the weights
    # instead (weight + up @ down, as the first version did), to show what the branch saves.
    rows.append((MERGED, dict(project_defaults(cuda, bf16_ok), lora_impl="merged")))
    return rows


MERGED = "project defaults [LoRA merged into the weights]"
FULL_METHOD = "full fine-tune, the project's method [core FullDelta]"
# Stage "sample" (diffusers): one DDIM step with CFG, a delta applied as ImagicPipeline.sample does.
SAMPLE_ROWS = [("baseline", "lora", "none"),
               ("project defaults", "lora", "side"),
               ("LoRA merged into the weights at every call", "lora", "merged"),
               ("full fine-tune, the project's method [difference added in place]", "full", "in_place"),
               ("full fine-tune, difference merged once into a fresh copy (the method before 2026-12-03)", "full",
                "cached"),
               ("full difference merged at every call", "full", "merged")]


def lora_side_branch(cfg: dict, backend: str) -> bool:
    """Does this row's LoRA run as a side branch (both backends' default), not merged?"""
    return cfg["method"] == "lora" and cfg.get("lora_impl") != "merged"
