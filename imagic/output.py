"""What the CLI and the demo share on the terminal and on disk: progress bars, quiet libraries,
labelled contact sheets, and image files written whole or not at all.

No torch here (the CLI imports this module for its early checks); tqdm, diffusers and transformers
are imported only by the functions that use them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import ImagicError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
STAGES = {"embedding": "1/3 optimize embedding", "finetune": "2/3 fine-tune", "sample": "3/3 sample"}


# ---------------------------------------------------------------------------------------------- files
def current_umask() -> int:
    """The process umask, read without changing it where the system allows (os.umask would, for an
    instant, in every thread: the ComfyUI nodes save from worker threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write_fn: Callable[[str], None]) -> Path:
    """Call ``write_fn(tmp_path)`` then move the file into place: all or nothing.

    The temporary file is created private (mkstemp's 0600); the finished file gets the mode any
    ordinary new file gets, 0666 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def image_format(out: Union[str, Path]) -> str:
    """PIL's format name for an output path; an ImagicError for anything but PNG, JPEG or WebP."""
    out = Path(out)
    ext = out.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or ext not in IMAGE_SUFFIXES:
        raise ImagicError(f"--out must end in .png, .jpg or .webp, got {out.name!r}")
    return fmt


def save_image(image: Image.Image, path: Union[str, Path]) -> Path:
    fmt = image_format(path)
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


# --------------------------------------------------------------------------------------- contact sheet
Line = Union[str, Tuple[str, str]]  # text, or (text, colour)
Box = Tuple[int, int, int, int]  # left, top, right, bottom of one image on the sheet


def font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled TrueType font (needs FreeType)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, f) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=f)
    return right - left


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[str], *, title: Sequence[Line] = (),
                  captions: Optional[Sequence[Sequence[Line]]] = None, chosen: Optional[int] = None,
                  min_height: int = 160) -> Tuple[Image.Image, List[Box]]:
    """One column per image: its label above, its caption lines below, the title lines on top.

    Small images are enlarged by a whole factor (nearest neighbour), so every pixel stays visible and
    each tile is exactly the image scaled up. ``chosen`` frames that column. Returns the sheet and
    the box of each image on it.
    """
    w, h = images[0].size
    scale = max(1, -(-min_height // h))
    cw, ch = w * scale, h * scale
    pad, title_h, label_h, caption_h = 12, 22, 22, 18
    title_font, label_font, caption_font = font(16), font(14), font(13)
    captions = list(captions) if captions is not None else [[] for _ in images]
    n_caption = max((len(c) for c in captions), default=0)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max([_text_width(probe, t if isinstance(t, str) else t[0], title_font) for t in title] or [0])
    width = max(len(images) * (cw + pad) + pad, widest + 2 * pad)
    top = pad + len(title) * title_h + (pad if title else 0)
    height = top + label_h + ch + (pad // 2 + n_caption * caption_h if n_caption else 0) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)

    def write(xy, line: Line, f):
        text, colour = (line, "black") if isinstance(line, str) else line
        draw.text(xy, text, fill=colour, font=f)

    for i, line in enumerate(title):
        write((pad, pad + i * title_h), line, title_font)
    boxes: List[Box] = []
    for i, (img, label) in enumerate(zip(images, labels)):
        x, y = pad + i * (cw + pad), top + label_h
        write((x, top), label, label_font)
        sheet.paste(img.convert("RGB").resize((cw, ch), Image.NEAREST), (x, y))
        boxes.append((x, y, x + cw, y + ch))
        for j, line in enumerate(captions[i]):
            write((x, y + ch + pad // 2 + j * caption_h), line, caption_font)
        if i == chosen:
            draw.rectangle((x - 5, top - 4, x + cw + 4, height - 4), outline=(0, 150, 60), width=4)
    return sheet, boxes


def tile(sheet: Image.Image, box: Box, size: Tuple[int, int]) -> Image.Image:
    """The image in one box of a contact sheet at its own ``size``: undoes the whole-factor enlargement."""
    arr = np.asarray(sheet.convert("RGB").crop(box))
    sy, sx = arr.shape[0] // size[1], arr.shape[1] // size[0]
    return Image.fromarray(np.ascontiguousarray(arr[sy // 2::sy, sx // 2::sx][:size[1], :size[0]]))


# -------------------------------------------------------------------------------------------- terminal
def stage_bar(descriptions: Dict[str, str] = STAGES):
    """``progress(stage)`` for ImagicPipeline.train/sample: one tqdm bar per stage, with the loss."""
    from tqdm.auto import tqdm

    bars = {}

    def for_stage(stage):
        def update(step, total, loss):
            bar = bars.get(stage)
            if bar is None:
                bar = bars[stage] = tqdm(total=total, desc=descriptions.get(stage, stage), unit="step")
            bar.update(1)
            if loss == loss:
                bar.set_postfix(loss=f"{loss:.4f}")
            if step == total:
                bar.close()
        return update

    return for_stage


def quiet_libraries() -> None:
    """diffusers and transformers: errors only, no download or loading bars."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
