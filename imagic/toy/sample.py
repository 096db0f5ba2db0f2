"""DDIM (or, for the flow toy, Euler flow) sampler with classifier-free guidance for the toy
pixel-space model,
and the quality gate: how often samples show the captioned attributes.

    python -m imagic.toy.sample                      # the gate at its settings (GATE)
    python -m imagic.toy.sample --guidance 1 1.5 3   # other guidance values

The gate generates ``per-combo`` samples for each of the 48 attribute
combinations (captions from the template) with noise seeds the model never
saw, classifies them with :mod:`imagic.toy.classifier`, and prints accuracy per
attribute and for all attributes at once.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import data, MODEL_DIR
from ..pipeline import is_flow_scheduler

# The sampler settings of the quality gate, shared by benchmarks/edit_quality.py and `imagic demo`:
# the gate's figure is only meaningful at the settings the edits are sampled with.  DDIM, 25 steps;
# guidance was chosen on the gate (this pixel-space v-prediction model over-saturates above ~2).
GATE = dict(steps=25, guidance=1.5, per_combo=4, seed=1234)


def load_components(model_dir=None) -> dict:
    """unet, text_encoder, tokenizer, scheduler (DDIM, or the flow toy's Euler flow sampler) from a toy
    model folder, in eval mode."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..pipeline import load_scheduler

    d = Path(model_dir or MODEL_DIR)
    return {
        "unet": UNet2DConditionModel.from_pretrained(d / "unet").eval().requires_grad_(False),
        "text_encoder": CLIPTextModel.from_pretrained(d / "text_encoder").eval().requires_grad_(False),
        "tokenizer": CLIPTokenizer.from_pretrained(d / "tokenizer"),
        "scheduler": load_scheduler(d, local=True),
    }


@torch.no_grad()
def encode_text(components: dict, captions) -> torch.Tensor:
    tok = components["tokenizer"]
    ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    return components["text_encoder"](ids).last_hidden_state


@torch.no_grad()
def generate(model_dir=None, captions=("a large red circle on the left",), seed: int = 0,
             steps: int = 50, guidance: float = 5.0, batch_size: int = 64, eta: float = 0.0,
             components: dict | None = None) -> np.ndarray:
    """Sample one image per caption: uint8 [N, 32, 32, 3].

    The initial noise of all N images is drawn at once from ``seed``, so an
    image does not depend on ``batch_size``.
    """
    comp = components or load_components(model_dir)
    unet, sched = comp["unet"], comp["scheduler"]
    captions = list(captions)
    n = len(captions)
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, unet.config.in_channels, size, size), generator=g)
    cond_all = encode_text(comp, captions)
    uncond = encode_text(comp, [""])
    out = []
    for i in range(0, n, batch_size):
        x = noise[i:i + batch_size]
        b = x.shape[0]
        cond = cond_all[i:i + batch_size]
        ctx = torch.cat([uncond.expand(b, -1, -1), cond])
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            if guidance == 1.0:
                eps = unet(x, t, cond).sample
            else:
                e_u, e_c = unet(torch.cat([x, x]), t, ctx).sample.chunk(2)
                eps = e_u + guidance * (e_c - e_u)
            extra = {} if is_flow_scheduler(sched) else {"eta": eta}
            x = sched.step(eps, t, x, generator=g, **extra).prev_sample
        out.append(x)
    x = torch.cat(out)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def gate_captions(per_combo: int = 4) -> tuple[list[str], list[dict]]:
    combos = data.all_attribute_combos() * per_combo
    return [data.caption(c) for c in combos], combos


def score(images: np.ndarray, attrs: list[dict], classifier_path=None) -> dict:
    from .classifier import predict_attributes, load_classifier

    pred = predict_attributes(images, model=load_classifier(classifier_path))
    res = {name: float(np.mean([p[name] == a[name] for p, a in zip(pred, attrs)]))
           for name in data.ATTRIBUTE_NAMES}
    res["all"] = float(np.mean([all(p[k] == a[k] for k in data.ATTRIBUTE_NAMES) for p, a in zip(pred, attrs)]))
    return res


def save_grid(images: np.ndarray, path, cols: int = 16, scale: int = 3) -> None:
    from PIL import Image

    n = len(images)
    rows = (n + cols - 1) // cols
    h, w = images.shape[1:3]
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    Image.fromarray(grid).resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--guidance", type=float, nargs="+", default=[GATE["guidance"]])
    ap.add_argument("--steps", type=int, default=GATE["steps"])
    ap.add_argument("--per-combo", type=int, default=GATE["per_combo"])
    ap.add_argument("--seed", type=int, default=GATE["seed"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", default=None, help="write a PNG grid per guidance value (prefix)")
    ap.add_argument("--json", default=None, help="append results as JSON lines")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    comp = load_components(a.model)
    caps, attrs = gate_captions(a.per_combo)
    for gs in a.guidance:
        t0 = time.time()
        imgs = generate(captions=caps, seed=a.seed, steps=a.steps, guidance=gs, components=comp)
        res = score(imgs, attrs, a.classifier)
        line = {"model": a.model, "guidance": gs, "steps": a.steps, "n": len(caps), "seed": a.seed, **res,
                "seconds": round(time.time() - t0, 1)}
        print(json.dumps(line), flush=True)
        if a.grid:
            save_grid(imgs[:96], f"{a.grid}_g{gs:g}.png")
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
