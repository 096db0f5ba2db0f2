"""Progress and Cancel: the host's progress bar and node text for the core's callbacks, and its interrupt.

The core reports ``progress(step, total, loss)`` and asks ``cancel()`` before every step;
``NodeProgress`` answers both with the host's ``comfy.utils.ProgressBar`` and
``comfy.model_management.processing_interrupted``, and ``cancellable`` turns the core's
``ImagicCancelled`` into the host's ``InterruptProcessingException``, which the executor reports as a
cancelled run. Internals touched: through ``internals``, the server's progress text.
"""
from __future__ import annotations

import logging
import time

import comfy.model_management
import comfy.utils

from ...imagic import ImagicCancelled
from . import internals


class NodeProgress:
    """The host's progress bar plus a read-out on the node (loss, the rate measured after the first step,
    time left; in the log too, now and then), and the Cancel check.

    ``note``: a warning shown above the read-out. ``also``: another ``progress(step, total, loss)`` to
    call after each step (the benchmark's clock).
    """

    def __init__(self, total: int, node_id, label: str, note: str | None = None, also=None, clock=time.perf_counter):
        self.bar = comfy.utils.ProgressBar(total)
        self.node_id, self.label, self.note, self.also, self.clock = node_id, label, note, also, clock
        self.info = None  # a line shown above the read-out (the estimate made before the first step)
        self.first = None  # (step, time) at the end of the first step: the rate is measured after it

    def rate(self, step) -> float | None:
        """Steps per second since the first step (which also loads kernels and runs the in-place probe)."""
        if self.first is None or step <= self.first[0]:
            return None
        elapsed = self.clock() - self.first[1]
        return (step - self.first[0]) / elapsed if elapsed > 0 else None

    def timing(self, step, total) -> str:
        rate = self.rate(step)
        if rate is None:
            return ""
        per_step = f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step"
        return f"  {per_step}, {_duration((total - step) / rate)} left" if step < total else f"  {per_step}"

    def text(self, step, total, loss) -> str:
        line = f"{self.label} {step}/{total}  loss {loss:.4f}{self.timing(step, total)}"
        warnings = [f"warning: {n}" for n in (self.note or "").split("\n") if n]
        return "\n".join(warnings + ([self.info] if self.info else []) + [line])

    def __call__(self, step, total, loss):
        if self.first is None:
            self.first = (step, self.clock())
        self.bar.update_absolute(step, total)
        if step == total or step % 10 == 0 or step == 1:
            text = self.text(step, total, loss)
            internals.send_progress_text(text, self.node_id)
            if step in (total, 10) or step % 100 == 0:
                logging.info("Imagic %s", text.splitlines()[-1])
        if self.also is not None:
            self.also(step, total, loss)

    @staticmethod
    def cancel() -> bool:
        return comfy.model_management.processing_interrupted()


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def cancellable(fn):
    """``fn()``, with the core's cancellation turned into the host's interrupt."""
    try:
        return fn()
    except ImagicCancelled:
        raise comfy.model_management.InterruptProcessingException() from None
