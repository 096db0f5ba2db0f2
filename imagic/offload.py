"""Tensors that wait outside the compute memory while they are not read, and come back bit for bit.

A full fine-tune trains a copy W' of every weight, so the base values are dead weight until the
difference W' - W is taken at the end: one model-sized buffer of the four it would otherwise hold.
``parked`` moves them out and back: tensors on an accelerator wait on the CPU; CPU tensors wait in a
temporary safetensors file mapped from disk (pages are read back only when touched). On exit every
tensor has its exact values again, in ordinary memory on its device (an inference tensor where it
was one), and the file is deleted, also after an error or a cancel.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import List, Optional, Sequence

import torch

from .errors import ImagicError


@contextmanager
def parked(params: Sequence[torch.nn.Parameter], sharers: Optional[List[List[torch.Tensor]]] = None,
           folder: Optional[str] = None):
    """Inside the block, ``params`` (and each one's ``sharers``: other parameters on the same memory, which
    must move with it or nothing is freed) hold a parked copy of their values; on exit, their own again.

    ``folder``: where the file for CPU tensors goes (default: the system's temporary folder, TMPDIR).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    sharers = sharers or [[] for _ in params]
    # Where each tensor lives now; the references are dropped before the block so the memory is freed.
    homes = [(p.device, p.dtype, p.shape, p.stride(), [q.is_inference() for q in [p] + sharers[i]])
             for i, p in enumerate(params)]
    on_cpu = [device.type == "cpu" for device, *_ in homes]
    path, moved = None, 0
    try:
        with torch.no_grad():
            if any(on_cpu):
                fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="imagic_base_", dir=folder)
                os.close(fd)
                try:
                    save_file({str(i): p.detach().contiguous() for i, p in enumerate(params) if on_cpu[i]}, path)
                except OSError as e:
                    size = sum(p.numel() * p.element_size() for p, c in zip(params, on_cpu) if c) / 1e9
                    raise ImagicError(f"could not write the base weights ({size:.1f} GB) to {path} while the full "
                                      f"fine-tune runs ({e.strerror or e}): free disk space there or point "
                                      "TMPDIR at a folder with room") from None
                mapped = safe_open(path, framework="pt")
            for i, p in enumerate(params):
                waiting = mapped.get_tensor(str(i)) if on_cpu[i] else p.data.to("cpu", copy=True)
                for q in [p] + sharers[i]:
                    q.data = waiting
                moved = i + 1
        yield
    finally:
        with torch.no_grad():
            for i, (p, (device, dtype, shape, stride, inference)) in enumerate(zip(params[:moved], homes)):
                # One tensor again for the parameter and its sharers, an inference tensor where it was one.
                with torch.inference_mode(any(inference)):
                    home = torch.empty_strided(shape, stride, dtype=dtype, device=device)
                    home.copy_(p.data)
                for q in [p] + sharers[i]:
                    q.data = home
        if path is not None:
            os.remove(path)
