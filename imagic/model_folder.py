"""Is ``--model`` a local diffusers Stable Diffusion folder? Answered without torch or diffusers, so
that the CLI refuses a wrong path in a fraction of a second instead of after loading them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from .errors import ImagicError

REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")


def is_local_model(model: Union[str, Path]) -> bool:
    """A path, not a hub id: it exists, starts like a path (./ ../ / ~), or is not one "owner/name"."""
    text = str(model)
    return (isinstance(model, Path) or Path(text).exists() or text.startswith((".", "/", "~")) or "\\" in text
            or text.count("/") != 1)


def check_model_folder(path: Union[str, Path]) -> dict:
    """The folder's model_index.json, or an ImagicError that says what is wrong with the folder."""
    shown, path = str(path), Path(path)
    if not path.exists():
        raise ImagicError(f"model folder not found: {shown}. Point --model at a diffusers Stable Diffusion folder "
                          "(one saved with save_pretrained(): model_index.json, unet/, text_encoder/, tokenizer/, "
                          "scheduler/).")
    index_file = path / "model_index.json"
    if not path.is_dir() or not index_file.is_file():
        raise ImagicError(f"{path} is not a diffusers Stable Diffusion folder (no model_index.json). Point --model "
                          "at a folder saved with save_pretrained(), with unet/, text_encoder/, tokenizer/ and scheduler/.")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ImagicError(f"{index_file} is not valid JSON: {e}") from None
    missing = [c for c in REQUIRED_COMPONENTS if not (isinstance(index.get(c), list) and index[c][0])]
    if "unet" in missing and isinstance(index.get("transformer"), list) and index["transformer"][0]:
        raise ImagicError(f"{path} is a transformer model ({index.get('_class_name', 'a DiT pipeline')}: Flux, SD3, ...): "
                          "the standalone path runs UNet models (SD1.x, SD2.x, SDXL, UNet flow models such as the "
                          "flow toy); edit this model with the ComfyUI nodes")
    if missing:
        raise ImagicError(f"{path} is not a Stable Diffusion model: model_index.json lacks {', '.join(missing)}")
    return index
