"""Train the toy pixel-space text-to-image model and write it as a diffusers folder.

    python -m imagic.toy.train_model --out imagic/toy/model --seed 0 --steps 3400 --threads 2

Layout of the output folder (like a Stable Diffusion pipeline, minus the VAE):

    model_index.json   class names; "vae": [null, null] (pixel space)
    unet/              UNet2DConditionModel, 3 -> 3 channels, sample_size 32
    text_encoder/      CLIPTextModel (hidden size 64)
    tokenizer/         CLIPTokenizer, one token per vocabulary word, max length 77
    scheduler/         DDIMScheduler config (v_prediction, 1000 train steps, linear betas), or for
                       --prediction-type flow a FlowMatchEulerDiscreteScheduler (rectified flow, shift 1)
    imagic_toy.json    how it was trained (seed, steps, wall time, ...)

Latents are pixels: ``x = image / 127.5 - 1`` in [-1, 1], shape [B, 3, 32, 32].

Reproducibility: the run is a fixed number of steps; data comes from the
generator's train seeds, and every random draw (init, noise, timesteps, caption
dropout) from ``torch.manual_seed(seed)``.  On CPU, with the same torch version
and the same ``--threads``, the weights are reproduced bit for bit (checked for
short runs).  ``--minutes`` only stops early (a safety cap): a run cut by it is
not reproducible unless its recorded step count is passed back as ``--steps``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from . import data
from .tokenizer import MAX_LENGTH, write_tokenizer, build_vocab_and_merges, BOS, EOS

TEXT_DIM = 64
PREDICTION_TYPES = ("v_prediction", "epsilon", "flow")


def scheduler_config_alphas(scheduler) -> torch.Tensor:
    """The DDPM schedule's alpha-bar (flow models have none: a dummy of the same length, unused)."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    return ac.float() if ac is not None else torch.full((1000,), 0.5)


def unet_config() -> dict:
    return dict(
        sample_size=data.IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        # Text cross-attention only at 8x8 and 4x4 (and the 4x4 mid block): the
        # attributes are global, and this is far cheaper on CPU than at 16x16.
        # The 4x4 level also gives the network the absolute position (from the
        # zero padding) that it needs to put the object left or right.
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        # The pooled text embedding is also added to the timestep embedding, so
        # every ResNet block (all resolutions) is conditioned on the text.  It is
        # computed from encoder_hidden_states alone: the call signature is the
        # usual unet(x, t, encoder_hidden_states).
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,  # diffusers uses this as the number of heads
        norm_num_groups=16,
    )


def text_config():
    from transformers import CLIPTextConfig

    vocab, _ = build_vocab_and_merges()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        projection_dim=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )


def scheduler_config(prediction_type: str = "v_prediction") -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type=prediction_type,
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build(seed: int, prediction_type: str = "v_prediction", flow_shift: float = 3.0):
    from diffusers import UNet2DConditionModel, DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config())
    text_encoder = CLIPTextModel(text_config())
    if prediction_type == "flow":
        # Rectified flow as SD3/Flux train it: x_t = (1 - t) x0 + t noise, velocity target noise - x0,
        # timestep input 1000 t, t = shift u / (1 + (shift - 1) u) for u uniform. With shift 1 (t
        # uniform) a 3400-step model rendered shape, colour and size perfectly and position at chance
        # (0.48 on the gate): only 18% of its samples had the SNR below 0.05 at which the layout is
        # decided, against about 40% of the v model's. Shift 3 gives 40%.
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift)
    else:
        scheduler = DDIMScheduler(**scheduler_config(prediction_type))
    return unet, text_encoder, scheduler


