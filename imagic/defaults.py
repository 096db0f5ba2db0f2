"""Defaults shared by the standalone path and the ComfyUI nodes."""

# See README ("Defaults") for how they were chosen.
DEFAULTS = dict(
    embedding_steps=500, lr_embedding=2e-3,
    finetune_steps=500, lr_finetune_lora=1e-4, lr_finetune_full=5e-7,
    method="lora", rank=4, seed=0, noise_samples=1,
    sample_steps=50, guidance=7.5, eta=0.7,
)
# The paper's Stable Diffusion settings, reachable with these values.
PAPER_PRESET = dict(embedding_steps=1000, lr_embedding=2e-3, finetune_steps=1500, lr_finetune=5e-7, method="full")

