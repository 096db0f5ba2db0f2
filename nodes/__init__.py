"""ComfyUI-Imagic nodes: the three Imagic stages, an eta sweep, and embedding save/load."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .nodes_conditioning import ImagicEtaSweep, ImagicInterpolateConditioning
from .nodes_embedding_io import ImagicLoadEmbedding, ImagicSaveEmbedding, register_folder
from .nodes_train import ImagicFinetuneUNet, ImagicOptimizeEmbedding

NODES = [ImagicOptimizeEmbedding, ImagicFinetuneUNet, ImagicInterpolateConditioning, ImagicEtaSweep,
         ImagicSaveEmbedding, ImagicLoadEmbedding]


class ImagicExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> ImagicExtension:
    register_folder()
    return ImagicExtension()
