"""The pack's glue to the ComfyUI host, one room per job (the node files only translate the graph).

* ``kinds``: which objective a MODEL trains with (exact prediction kinds), and what is refused.
* ``training_copy``: the private model training runs on, so the input MODEL is never changed.
* ``autograd_safety``: gradients through the host's inference code (in-place residuals, checkpointing).
* ``denoiser``: ``ComfyDenoiser``, the core's ``Denoiser`` on the host's sampling math.
* ``conditioning``: CONDITIONING <-> the core's embedding dict, both ways; the photo's latent.
* ``progress``: the host's progress bar, node text and Cancel for the core's callbacks.
* ``stages``: the two training stages as the nodes (and the speed benchmark) run them.
* ``families``: the pack's verdict on each image family of the host (tested, untested, refused).
* ``internals``: the one place that reaches into host internals with no public API.
"""
from .conditioning import (check_family, conditioning_of, embedding_of, entry_of, latent_for, single_conditioning,
                           text_embedding)
from .denoiser import ComfyDenoiser
from .kinds import prediction_type_of, training_sigmas
from .progress import NodeProgress, cancellable
from .stages import finetune_stage, optimize_embedding_stage, patched_model, prepare

__all__ = ["ComfyDenoiser", "NodeProgress", "cancellable", "check_family", "conditioning_of", "embedding_of",
           "entry_of", "finetune_stage", "latent_for", "optimize_embedding_stage", "patched_model",
           "prediction_type_of", "prepare", "single_conditioning", "text_embedding", "training_sigmas"]
