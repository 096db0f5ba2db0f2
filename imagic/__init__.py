"""Imagic (Kawar et al., CVPR 2023): text-based real image editing, host-independent core."""
from .deltas import FullDelta, LoraDelta, WeightDelta
from .objective import denoising_loss, evaluate_objective, held_out_pairs, training_target
from .results import ImagicResult, load_result, save_result
from .train import ImagicCancelled, ImagicError, finetune, interpolate, optimize_embedding, run_training

__all__ = [
    "FullDelta", "LoraDelta", "WeightDelta", "denoising_loss", "evaluate_objective", "held_out_pairs",
    "training_target", "ImagicResult", "load_result", "save_result", "ImagicCancelled", "ImagicError",
    "finetune", "interpolate", "optimize_embedding", "run_training", "ImagicPipeline",
]


def __getattr__(name):
    # The diffusers path is imported on demand, so the ComfyUI nodes never pull in diffusers.
    if name == "ImagicPipeline":
        from .pipeline import ImagicPipeline
        return ImagicPipeline
    raise AttributeError(name)
