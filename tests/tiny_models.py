"""Tiny random Stable Diffusion models built in code: the tests never download anything."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "dog", "cat", "sitting", "standing", "red", "blue", "car", "the", "on", "grass"]


def write_tokenizer_files(folder: Path, words=WORDS, max_length: int = 16):
    """A CLIP BPE vocabulary in which every word is one token (letters are the fallback)."""
    from transformers import CLIPTokenizer

    vocab = {}

    def add(t):
        vocab.setdefault(t, len(vocab))

    add("<|startoftext|>")
    add("<|endoftext|>")
    for c in "abcdefghijklmnopqrstuvwxyz":
        add(c)
        add(c + "</w>")
    merges = []
    for w in words:
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            pair = f"{toks[0]} {toks[1]}"
            if pair not in merges:
                merges.append(pair)
            toks = [toks[0] + toks[1]] + toks[2:]
            add(toks[0])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


def build_tiny_sd(seed: int = 0, prediction_type: str = "epsilon", vae: bool = True, sdxl: bool = False):
    """Components of a tiny SD-like model with seeded random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    width1, width2 = 32, 32
    text_cfg = dict(vocab_size=200, hidden_size=width1, intermediate_size=37, num_attention_heads=4,
                    num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                    pad_token_id=1, projection_dim=width2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    unet_kw = dict(sample_size=8, in_channels=4 if vae else 3, out_channels=4 if vae else 3,
                   block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=width1, attention_head_dim=8)
    te2 = None
    if sdxl:
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_cfg, "hidden_size": width2}))
        unet_kw.update(cross_attention_dim=width1 + width2, addition_embed_type="text_time",
                       addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + width2)
    unet = UNet2DConditionModel(**unet_kw)
    autoencoder = None
    if vae:
        autoencoder = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16)
    if prediction_type == "flow":  # rectified flow, as SD3/Flux folders ship it
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    else:
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type)
    return dict(unet=unet, text_encoder=text_encoder, vae=autoencoder, scheduler=scheduler, text_encoder_2=te2)


def save_tiny_sd(folder: Path, **kw) -> Path:
    """Save a tiny model as a diffusers folder, as ``save_pretrained`` of a pipeline would."""
    folder = Path(folder)
    parts = build_tiny_sd(**kw)
    index = {"_class_name": "StableDiffusionXLPipeline" if kw.get("sdxl") else "StableDiffusionPipeline",
             "_diffusers_version": "0.42.1"}
    for name, comp in parts.items():
        if comp is None:
            continue
        comp.save_pretrained(folder / name)
        lib = "diffusers" if type(comp).__module__.startswith("diffusers") else "transformers"
        index[name] = [lib, type(comp).__name__]
    write_tokenizer_files(folder / "tokenizer")
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    if kw.get("sdxl"):
        write_tokenizer_files(folder / "tokenizer_2")
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
