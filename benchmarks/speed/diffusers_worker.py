"""The diffusers backend's worker: one stage through ``DiffusersDenoiser`` and the core, as
``ImagicPipeline`` runs it; DDIM sampling steps with a trained delta applied; the default edit end to end."""
from __future__ import annotations

import time
from types import SimpleNamespace

from .builders import build_unet
from .configs import SCHEDULER, TEXT_SHAPES
from .measure import GB


def prepare(model: str, cfg: dict, device: str, latent: int, seed: int = 0, tiny: bool = False):
    import torch
    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from imagic.pipeline import DiffusersDenoiser

    unet = build_unet(model, device, seed, tiny)
    n_params = sum(p.numel() for p in unet.parameters())
    unet.set_attn_processor(AttnProcessor() if cfg["attn"] == "classic" else AttnProcessor2_0())
    if cfg["channels_last"]:
        unet = unet.to(memory_format=torch.channels_last)
    if cfg["compile"]:
        unet.compile()  # in place: the module, its names and parametrizations stay as they are
    scheduler = DDIMScheduler(**SCHEDULER)
    dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["autocast"]]
    time_ids = None
    if model == "sdxl":
        px = latent * 8
        time_ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32)
    den = DiffusersDenoiser(unet, scheduler, time_ids=time_ids, autocast_dtype=dtype,
                            gradient_checkpointing=cfg["ckpt"])
    if cfg.get("lora_impl") == "merged":
        den.lora_side_branch = False
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(1, 4, latent, latent, generator=g).to(device)
    if cfg["channels_last"]:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    e_tgt = {k: torch.randn(*s, generator=g).to(device) for k, s in TEXT_SHAPES[model].items()}
    return unet, den, x0, e_tgt, n_params


def finetune_inplace(den, x0, e_opt, steps, lr, adam, progress, seed=0):
    """The paper baseline (the diffusers community pipeline's full fine-tune): the UNet's own weights
    train, written in place, on the core's loss (``imagic.loss_closure``) and loop (``run_training``).
    Not the project's method (that is ``imagic.finetune(method="full")``); used when it cannot fit."""
    from imagic import loss_closure, run_training

    params = [p.requires_grad_(True) for p in den.trainable_module().parameters()]
    frozen = {k: v.detach() for k, v in e_opt.items()}
    return run_training(params, loss_closure(den, x0, lambda: frozen, seed=seed), steps, lr,
                        "fine-tuning (in-place)", progress, None, adam)


def diffusers_stage(args, cfg, meter):
    """One stage through DiffusersDenoiser and the core, as ImagicPipeline runs it."""
    import imagic
    from imagic.defaults import DEFAULTS

    t_build = time.perf_counter()
    unet, den, x0, e_tgt, n_params = prepare(args.model, cfg, args.device, args.latent, tiny=args.tiny)
    info = dict(params=n_params, build_s=round(time.perf_counter() - t_build, 2))
    total = args.warmup + args.steps
    if args.stage == "sample":
        return info, sample_steps(den, unet, x0, e_tgt, cfg, total, meter)
    meter.start()
    with den.training():
        if args.stage == "embedding":
            _, losses = imagic.optimize_embedding(den, x0, e_tgt, steps=total, lr=DEFAULTS["lr_embedding"],
                                                  progress=meter, adam=cfg["adam"])
        elif cfg["method"] == "full" and cfg["full_impl"] == "inplace":
            losses = finetune_inplace(den, x0, e_tgt, total, DEFAULTS["lr_finetune_full"], cfg["adam"], meter)
        else:
            lr = DEFAULTS["lr_finetune_lora"] if cfg["method"] == "lora" else DEFAULTS["lr_finetune_full"]
            _, losses = imagic.finetune(den, x0, e_tgt, steps=total, lr=lr, method=cfg["method"],
                                        rank=DEFAULTS["rank"], progress=meter, adam=cfg["adam"])
    return info, losses