def save_model(out_dir, unet, text_encoder, scheduler, meta: dict | None = None) -> Path:
    import diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    write_tokenizer(out / "tokenizer")
    index = {
        "_class_name": "ImagicToyPixelPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "vae": [None, None],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = {
        "pixel_space": True,
        "latent_from_image": "x = image / 127.5 - 1  (RGB, [-1, 1], [B, 3, 32, 32])",
        "image_size": data.IMAGE_SIZE,
        "attributes": {k: list(v) for k, v in data.ATTRIBUTES.items()},
        "caption_template": data.CAPTION_TEMPLATE,
        "train_seed_range": list(data.SPLITS["train"]),
        **(meta or {}),
    }
    (out / "imagic_toy.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


class CaptionIds:
    """Tokenize captions once (there are only 49 distinct ones)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions) -> torch.Tensor:
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tok(c, padding="max_length", max_length=MAX_LENGTH,
                                         truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([self.cache[c] for c in captions])


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def train(out_dir, seed: int = 0, steps: int = 3400, batch_size: int = 32, lr: float = 1e-3,
          warmup: int = 100, p_uncond: float = 0.1, min_snr_gamma: float | None = None,
          prediction_type: str = "v_prediction",
          ema_decay: float = 0.995, threads: int = 2, minutes: float | None = None,
          log_every: int = 50, flow_shift: float = 3.0) -> Path:
    from transformers import CLIPTokenizer

    torch.set_num_threads(threads)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(prediction_type)
    unet, text_encoder, scheduler = build(seed, prediction_type, flow_shift)
    write_tokenizer(Path(out_dir) / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(Path(out_dir) / "tokenizer")
    ids_of = CaptionIds(tokenizer)

    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    print(f"unet {n_unet/1e6:.3f}M params, text encoder {n_text/1e6:.3f}M params", flush=True)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    flow = prediction_type == "flow"
    alphas_cumprod = scheduler_config_alphas(scheduler)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # Loss weight per timestep, written through lambda(t), the weight that the
    # loss puts on the implied x0 error.  Epsilon MSE has lambda = snr: about
    # 0.01 at the high noise levels (t > 600) where the object's position is
    # decided, and two 1800-step epsilon models here ignored "left"/"right"
    # (position at chance) while rendering colour and size perfectly.
    # v-prediction MSE has lambda = 1 + snr: the same weight as epsilon at low
    # noise (detail) and ~1 at high noise (layout).  A v model whose weight was
    # capped at low noise (min-SNR, gamma 5) learned position (0.88) but gave
    # grainy, blobby samples, so by default nothing is capped here.
    if min_snr_gamma is None or flow:  # flow: plain velocity MSE with t uniform, as the objective uses
        weight = torch.ones_like(snr)
    elif prediction_type == "v_prediction":
        weight = torch.clamp(1 + snr, max=min_snr_gamma) / (1 + snr)
    else:
        weight = torch.clamp(snr, max=min_snr_gamma) / snr

    unet.train()
    text_encoder.train()
    t0 = time.time()
    seed_lo = data.SPLITS["train"][0]
    done = 0
    running = 0.0
    for step in range(steps):
        if minutes is not None and time.time() - t0 > minutes * 60:
            print(f"stopping at step {step}: --minutes {minutes} reached", flush=True)
            break
        seeds = range(seed_lo + step * batch_size, seed_lo + (step + 1) * batch_size)
        images, _, caps = data.make_dataset(seeds)
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        drop = torch.rand(batch_size) < p_uncond
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        ids = ids_of(caps)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        if flow:
            u = torch.rand(batch_size)  # the scheduler's shifted uniform t; the model sees timestep 1000 s
            s = flow_shift * u / (1 + (flow_shift - 1) * u)
            xt = (1 - s).view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise
        else:
            xt = scheduler.add_noise(x0, noise, t)

        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        cond = text_encoder(ids).last_hidden_state
        pred = unet(xt, s * 1000 if flow else t, cond).sample
        if flow:
            target = noise - x0
        else:
            target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        loss = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        done = step + 1
        running += loss.item()
        if done % log_every == 0 or done == steps:
            k = (done - 1) % log_every + 1
            print(f"step {done}/{steps} loss {running / k:.4f} lr {lr_at(step):.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
            running = 0.0

    wall = time.time() - t0
    meta = {
        "training": {
            "seed": seed, "steps": done, "steps_requested": steps, "batch_size": batch_size,
            "lr": lr, "warmup": warmup, "p_uncond": p_uncond, "min_snr_gamma": min_snr_gamma,
            "prediction_type": prediction_type, **({"flow_shift": flow_shift} if flow else {}),
            "ema_decay": ema_decay, "weights": "EMA", "threads": threads,
            "wall_seconds": round(wall, 1), "torch": torch.__version__,
            "images_seen": done * batch_size,
            "command": f"python -m imagic.toy.train_model --out DIR --seed {seed} --steps {done} "
                       f"--batch-size {batch_size} --lr {lr:g} --threads {threads} --prediction-type {prediction_type}"
                       + (f" --min-snr-gamma {min_snr_gamma:g}" if min_snr_gamma is not None else "")
                       + (f" --flow-shift {flow_shift:g}" if flow else ""),
        },
        "params": {"unet": n_unet, "text_encoder": n_text},
    }
    ema_unet.eval()
    ema_text.eval()
    out = save_model(out_dir, ema_unet, ema_text, scheduler, meta)
    print(f"saved {out} after {done} steps, {wall:.0f}s", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3400)
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop early after this wall time (not reproducible when it triggers)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prediction-type", default="v_prediction", choices=list(PREDICTION_TYPES))
    ap.add_argument("--min-snr-gamma", type=float, default=None,
                    help="cap the loss weight at low noise (min-SNR); default: plain MSE on the target")
    ap.add_argument("--flow-shift", type=float, default=3.0,
                    help="flow models: t = shift u / (1 + (shift - 1) u), u uniform (also the scheduler's shift)")
    a = ap.parse_args(argv)
    train(a.out, seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
          threads=a.threads, minutes=a.minutes, min_snr_gamma=a.min_snr_gamma,
          prediction_type=a.prediction_type, flow_shift=a.flow_shift)


if __name__ == "__main__":
    main()
