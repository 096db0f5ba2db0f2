"""``imagic``: the command line of the standalone path.

    imagic edit dog.jpg "a photo of a sitting dog" --model ./sd15 --out dog_sitting.png --etas 0.6,0.7,0.8
    imagic demo

Every input is checked before any model is loaded, and outputs are only written, each one whole,
after everything they depend on has succeeded. This module imports neither torch nor diffusers at
import time: ``imagic --help`` and every argument error answer at once; ``run_edit`` imports them
after its checks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, NoReturn, Optional, Sequence

from .defaults import DEFAULTS, PRESETS, eta_sweep_text, finetune_lr_warning, format_rate, lr_finetune_default
from .errors import ImagicCancelled, ImagicError

SEED_MAX = 2 ** 64 - 1  # torch.Generator.manual_seed's range (and the ComfyUI nodes')


class ImagicArgumentParser(argparse.ArgumentParser):
    """argparse, with errors as ``imagic: error: <message>`` (exit 2) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        command = self.prog if self.prog.startswith("imagic ") else "imagic"
        self.exit(2, f"imagic: error: {message}\n(see: {command} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if getattr(namespace, "command", None) == "edit" and not self.prog.startswith("imagic "):
            apply_preset(namespace)
        return namespace, extra


PRESET_KEYS = ("embedding_steps", "lr_embedding", "finetune_steps", "lr_finetune", "method")


def apply_preset(args) -> None:
    """Fill the training options the command line left unset (None): from --preset, else the defaults
    (stage 2's learning rate stays None: the method's default, ``finetune_lr``). Options given win."""
    preset = dict(PRESETS[args.preset]) if args.preset else {}
    if args.method is not None and preset.get("method", args.method) != args.method:
        preset.pop("lr_finetune", None)  # the preset's rate belongs to its method, not to the one given
    for key in PRESET_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, DEFAULTS.get(key) if key != "lr_finetune" else None))


# ------------------------------------------------------------------------ argument types: one message each
def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _learning_rate(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a learning rate must be greater than 0, got {text!r}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _stage_steps(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (skip the stage) or more, got {value}")
    return value


def _at_least_one(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _seed(text: str) -> int:
    value = _whole(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to 2**64 - 1, got {value}")
    return value


def _etas(text: str) -> List[float]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"give at least one eta, e.g. {eta_sweep_text()}")
    values = []
    for p in parts:
        try:
            values.append(_number(p))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"every eta must be a number, got {p!r} in {text!r}") from None
    return values


# -------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    D = DEFAULTS
    parser = ImagicArgumentParser(
        prog="imagic", description="Imagic: edit one photo with one target text (Kawar et al., CVPR 2023).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="start with:\n"
               "  imagic demo           an edit on the shipped toy model, no download (under a minute on a CPU)\n"
               "  imagic edit --help    the options of a real edit, each with its default")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{edit,demo}")

    e = sub.add_parser("edit", help="edit an image with a target text on a diffusers Stable Diffusion model",
                       description="Optimize the text embedding on the photo (stage 1), fine-tune the model with it "
                                   "(stage 2), then sample eta * target + (1 - eta) * optimized (stage 3).")
    e.add_argument("image", help="the photo to edit")
    e.add_argument("text", help="the target text, e.g. 'a photo of a sitting dog'")
    e.add_argument("--model", required=True,
                   help="a local diffusers Stable Diffusion folder (SD 1.x, 2.x, SDXL), or a hub id with internet")
    e.add_argument("--out", required=True,
                   help="output .png/.jpg/.webp; with --etas the contact sheet, each eta's image beside it")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--eta", type=_number, default=None,
                   help=f"interpolation weight of the target text; 0 reproduces the photo, 1 is the text alone "
                        f"(default: {D['eta']:g})")
    g.add_argument("--etas", type=_etas, default=None,
                   help=f"comma-separated etas: one image each and a contact sheet, e.g. {eta_sweep_text()} "
                        f"(default: one image at --eta)")
    def default_option(flag, key, what, **kw):  # an option whose default is DEFAULTS[key], shown in its help
        value = D[key]
        shown = format_rate(value) if isinstance(value, float) else value
        # (training options start unset, so that --preset can tell an option given from its default)
        e.add_argument(flag, default=None if key in PRESET_KEYS else value, help=f"{what} (default: {shown})", **kw)

    def preset_text(name):
        return " ".join(f"{k.replace('_', '-')} {format_rate(v) if isinstance(v, float) else v}"
                        for k, v in PRESETS[name].items())

    e.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"paper: the paper's Stable Diffusion settings ({preset_text('paper')}); fast: a quarter of "
                        f"the default training steps at 4x the rates ({preset_text('fast')}), which on the toy models "
                        "keeps less of the photo (README, 'Edit quality'). Options given explicitly win "
                        "(default: none, the defaults below)")

    default_option("--embedding-steps", "embedding_steps", "stage 1 Adam steps, 0 skips", type=_stage_steps)
    default_option("--lr-embedding", "lr_embedding", "stage 1 learning rate", type=_learning_rate)
    default_option("--finetune-steps", "finetune_steps", "stage 2 Adam steps, 0 skips", type=_stage_steps)
    e.add_argument("--lr-finetune", type=_learning_rate, default=None,
                   help=f"stage 2 learning rate (default: {format_rate(lr_finetune_default('lora'))} with --method lora, "
                        f"{format_rate(lr_finetune_default('full'))} with --method full)")
    default_option("--method", "method", "stage 2 trains LoRA adapters on every Linear/Conv2d, or all weights",
                   choices=("lora", "full"))
    default_option("--rank", "rank", "LoRA rank, ignored by --method full", type=_at_least_one)
    default_option("--seed", "seed", "seed of the training noise and of the sampling noise", type=_seed)
    default_option("--sample-steps", "sample_steps", "DDIM sampling steps", type=_at_least_one)
    default_option("--guidance", "guidance", "classifier-free guidance scale, against the empty prompt", type=_number)
    e.add_argument("--size", type=_at_least_one, default=None,
                   help="long side in pixels, aspect ratio kept (default: the model's native size)")
    default_option("--noise-samples", "noise_samples", "noise draws per training step", type=_at_least_one)
    e.add_argument("--save-result", default=None,
                   help="also save e_tgt, e_opt and the fine-tune to this .safetensors file (default: not saved)")
    e.add_argument("--load-result", default=None,
                   help="skip training: sample from a file written by --save-result (default: train)")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    e.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="weight dtype (default: float32)")

    from .demo import DEMO_SEED, DEMO_OUT

    d = sub.add_parser("demo", help="edit the shipped example image with the shipped toy model (no download)",
                       description="Edits the toy model's example image and writes a contact sheet that shows the "
                                   "input, the target text and each eta with the toy classifier's reading.")
    d.add_argument("--out", default=DEMO_OUT, help=f"where to write the contact sheet (default: {DEMO_OUT})")
    d.add_argument("--seed", type=_seed, default=DEMO_SEED,
                   help=f"seed of the training and sampling noise (default: {DEMO_SEED}, the one the README shows)")
    return parser


