"""Small CNN attribute classifier for the toy images (one head per attribute).

    python -m imagic.toy.classifier --train --out imagic/toy/classifier.safetensors
    python -m imagic.toy.classifier --eval            # held-out accuracy of the shipped one

It is trained on the generator's train seeds with light augmentation (pixel
noise, blur, brightness/contrast), so that it also reads slightly imperfect
generated images, and it is evaluated on the held-out ``test`` seeds.

    >>> from imagic.toy.classifier import predict_attributes
    >>> predict_attributes(images)  # uint8 [N,32,32,3] -> [{"shape": ..., "colour": ..., ...}, ...]
"""

from __future__ import annotations

import argparse
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from . import data, CLASSIFIER_PATH

HEAD_SIZES = tuple(len(v) for v in data.ATTRIBUTES.values())


class AttributeClassifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2),  # 16
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8
            *block(2 * w, 2 * w), nn.MaxPool2d(2),  # 4
            nn.Flatten(),
            nn.Linear(2 * w * 16, 128), nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleList([nn.Linear(128, n) for n in HEAD_SIZES])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: float [N,3,32,32] in [-1,1] -> one logits tensor per attribute."""
        h = self.features(x)
        return [head(h) for head in self.heads]


def to_tensor(images) -> torch.Tensor:
    """uint8 HxWx3 / NxHxWx3 numpy, PIL images, or a list of them -> float [N,3,32,32] in [-1,1].

    A torch tensor is taken as already [N,3,H,W]: uint8, or float in [0,1].
    Other sizes are resized (bilinear) to 32x32.
    """
    if isinstance(images, torch.Tensor):
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.ndim == 3:
            x = x[None]
    else:
        if not isinstance(images, (list, tuple)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        arrs = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (data.IMAGE_SIZE, data.IMAGE_SIZE):
        x = F.interpolate(x, size=(data.IMAGE_SIZE, data.IMAGE_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)
    return x * 2 - 1


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light, label-preserving corruption of a [-1,1] batch."""
    n = x.shape[0]
    # brightness / contrast
    a = 1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.2
    b = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.1
    x = x * a + b
    # blur half of the batch with a 3x3 box/gauss mix
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
    m = (torch.rand(n, 1, 1, 1, generator=g) < 0.5).float()
    x = m * blurred + (1 - m) * x
    # pixel noise, sigma up to 0.1 (in [-1,1] units)
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 0.1
    x = x + sigma * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> dict:
    model.eval()
    preds = []
    for i in range(0, len(images), batch):
        logits = model(to_tensor(images[i:i + batch]))
        preds.append(torch.stack([lg.argmax(1) for lg in logits], 1).numpy())
    p = np.concatenate(preds)
    out = {name: float((p[:, j] == labels[:, j]).mean()) for j, name in enumerate(data.ATTRIBUTE_NAMES)}
    out["all"] = float((p == labels).all(1).mean())
    return out


def train(out: Path, seed: int = 0, n_train: int = 24000, epochs: int = 4, batch: int = 128,
          lr: float = 2e-3, n_eval: int = 2000, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    # offset 500k: different train-split images from those the diffusion model starts with
    images, labels, _ = data.make_dataset(data.split_seeds("train", n_train, offset=500_000))
    x_all = to_tensor(images)
    y_all = torch.from_numpy(labels)
    ev_images, ev_labels, _ = data.make_dataset(data.split_seeds("val", n_eval))
    print(f"data: {n_train} train, {n_eval} val images ({time.time() - t0:.0f}s)", flush=True)

    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * (n_train // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    step = 0
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=g)
        for i in range(n_train // batch):
            idx = perm[i * batch:(i + 1) * batch]
            x = augment(x_all[idx], g)
            logits = model(x)
            loss = sum(F.cross_entropy(lg, y_all[idx, j]) for j, lg in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        acc = accuracy(model, ev_images, ev_labels)
        print(f"epoch {ep + 1}/{epochs} loss {loss.item():.4f} val {fmt(acc)} ({time.time() - t0:.0f}s)", flush=True)
    test = evaluate(model)
    print(f"held-out test accuracy: {fmt(test)}", flush=True)
    meta = {
        "attributes": json.dumps({k: list(v) for k, v in data.ATTRIBUTES.items()}),
        "test_accuracy": json.dumps(test),
        "training": json.dumps({"seed": seed, "n_train": n_train, "epochs": epochs, "batch": batch,
                                "lr": lr, "threads": threads, "torch": torch.__version__,
                                "wall_seconds": round(time.time() - t0, 1)}),
    }
    save(model, out, meta)
    print(f"saved {out}", flush=True)
    return test


def evaluate(model: nn.Module, n: int = 5000) -> dict:
    images, labels, _ = data.make_dataset(data.split_seeds("test", n))
    return accuracy(model, images, labels)


def fmt(acc: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in acc.items())


def save(model: nn.Module, path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata or {})


def load_classifier(path=None) -> AttributeClassifier:
    """The shipped classifier (or the one at ``path``), in eval mode."""
    return _load(str(path or CLASSIFIER_PATH))


@lru_cache(maxsize=4)
def _load(path: str) -> AttributeClassifier:
    from safetensors.torch import load_file

    model = AttributeClassifier()
    model.load_state_dict(load_file(path), strict=False)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict_attributes(images, model: AttributeClassifier | None = None,
                       return_probs: bool = False) -> list[dict]:
    """Attributes of each image: ``[{"shape": "circle", "colour": "red", ...}, ...]``.

    With ``return_probs`` each dict also has ``"probs": {attr: {value: p}}``.
    """
    model = model or load_classifier()
    x = to_tensor(images)
    out: list[dict] = [{} for _ in range(x.shape[0])]
    for i in range(0, x.shape[0], 500):
        logits = model(x[i:i + 500])
        for j, name in enumerate(data.ATTRIBUTE_NAMES):
            probs = logits[j].softmax(1)
            values = data.ATTRIBUTES[name]
            for k, row in enumerate(probs):
                d = out[i + k]
                d[name] = values[int(row.argmax())]
                if return_probs:
                    d.setdefault("probs", {})[name] = {v: float(p) for v, p in zip(values, row)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--out", default=str(CLASSIFIER_PATH))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=24000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.train:
        train(Path(a.out), seed=a.seed, n_train=a.n_train, epochs=a.epochs, threads=a.threads)
    if a.eval or not a.train:
        torch.set_num_threads(a.threads)
        print(f"held-out test accuracy ({a.out}): {fmt(evaluate(load_classifier(a.out)))}")


if __name__ == "__main__":
    main()
