"""Defaults shared by the standalone path and the ComfyUI nodes."""

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
# The paper's Stable Diffusion settings, reachable with these values.
PAPER_PRESET = dict(embedding_steps=1000, lr_embedding=2e-3, finetune_steps=1500, lr_finetune=5e-7, method="full")

