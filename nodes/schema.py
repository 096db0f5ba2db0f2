"""io.Schema across the supported hosts: optional fields a host does not have yet are left out."""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

# Fields newer hosts added that a node can do without (search_aliases: since ComfyUI 0.9).
OPTIONAL_FIELDS = ("search_aliases",)
_UNKNOWN = set(OPTIONAL_FIELDS) - {f.name for f in dataclasses.fields(io.Schema)}


def schema(**fields) -> io.Schema:
    """``io.Schema(**fields)`` without the optional fields this host's Schema lacks."""
    return io.Schema(**{k: v for k, v in fields.items() if k not in _UNKNOWN})
