"""io.Schema across the supported hosts: fields a host does not have yet are left out, not an error."""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

_FIELDS = {f.name for f in dataclasses.fields(io.Schema)} if dataclasses.is_dataclass(io.Schema) else None


def schema(**fields) -> io.Schema:
    """``io.Schema(**fields)``, dropping the optional ones (``search_aliases``, since 0.9) this host lacks."""
    if _FIELDS is not None:
        fields = {k: v for k, v in fields.items() if k in _FIELDS or k not in ("search_aliases",)}
    return io.Schema(**fields)