# ---------------------------------------------------------------------------------------------- edit
def check_edit_inputs(args) -> None:
    """Every check that needs no model, so no torch: refused in well under a second."""
    from PIL import Image

    from .model_folder import check_model_folder, is_local_model
    from .output import image_format

    image_format(args.out)
    if not Path(args.image).is_file():
        raise ImagicError(f"image not found: {args.image}")
    try:
        with Image.open(args.image) as im:
            im.verify()
    except Exception as e:  # PIL raises several types for non-images
        raise ImagicError(f"{args.image} is not an image that can be read ({type(e).__name__})") from None
    if not args.text.strip():
        raise ImagicError("the target text is empty: describe the edited image, e.g. 'a photo of a sitting dog'")
    if is_local_model(args.model):
        check_model_folder(args.model)
    if args.load_result and not Path(args.load_result).is_file():
        raise ImagicError(f"Imagic result file not found: {args.load_result}")
    if args.save_result and not args.save_result.endswith(".safetensors"):
        raise ImagicError(f"--save-result must be a .safetensors file, got {args.save_result!r}")


def finetune_lr(args) -> float:
    """The stage 2 learning rate this command trains with: --lr-finetune, else the method's default."""
    return args.lr_finetune if args.lr_finetune is not None else lr_finetune_default(args.method)


def run_edit(args) -> List[Path]:
    """The ``edit`` command; returns the files written."""
    check_edit_inputs(args)
    training = not args.load_result and args.finetune_steps > 0
    warning = finetune_lr_warning(args.method, finetune_lr(args)) if training else None
    if warning:
        print(f"imagic: warning: {warning} (--method, --lr-finetune)", file=sys.stderr)

    import torch

    from .output import contact_sheet, quiet_libraries, save_image, stage_bar
    from .pipeline import ImagicPipeline
    from .results import load_result

    out = Path(args.out)
    loaded = load_result(args.load_result) if args.load_result else None
    etas = args.etas if args.etas is not None else [args.eta if args.eta is not None else DEFAULTS["eta"]]

    quiet_libraries()
    pipe = ImagicPipeline.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    bars = stage_bar()
    if loaded is not None:
        result = loaded
        saved_text = result.settings.get("target_text")
        if saved_text and saved_text != args.text:
            print(f"note: the loaded result was trained for {saved_text!r}; its embeddings are used, not {args.text!r}",
                  file=sys.stderr)
        print(f"loaded {args.load_result}: training skipped", file=sys.stderr)
    else:
        # The learning-rate warning was printed above, before the model loaded: stage 2 does not repeat it.
        result = pipe.train(args.image, args.text, embedding_steps=args.embedding_steps,
                            finetune_steps=args.finetune_steps, lr_embedding=args.lr_embedding,
                            lr_finetune=finetune_lr(args), method=args.method, rank=args.rank, seed=args.seed,
                            size=args.size, noise_samples=args.noise_samples, progress=bars,
                            warn=lambda message: None)
    images = pipe.sample(result, etas, seed=args.seed, steps=args.sample_steps, guidance=args.guidance,
                         progress=bars("sample"))

    written = []
    if args.save_result and loaded is None:
        written.append(result.save(args.save_result))
    if args.etas is None:
        written.append(save_image(images[0], out))
    else:
        for eta, img in zip(etas, images):
            written.append(save_image(img, out.with_name(f"{out.stem}_eta{eta:.2f}{out.suffix}")))
        size = (int(result.settings["width"]), int(result.settings["height"]))
        source = pipe.load_image(args.image, max(size)).resize(size)
        labels = ["input"] + [f"eta {eta:.2f}" + (" (default)" if eta == DEFAULTS["eta"] else "") for eta in etas]
        chosen = 1 + etas.index(DEFAULTS["eta"]) if DEFAULTS["eta"] in etas else None
        sheet, _ = contact_sheet([source] + images, labels, chosen=chosen,
                                 title=[f"target text: {result.settings.get('target_text', args.text)!r}"])
        written.append(save_image(sheet, out))
    return written


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
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
    if args.command == "edit":  # the demo says where its sheet went itself, with what to look at
        for path in written:
            print(Path(path).resolve())
        print(f"imagic: {len(written)} file(s) written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
