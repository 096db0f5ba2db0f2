"""Which objective a MODEL trains with, read from its model sampling; anything not known is refused.

The host combines a noise schedule (``ModelSamplingDiscrete``, ``ModelSamplingFlux``, ...: torch
modules) with a prediction kind (``EPS``, ``V_PREDICTION``, ``CONST``, ...: plain classes that define
how the network's output becomes the denoised image). The objective Imagic trains follows from the
prediction kind, so it is mapped by *exact class*: a subclass is a new kind (0.38's
``IMG_TO_IMG_VELOCITY(CONST)`` predicts something else while inheriting from CONST), and a schedule
or wrapper that overrides one of the prediction methods changes the objective too. Either is refused
with a message naming the class, never trained on a guessed objective. Host internals touched: none
(``comfy.model_sampling`` is read, not changed).
"""
from __future__ import annotations

import torch

import comfy.model_sampling as kinds

from ...imagic import ImagicError

# The prediction kinds Imagic trains, each to its objective (imagic.objective.PREDICTION_TYPES).
OBJECTIVES = {kinds.EPS: "epsilon", kinds.V_PREDICTION: "v_prediction", kinds.CONST: "flow"}
# What the host's sampler calls to go between the network and the image: who defines them decides the objective.
PREDICTION_METHODS = ("calculate_input", "calculate_denoised", "noise_scaling", "inverse_noise_scaling")
SUPPORTED = "epsilon (EPS), v-prediction (V_PREDICTION) and rectified-flow velocity (CONST) models"
# Why some known kinds cannot be trained, for a message that says more than "not supported".
_WHY = {
    "IMG_TO_IMG_FLOW": "an image-to-image flow model that predicts the clean image from the image, with no noise",
    "IMG_TO_IMG_VELOCITY": "an image-to-image velocity model: its input is the image itself, not a noised one",
    "IMG_TO_IMG": "an image-to-image model that predicts the clean image from the image",
    "X0": "the network predicts the clean image (x0), not the noise",
    "EDM": "EDM's preconditioned output",
    "V_PREDICTION_DDPM": "CogVideoX's DDPM v-prediction on unscaled inputs",
    "COSMOS_RFLOW": "Cosmos' rescaled rectified flow",
}


def kind_names(ms) -> str:
    """The names of a model sampling's schedule and prediction kind (the host's, and any other kind's)."""
    kind = prediction_kind(ms)
    names = [c.__name__ for c in type(ms).__mro__ if c.__module__ == kinds.__name__ or c is kind]
    return " + ".join(names) if names else type(ms).__name__


def prediction_kind(ms) -> type:
    """The most derived prediction-kind class of a model sampling: the first plain (non-torch) class of its MRO."""
    for cls in type(ms).__mro__:
        if cls is not object and not issubclass(cls, torch.nn.Module):
            return cls
    return type(ms)


def _owner(ms, method: str):
    return next((c for c in type(ms).__mro__ if method in c.__dict__), None)


def prediction_type_of(model) -> str:
    """The parameterization the MODEL was trained in ("epsilon", "v_prediction", "flow"), or ImagicError."""
    ms = model.get_model_object("model_sampling")
    kind = prediction_kind(ms)
    objective = OBJECTIVES.get(kind)
    if objective is None:
        why = _WHY.get(kind.__name__, "a prediction kind the pack does not know")
        raise ImagicError(f"this model's parameterization ({kind_names(ms)}: {why}) is not supported by Imagic: it "
                          f"trains {SUPPORTED}; use a text-to-image model of those kinds")
    for method in PREDICTION_METHODS:
        owner = _owner(ms, method)
        if owner is not None and owner not in kind.__mro__:
            raise ImagicError(f"this model's parameterization ({kind_names(ms)}) is not supported by Imagic: "
                              f"{owner.__name__} redefines {method}, so its training objective is not "
                              f"{kind.__name__}'s; Imagic trains {SUPPORTED}")
    sigma_data = float(getattr(ms, "sigma_data", 1.0))
    if objective != "flow" and sigma_data != 1.0:
        # EPS/V_PREDICTION scale the network's input and output by sigma_data; the objective is written for 1.
        raise ImagicError(f"this model's parameterization ({kind_names(ms)}) has sigma_data {sigma_data:g}: Imagic "
                          f"trains {kind.__name__} models with the unit data scale of SD 1.x/2.x/SDXL only")
    return objective


def training_sigmas(ms) -> torch.Tensor:
    """The noise levels of the model's schedule that training may draw: those where the prediction can be
    recovered from the denoised output (it is divided by sigma), i.e. finite and above zero."""
    sigmas = ms.sigmas.float().cpu()
    usable = sigmas[torch.isfinite(sigmas) & (sigmas > 0)]
    if usable.numel() == 0:
        raise ImagicError(f"this model's noise schedule ({kind_names(ms)}) has no noise level above zero to train on")
    return usable
