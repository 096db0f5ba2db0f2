"""A toy pixel-space text-to-image model for measuring Imagic edits.

- :mod:`imagic.toy.data`: seeded generator of captioned 32x32 images.
- :mod:`imagic.toy.tokenizer`: builds the word-level CLIP tokenizer files.
- :mod:`imagic.toy.train_model`: trains the toy diffusion model (diffusers layout).
- :mod:`imagic.toy.sample`: DDIM + classifier-free-guidance sampler.
- :mod:`imagic.toy.classifier`: attribute classifier used to score samples and edits.

The shipped weights live in ``imagic/toy/model/`` (diffusers folder, pixel space:
no VAE, latents = image * 2 - 1; v-prediction), ``imagic/toy/model_flow/`` (the same data and
budget as a rectified-flow model) and ``imagic/toy/classifier.safetensors``.
"""

from pathlib import Path

TOY_DIR = Path(__file__).resolve().parent
MODEL_DIR = TOY_DIR / "model"
FLOW_MODEL_DIR = TOY_DIR / "model_flow"
CLASSIFIER_PATH = TOY_DIR / "classifier.safetensors"
