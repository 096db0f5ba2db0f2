"""ComfyUI entry point of ComfyUI-Imagic. The nodes live in nodes/, the algorithm in imagic/."""
import importlib.util

# Served at /extensions/<pack>/: web/docs/<NodeId>.md is the help the node library shows for each node.
WEB_DIRECTORY = "./web"

# Outside ComfyUI (pytest collecting this folder, the standalone `imagic` CLI) there is no host API to
# register nodes with; inside ComfyUI any import error below must surface, so only this case is skipped.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
