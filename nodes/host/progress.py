"""Progress and Cancel: the host's progress bar and node text for the core's callbacks, and its interrupt.

The core reports ``progress(step, total, loss)`` and asks ``cancel()`` before every step;
``NodeProgress`` answers both with the host's ``comfy.utils.ProgressBar`` and
``comfy.model_management.processing_interrupted``, and ``cancellable`` turns the core's
``ImagicCancelled`` into the host's ``InterruptProcessingException``, which the executor reports as a
cancelled run. Internals touched: through ``internals``, the server's progress text.
"""
from __future__ import annotations

import comfy.model_management
import comfy.utils

from ...imagic import ImagicCancelled
from . import internals


class NodeProgress:
    """The host's progress bar plus a loss read-out on the node, and the Cancel check.

    ``note``: a warning shown above the read-out. ``also``: another ``progress(step, total, loss)`` to
    call after each step (the benchmark's clock).
    """

    def __init__(self, total: int, node_id, label: str, note: str | None = None, also=None):
        self.bar = comfy.utils.ProgressBar(total)
        self.node_id, self.label, self.note, self.also = node_id, label, note, also

    def text(self, step, total, loss) -> str:
        line = f"{self.label} {step}/{total}  loss {loss:.4f}"
        warnings = [f"warning: {n}" for n in (self.note or "").split("\n") if n]
        return "\n".join(warnings + [line])

    def __call__(self, step, total, loss):
        self.bar.update_absolute(step, total)
        if step == total or step % 10 == 0 or step == 1:
            internals.send_progress_text(self.text(step, total, loss), self.node_id)
        if self.also is not None:
            self.also(step, total, loss)

    @staticmethod
    def cancel() -> bool:
        return comfy.model_management.processing_interrupted()


def cancellable(fn):
    """``fn()``, with the core's cancellation turned into the host's interrupt."""
    try:
        return fn()
    except ImagicCancelled:
        raise comfy.model_management.InterruptProcessingException() from None
