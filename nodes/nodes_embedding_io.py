"""Save e_opt and e_tgt to models/imagic and load them back, to re-sample without training."""
from __future__ import annotations

import os
import re

import folder_paths
from comfy_api.latest import io

from ..imagic import ImagicError, ImagicResult, load_result, save_result
from .host import check_family, conditioning_of, embedding_of, single_conditioning
from .schema import schema

FOLDER = "imagic"
_SCALARS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def register_folder():
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | {".safetensors"})


class ImagicSaveEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ImagicSaveEmbedding",
            search_aliases=["imagic", "save embedding", "save conditioning"],
            display_name="Imagic Save Embedding",
            category="Imagic",
            description="Save the target and optimized embeddings to models/imagic as one safetensors file. Save the "
                        "fine-tuned weights with the stock Save LoRA node; reload both to re-sample without training.",
            inputs=[
                io.Conditioning.Input("target", tooltip="e_tgt: the target text's conditioning."),
                io.Conditioning.Input("optimized", tooltip="e_opt: from Imagic Optimize Embedding."),
                io.String.Input("filename_prefix", default="imagic_edit",
                                tooltip="File name in models/imagic; a number is added when the name is taken."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, target, optimized, filename_prefix) -> io.NodeOutput:
        e_tgt, tgt_extra = single_conditioning(target, "target")
        e_opt, opt_extra = single_conditioning(optimized, "optimized")
        if e_tgt.shape != e_opt.shape:
            raise ImagicError(f"target {tuple(e_tgt.shape)} and optimized {tuple(e_opt.shape)} differ in shape: "
                              "save the optimized conditioning made from this target")
        prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", filename_prefix.strip()) or "imagic_edit"
        folder = folder_paths.get_folder_paths(FOLDER)[0]
        path, i = os.path.join(folder, f"{prefix}.safetensors"), 1
        while os.path.exists(path):
            path, i = os.path.join(folder, f"{prefix}_{i:05d}.safetensors"), i + 1
        settings = {k: tgt_extra[k] for k in _SCALARS if isinstance(tgt_extra.get(k), (int, float))}
        settings["source"] = "comfyui"
        save_result(ImagicResult(e_tgt=embedding_of(e_tgt, tgt_extra), e_opt=embedding_of(e_opt, opt_extra),
                                 settings=settings), path)
        return io.NodeOutput(ui={"text": [os.path.basename(path)]})


class ImagicLoadEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ImagicLoadEmbedding",
            search_aliases=["imagic", "load embedding", "load conditioning"],
            display_name="Imagic Load Embedding",
            category="Imagic",
            description="Load target and optimized embeddings saved by Imagic Save Embedding (or `imagic edit "
                        "--save-result`), to interpolate and sample again without training.",
            inputs=[
                io.Combo.Input("embedding", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A file in models/imagic."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the model it will be used with, to check that it fits."),
            ],
            outputs=[io.Conditioning.Output("target", display_name="target", tooltip="e_tgt, as saved."),
                     io.Conditioning.Output("optimized", display_name="optimized", tooltip="e_opt, as saved.")],
        )

    @classmethod
    def execute(cls, embedding, model=None) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, embedding)
        if path is None:
            raise ImagicError(f"embedding file {embedding!r} not found in models/{FOLDER}")
        result = load_result(path)
        extra = {k: v for k, v in result.settings.items() if k in _SCALARS}
        out = []
        for cond in (result.e_tgt, result.e_opt):
            if "context" not in cond or cond["context"].ndim != 3:
                raise ImagicError(f"{embedding} does not hold a text embedding [1, tokens, width]")
            if model is not None:
                check_family(model, cond["context"], f"the embedding in {embedding}")
            out.append(conditioning_of(cond, extra))
        return io.NodeOutput(*out)
