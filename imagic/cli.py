"""``imagic``: the command line of the standalone path.

    imagic edit dog.jpg "a photo of a sitting dog" --model ./sd15 --out dog_sitting.png --etas 0.6,0.7,0.8
    imagic demo

Every input is checked before any model is loaded, and outputs are only written, each one whole,
after everything they depend on has succeeded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from .train import ImagicCancelled, ImagicError

# Imported lazily below: torch/diffusers make `imagic --help` slow.
_DEFAULT_ETAS = "0.5,0.6,0.7,0.8,0.9,1.0"


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return value


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (skip the stage) or more, got {value}")
    return value


def _count(text: str) -> int:
    value = _steps(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _etas(text: str) -> List[float]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one eta, e.g. 0.6,0.7,0.8")
    values = []
    for p in parts:
        try:
            values.append(_number(p))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"every eta must be a number, got {p!r} in {text!r}") from None
    return values


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import DEFAULTS

    parser = argparse.ArgumentParser(prog="imagic", description="Imagic: edit one photo with one text.")
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser("edit", help="edit an image with a target text on a diffusers Stable Diffusion model")
    e.add_argument("image", help="the photo to edit")
    e.add_argument("text", help="the target text, e.g. 'a photo of a sitting dog'")
    e.add_argument("--model", required=True, help="a local diffusers Stable Diffusion folder (or a hub id with internet)")
    e.add_argument("--out", required=True, help="output PNG/JPEG; with --etas, the contact sheet (each eta beside it)")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--eta", type=_number, default=None,
                   help=f"interpolation weight of the target text (default {DEFAULTS['eta']}); 0 reproduces the photo")
    g.add_argument("--etas", type=_etas, default=None,
                   help=f"comma-separated etas: one image each and a contact sheet, e.g. {_DEFAULT_ETAS}")
    e.add_argument("--embedding-steps", type=_steps, default=DEFAULTS["embedding_steps"], help="stage 1 Adam steps (0 skips)")
    e.add_argument("--finetune-steps", type=_steps, default=DEFAULTS["finetune_steps"], help="stage 2 Adam steps (0 skips)")
    e.add_argument("--lr-embedding", type=_positive, default=DEFAULTS["lr_embedding"], help="stage 1 learning rate")
    e.add_argument("--lr-finetune", type=_positive, default=None,
                   help=f"stage 2 learning rate (default {DEFAULTS['lr_finetune_lora']:g} for LoRA, "
                        f"{DEFAULTS['lr_finetune_full']:g} for full)")
    e.add_argument("--method", choices=("lora", "full"), default=DEFAULTS["method"], help="fine-tune LoRA adapters or all weights")
    e.add_argument("--rank", type=_count, default=DEFAULTS["rank"], help="LoRA rank")
    e.add_argument("--seed", type=_steps, default=DEFAULTS["seed"], help="seed for training noise and sampling")
    e.add_argument("--sample-steps", type=_count, default=DEFAULTS["sample_steps"], help="DDIM sampling steps")
    e.add_argument("--guidance", type=_number, default=DEFAULTS["guidance"], help="classifier-free guidance scale")
    e.add_argument("--size", type=_count, default=None, help="long side in pixels (default: the model's native size)")
    e.add_argument("--noise-samples", type=_count, default=DEFAULTS["noise_samples"], help="noise draws per training step")
    e.add_argument("--save-result", default=None, help="save e_tgt, e_opt and the fine-tune to this .safetensors file")
    e.add_argument("--load-result", default=None, help="skip training: sample from a result saved by --save-result")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    e.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weight dtype")

    d = sub.add_parser("demo", help="edit the shipped example image with the shipped toy model (no download)")
    d.add_argument("--out", default="imagic_demo.png", help="where to write the eta-sweep contact sheet")
    d.add_argument("--seed", type=_steps, default=0, help="seed")
    return parser


def _image_format(out: Path) -> str:
    ext = out.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or ext not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ImagicError(f"--out must end in .png, .jpg or .webp, got {out.name!r}")
    return fmt


def save_image(image: Image.Image, path: Path) -> None:
    from .results import atomic_write

    fmt = _image_format(path)
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[str], min_height: int = 160) -> Image.Image:
    """One column per image, each under its label; small images are enlarged so labels stay readable."""
    w, h = images[0].size
    scale = max(1, -(-min_height // h))
    cw, ch = w * scale, h * scale
    pad, label_h = 8, 24
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (len(images) * (cw + pad) + pad, ch + label_h + 2 * pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(zip(images, labels)):
        x = pad + i * (cw + pad)
        draw.text((x, pad), label, fill="black", font=font)
        sheet.paste(img.resize((cw, ch), Image.NEAREST), (x, pad + label_h))
    return sheet


def _stage_bar(total_desc):
    from tqdm.auto import tqdm

    bars = {}

    def for_stage(stage):
        def update(step, total, loss):
            bar = bars.get(stage)
            if bar is None:
                bar = bars[stage] = tqdm(total=total, desc=total_desc.get(stage, stage), unit="step")
            bar.update(1)
            if loss == loss:
                bar.set_postfix(loss=f"{loss:.4f}")
            if step == total:
                bar.close()
        return update

    return for_stage


def _quiet_libraries():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def run_edit(args) -> List[Path]:
    """The ``edit`` command; returns the files written."""
    import torch

    from .pipeline import DEFAULTS, ImagicPipeline, _check_model_folder
    from .results import load_result

    out = Path(args.out)
    fmt_check = _image_format(out)  # noqa: F841  (fails early on a bad extension)
    if not Path(args.image).is_file():
        raise ImagicError(f"image not found: {args.image}")
    try:
        with Image.open(args.image) as im:
            im.verify()
    except Exception as e:  # PIL raises several types for non-images
        raise ImagicError(f"{args.image} is not an image that can be read ({type(e).__name__})") from None
    if not args.text.strip():
        raise ImagicError("the target text is empty: describe the edited image, e.g. 'a photo of a sitting dog'")
    if Path(args.model).exists() or args.model.count("/") != 1:
        _check_model_folder(Path(args.model))
    loaded = load_result(args.load_result) if args.load_result else None
    if args.save_result and not args.save_result.endswith(".safetensors"):
        raise ImagicError(f"--save-result must be a .safetensors file, got {args.save_result!r}")
    etas = args.etas if args.etas is not None else [args.eta if args.eta is not None else DEFAULTS["eta"]]

    _quiet_libraries()
    dtype = getattr(torch, args.dtype)
    pipe = ImagicPipeline.from_pretrained(args.model, device=args.device, dtype=dtype)
    bars = _stage_bar({"embedding": "1/3 optimize embedding", "finetune": "2/3 fine-tune", "sample": "3/3 sample"})
    if loaded is not None:
        result = loaded
        saved_text = result.settings.get("target_text")
        if saved_text and saved_text != args.text:
            print(f"note: the loaded result was trained for {saved_text!r}; its embeddings are used, not {args.text!r}",
                  file=sys.stderr)
        print(f"loaded {args.load_result}: training skipped", file=sys.stderr)
    else:
        result = pipe.train(args.image, args.text, embedding_steps=args.embedding_steps,
                            finetune_steps=args.finetune_steps, lr_embedding=args.lr_embedding,
                            lr_finetune=args.lr_finetune, method=args.method, rank=args.rank, seed=args.seed,
                            size=args.size, noise_samples=args.noise_samples, progress=bars)
    images = pipe.sample(result, etas, seed=args.seed, steps=args.sample_steps, guidance=args.guidance,
                         progress=bars("sample"))

    written = []
    if args.save_result and loaded is None:
        written.append(result.save(args.save_result))
    if args.etas is None:
        save_image(images[0], out)
        written.append(out)
    else:
        for eta, img in zip(etas, images):
            path = out.with_name(f"{out.stem}_eta{eta:.2f}{out.suffix}")
            save_image(img, path)
            written.append(path)
        size = (int(result.settings["width"]), int(result.settings["height"]))
        source = pipe.load_image(args.image, max(size)).resize(size)
        save_image(contact_sheet([source] + images, ["input"] + [f"eta {eta:.2f}" for eta in etas]), out)
        written.append(out)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "edit":
            written = run_edit(args)
        else:
            from .demo import run_demo

            written = run_demo(args)
    except ImagicError as e:
        print(f"imagic: error: {e}", file=sys.stderr)
        return 2
    except ImagicCancelled as e:
        print(f"imagic: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("imagic: interrupted; nothing was written", file=sys.stderr)
        return 130
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
