"""Imagic (Kawar et al., CVPR 2023): text-based real image editing, host-independent core.

Every name is imported on first use (PEP 562), so that ``import imagic.cli`` or ``imagic.defaults``
does not load torch (``imagic --help`` stays fast) and the ComfyUI nodes never pull in diffusers.
"""
from importlib import import_module

_WHERE = {
    "FullDelta": "deltas", "LoraDelta": "deltas", "WeightDelta": "deltas",
    "denoising_loss": "objective", "evaluate_objective": "objective", "held_out_pairs": "objective",
    "training_target": "objective",
    "ImagicResult": "results", "load_result": "results", "save_result": "results",
    "ImagicCancelled": "errors", "ImagicError": "errors", "ImagicWarning": "errors",
    "finetune": "train", "interpolate": "train", "optimize_embedding": "train", "run_training": "train",
    "ImagicPipeline": "pipeline",
}

__all__ = list(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'imagic' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