def sample_steps(den, unet, x0, e_tgt, cfg, total, meter):
    """DDIM steps as ImagicPipeline.sample takes them (a batch of 2, the prompt and the empty text,
    no gradients) with a trained delta applied by ``imagic.deltas.applied``: sample_impl "side" (LoRA
    as a side branch, added into each output in place without autograd: the pipeline's way),
    "in_place" (a full difference written into the delta's own tensors as W + D, ``applied(inference=True)``:
    the pipeline's way; bound to the UNet by ``FullDelta.bind`` since 2026-12-08, added for the block by
    ``FullDelta.merged_in_place`` before, as in the result files of that time), "cached" (a full difference merged once into a
    fresh copy, ``parametrize.cached``: the pipeline's way before 2026-12-03), "merged" (weight + delta
    formed by each layer at every call), "none" (the model alone; the peer samples its weights trained
    in place, which costs the same). benchmarks/sampling_vs_peer.py times whole calls against the peer."""
    import contextlib
    import torch
    from torch.nn.utils import parametrize
    from imagic.deltas import applied, make_delta
    from imagic.defaults import DEFAULTS

    delta = None
    if cfg["sample_impl"] != "none":
        delta = make_delta(cfg["method"], unet, DEFAULTS["rank"], seed=0, device=x0.device)
        with torch.no_grad():
            for t in (delta.up if cfg["method"] == "lora" else []):
                t.normal_(0, 1e-3)  # a LoRA as trained (up starts at zero)
        if cfg["method"] == "full":
            delta.finish()
        delta.requires_grad_(False)
    cond = {k: torch.cat([v, v]) for k, v in e_tgt.items()}
    x = torch.cat([x0, x0])
    t = torch.full((2,), 500, dtype=torch.long)
    meter.start()
    cache = parametrize.cached() if cfg["sample_impl"] == "cached" else contextlib.nullcontext()
    with torch.no_grad(), applied(delta, unet, side_branch=cfg["sample_impl"] == "side",
                                  inference=cfg["sample_impl"] == "in_place"), cache:
        for _ in range(total):
            den.predict(x, t, cond)
            meter(0, total, float("nan"))
    return []


class StubTokenizer:
    model_max_length = 77

    def __call__(self, text, **kw):
        import torch
        return SimpleNamespace(input_ids=torch.zeros(1, 77, dtype=torch.long))


def stub_text_encoder(width: int, pooled: int = 0, seed: int = 0):
    """Stands in for CLIP (its cost is one forward pass per text, negligible next to training)."""
    import torch

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("h", torch.randn(1, 77, width, generator=g))
            self.register_buffer("p", torch.randn(1, max(pooled, 1), generator=g))

        def forward(self, ids, output_hidden_states=False):
            if output_hidden_states:
                return SimpleNamespace(hidden_states=[self.h, self.h], text_embeds=self.p[:, :pooled])
            return (self.h,)

    return Stub()


def end_to_end(args) -> dict:
    """The default edit on the GPU: stage 1 and stage 2 at imagic.defaults, then six etas sampled
    with 50 DDIM steps, through ImagicPipeline (autocast and checkpointing at its defaults).
    The text encoders are stubs and there is no VAE, so encode/decode are not included."""
    import torch
    from diffusers import DDIMScheduler
    from imagic import ImagicPipeline, finetune, optimize_embedding
    from imagic.defaults import DEFAULTS
    from imagic.results import ImagicResult

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    unet = build_unet(args.model, device, tiny=args.tiny)
    scheduler = DDIMScheduler(**SCHEDULER)
    sdxl = args.model == "sdxl"
    te1 = stub_text_encoder(768).to(device)  # SDXL: 768 + 1280 side by side = its 2048 context
    te2 = stub_text_encoder(1280, pooled=1280, seed=1).to(device) if sdxl else None
    pipe = ImagicPipeline(unet, te1, StubTokenizer(), scheduler, vae=None, text_encoder_2=te2,
                          tokenizer_2=StubTokenizer() if sdxl else None, autocast_dtype="auto")
    side = args.latent  # no VAE: one "pixel" per latent cell
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, side, side, generator=g).to(device)
    e_tgt = pipe.encode_text("a photo")
    den = pipe.denoiser(side, side)
    s1, s2 = args.e2e_steps if args.e2e_steps else (DEFAULTS["embedding_steps"], DEFAULTS["finetune_steps"])
    etas = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    with den.training():
        e_opt, _ = optimize_embedding(den, x0, e_tgt, steps=s1, lr=DEFAULTS["lr_embedding"])
        sync()
        t1 = time.perf_counter()
        delta, _ = finetune(den, x0, e_opt, steps=s2, lr=DEFAULTS["lr_finetune_lora"], method=DEFAULTS["method"],
                            rank=DEFAULTS["rank"])
    sync()
    t2 = time.perf_counter()
    result = ImagicResult(e_tgt=e_tgt, e_opt=e_opt, delta=delta,
                          settings=dict(width=side, height=side, method=DEFAULTS["method"]))
    images = pipe.sample(result, etas=etas, steps=args.e2e_sample_steps or DEFAULTS["sample_steps"])
    sync()
    t3 = time.perf_counter()
    out = dict(embedding_steps=s1, finetune_steps=s2, etas=etas,
               sample_steps=args.e2e_sample_steps or DEFAULTS["sample_steps"], images=len(images),
               autocast=str(pipe.autocast_dtype), gradient_checkpointing=pipe.gradient_checkpointing,
               stage1_s=t1 - t0, stage2_s=t2 - t1, sample_s=t3 - t2, total_s=t3 - t0)
    if device == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated() / GB
    return out
