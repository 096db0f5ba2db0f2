"""One safetensors file per Imagic result: e_tgt, e_opt, the fine-tune delta and the settings.

Loading never unpickles anything, checks what it reads, and says what is wrong with a file that
is not an Imagic result. Saving writes a temporary file and renames it (``output.atomic_write``), so an
interrupted save never leaves a half-written result under the final name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .deltas import WeightDelta, delta_from_state_dict
from .objective import Conditioning
from .errors import ImagicError
from .output import atomic_write

FORMAT = "imagic-result"
VERSION = "1"


@dataclass
class ImagicResult:
    e_tgt: Conditioning
    e_opt: Conditioning
    delta: Optional[WeightDelta] = None
    settings: Dict[str, Any] = field(default_factory=dict)

    def save(self, path) -> Path:
        return save_result(self, path)

    @staticmethod
    def load(path) -> "ImagicResult":
        return load_result(path)


def save_result(result: ImagicResult, path) -> Path:
    tensors = {}
    for part, cond in (("e_tgt", result.e_tgt), ("e_opt", result.e_opt)):
        for k, v in cond.items():
            tensors[f"{part}.{k}"] = v.detach().cpu().clone().contiguous()  # clone: e_tgt and e_opt may share storage
    if result.delta is not None:
        for k, v in result.delta.to_state_dict().items():
            tensors[f"delta.{k}"] = v.contiguous().cpu()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "delta_method": result.delta.method if result.delta is not None else "none",
        "settings": json.dumps(result.settings, sort_keys=True),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_result(path) -> ImagicResult:
    path = Path(path)
    if not path.is_file():
        raise ImagicError(f"Imagic result file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ImagicError(f"{path} is not a readable safetensors file ({e}). "
                          "Imagic results are saved with --save-result or the Save Embedding node.") from None
    if meta.get("format") != FORMAT:
        raise ImagicError(f"{path} is a safetensors file but not an Imagic result (format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ImagicError(f"{path} is an Imagic result of version {meta.get('version')!r}; this version reads {VERSION}")
    e_tgt = {k[len("e_tgt."):]: v for k, v in tensors.items() if k.startswith("e_tgt.")}
    e_opt = {k[len("e_opt."):]: v for k, v in tensors.items() if k.startswith("e_opt.")}
    if not e_tgt or set(e_tgt) != set(e_opt) or any(e_tgt[k].shape != e_opt[k].shape for k in e_tgt):
        raise ImagicError(f"{path} is damaged: e_tgt and e_opt are missing or do not match")
    delta = None
    if meta.get("delta_method", "none") != "none":
        try:
            delta = delta_from_state_dict({k: v for k, v in tensors.items() if k.startswith("delta.")}, "delta.")
        except ValueError as e:
            raise ImagicError(f"{path} is damaged: {e}") from None
    try:
        settings = json.loads(meta.get("settings", "{}"))
    except json.JSONDecodeError:
        raise ImagicError(f"{path} is damaged: its settings are not valid JSON") from None
    return ImagicResult(e_tgt=e_tgt, e_opt=e_opt, delta=delta, settings=settings)
