"""Defaults shared by the standalone path, the CLI, the ComfyUI nodes, the workflows and the README.

This is their one source: ``tests/test_consistency.py`` checks the README's tables and the workflows'
widget values against it. Nothing here imports torch (the CLI reads it for ``--help``).
"""
from typing import Optional

# How they were chosen: README ("Defaults, and why"), from benchmarks/results/convergence.md (objective
# against step on the toy model) and benchmarks/results/edit_quality*.md (edits on the toy model).
# The objective alone favours LoRA at 1e-3, but on the toy model that over-fits: the fine-tuned model
# then reproduces the photo whatever the text (edit rate 0.38 at 200 steps, 8 cases), while 1e-4 keeps
# it editable (0.93 of 40 cases, closest to the ideal edit of all methods).
DEFAULTS = dict(
    embedding_steps=500, lr_embedding=2e-3,
    finetune_steps=500, lr_finetune_lora=1e-4, lr_finetune_full=5e-7,
    method="lora", rank=4, seed=0, noise_samples=1,
    sample_steps=50, guidance=7.5, eta=0.7,
)
# The flow workflows' own steps and photo size: 500 + 500 steps at 1024 px are about an hour of training for
# Flux.1 dev and 45 min for Z-Image on an RTX 4090 (imagic/cost.py, estimates), so these two workflows ship what
# the estimates put at about 3-3.5 min on a 24 GB card of that class with an fp8 file (the largest step count
# per size under 5 min, with room for the estimates being 1.3x low: benchmarks/results/cost_model.md).
# Learning rates stay the defaults. tests/test_consistency.py holds the workflows and tests/test_cost.py the
# estimates to these; how well so few steps edit a real photo is not measured here.
WORKFLOW_PRESETS = {
    "imagic_flux.json": dict(family="Flux", weight_format="fp8", size=512, embedding_steps=100, finetune_steps=100),
    "imagic_zimage.json": dict(family="ZImage", weight_format="fp8", size=512, embedding_steps=150, finetune_steps=150),
}
# The etas of a side-by-side (CLI --etas example, the Eta Sweep node, the eta-sweep workflow): the paper's range and
# one past the target text. With the default stages stage 2 can teach the model the photo whatever the text; on the
# first 12 harder cases of both toy models the best eta was then 1.25 (edits made with identity kept 0.58 against
# 0.42 at 1.0 on the v toy, 0.75 against 0.67 on the flow toy: benchmarks/results/step_curve*.md), and 0.5 was
# never the best. Six etas, as before; the single eta stays the paper's 0.7 (its SD full fine-tune over-fits less).
ETA_SWEEP = (0.6, 0.7, 0.8, 0.9, 1.0, 1.25)
# The paper's Stable Diffusion settings, reachable with these values (CLI --preset paper).
PAPER_PRESET = dict(embedding_steps=1000, lr_embedding=2e-3, finetune_steps=1500, lr_finetune=5e-7, method="full")
# A quarter of the default training compute (CLI --preset fast): both stages a quarter of the steps at 4x the
# rate (LoRA's; with --method full the full default rate applies). Named, not the default: on the first 12
# harder cases of each toy model it keeps less of the photo than the defaults, 0.50 against 0.58 (v) and 0.67
# against 0.75 (flow) edits made with identity kept, outside the 10% that would make it the default; at the
# default LoRA rate (stage 1 alone at 4x) it kept far less, 0.25 and 0.17 (benchmarks/results/step_curve*.md).
FAST_PRESET = dict(embedding_steps=125, lr_embedding=8e-3, finetune_steps=125, lr_finetune=4e-4, method="lora")
PRESETS = {"paper": PAPER_PRESET, "fast": FAST_PRESET}

# A full fine-tune above this rate gets a warning: 20x the paper's 5e-7. On the toy model full at 1e-4
# over-fits (edit rate 0.50 of 8 cases, against 0.75 at 1e-5: benchmarks/results/edit_quality_quick*.md),
# and SD's 860 M weights are not safer than the toy's 2 M.
FULL_LR_WARN_ABOVE = 1e-5
# LoRA below this rate gets a warning: the full fine-tune's range, 100x below LoRA's default.
LORA_LR_WARN_BELOW = 1e-6


def format_rate(value: float) -> str:
    """A learning rate as the README writes it: 2e-3, 1e-4, 5e-7 (and 0.5, 1 for large ones)."""
    if value == 0 or abs(value) >= 0.01:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def eta_sweep_text(sep: str = ",") -> str:
    """ETA_SWEEP as the comma-separated text the CLI and the Eta Sweep node read."""
    return sep.join(f"{e:g}" for e in ETA_SWEEP)


def lr_finetune_default(method: str) -> float:
    """Stage 2's default learning rate for ``method`` ("lora" or "full")."""
    return DEFAULTS["lr_finetune_full"] if method == "full" else DEFAULTS["lr_finetune_lora"]


def finetune_lr_warning(method: str, lr: float) -> Optional[str]:
    """A message when ``lr`` is the other method's size (LoRA's 1e-4 with full, or full's 5e-7 with LoRA), else None.

    Host-neutral wording (no CLI flags, no widget names): the CLI prints it as ``imagic: warning: ...``,
    the core's ``finetune`` warns with it (ImagicWarning), a node can show it.
    """
    full, lora = DEFAULTS["lr_finetune_full"], DEFAULTS["lr_finetune_lora"]
    if method == "full" and lr > FULL_LR_WARN_ABOVE:
        return (f"full fine-tuning at learning rate {format_rate(lr)} is {lr / full:.0f}x the paper's "
                f"{format_rate(full)} for all weights: a LoRA-sized rate lets the fine-tuned model over-fit the "
                f"photo and ignore the text. Use about {format_rate(full)} with full (its default), or LoRA "
                f"for {format_rate(lr)}.")
    if method == "lora" and lr < LORA_LR_WARN_BELOW:
        return (f"LoRA at learning rate {format_rate(lr)} is {lora / lr:.0f}x below its default {format_rate(lora)}: "
                f"that is the full fine-tune's range, and the adapters will hardly change the model. Use about "
                f"{format_rate(lora)} with LoRA.")
    return None
