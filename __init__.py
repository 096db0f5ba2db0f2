"""ComfyUI entry point of ComfyUI-Imagic. The nodes live in nodes/, the algorithm in imagic/."""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
