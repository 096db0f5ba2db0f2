"""Imagic stages 1 and 2 as nodes: Optimize Embedding and Fine-tune UNet."""
from __future__ import annotations

from comfy_api.latest import io

from ..imagic.defaults import DEFAULTS
from .host import finetune_stage, optimize_embedding_stage
from .schema import schema

SEED_MAX = 0xFFFFFFFFFFFFFFFF


def _node_id(cls):
    # Set by the executor; absent when a node is called directly (scripts, tests).
    return getattr(cls.hidden, "unique_id", None) if getattr(cls, "hidden", None) is not None else None


def _common_inputs(cond_tooltip, steps_default, lr_default, lr_tooltip):
    return [
        io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x, SDXL, or a flow model: Flux, SD3.5, "
                                        "Z-Image, Qwen-Image, ...), with any LoRA or patches already applied: Imagic "
                                        "trains on the model exactly as the sampler sees it."),
        io.Conditioning.Input("conditioning", tooltip=cond_tooltip),
        io.Latent.Input("latent", tooltip="The photo to edit, from VAE Encode (one image)."),
        io.Int.Input("steps", default=steps_default, min=0, max=100000,
                     tooltip="Adam steps. 0 skips this stage (an ablation)."),
        io.Float.Input("learning_rate", default=lr_default, min=1e-9, max=1.0, step=1e-7, round=False,
                       tooltip=lr_tooltip),
        io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                     tooltip="Seed of the training noise (and of the LoRA initialization): same seed, same result."),
    ]


def _checkpointing_input(optional=False):
    # Optional where it came later (Optimize Embedding): API prompts saved before it still run.
    return io.Boolean.Input("gradient_checkpointing", default=True, optional=optional,
                            tooltip="Recompute each block's activations in the backward pass: much less memory "
                                    "(needed for large models at 1024 px, and when weights do not all fit on the GPU), "
                                    "one more forward pass of each block per step.")


class ImagicOptimizeEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ImagicOptimizeEmbedding",
            search_aliases=["imagic", "edit photo with text", "text image editing", "optimize embedding", "textual inversion"],
            display_name="Imagic Optimize Embedding",
            category="Imagic",
            description="Imagic stage 1: starting from the target text embedding (e_tgt), find the embedding "
                        "(e_opt) that best reconstructs the photo under the frozen model, with the model's own "
                        "denoising loss. The model is not changed.",
            inputs=_common_inputs("The target text (e.g. 'a photo of a sitting dog') from CLIP Text Encode: e_tgt.",
                                  DEFAULTS["embedding_steps"], DEFAULTS["lr_embedding"],
                                  "Adam learning rate for the embedding (paper: 2e-3).") + [_checkpointing_input(optional=True)],
            outputs=[
                io.Conditioning.Output("optimized", display_name="optimized", tooltip="e_opt: same structure and keys as the input."),
                io.LossMap.Output("loss", display_name="loss", tooltip="Loss per step, for the Plot Loss Graph node."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, conditioning, latent, steps, learning_rate, seed,
                gradient_checkpointing=True) -> io.NodeOutput:
        e_opt, losses = optimize_embedding_stage(model, conditioning, latent, steps=steps, lr=learning_rate,
                                                 seed=seed, gradient_checkpointing=gradient_checkpointing,
                                                 node_id=_node_id(cls))
        return io.NodeOutput(e_opt, {"loss": losses})


class ImagicFinetuneUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ImagicFinetuneUNet",
            search_aliases=["imagic", "edit photo with text", "fine-tune model on one image", "train lora on photo"],
            display_name="Imagic Fine-tune UNet",
            category="Imagic",
            description="Imagic stage 2: with the optimized embedding frozen, fine-tune the model (LoRA or all "
                        "weights) so that e_opt reconstructs the photo faithfully. Returns a patched copy: the "
                        "input MODEL is never changed.",
            inputs=_common_inputs("The optimized embedding e_opt from Imagic Optimize Embedding.",
                                  DEFAULTS["finetune_steps"], DEFAULTS["lr_finetune_lora"],
                                  "Adam learning rate (LoRA: 1e-4; full fine-tune as in the paper: 5e-7). With method "
                                  "full, set about 5e-7: a LoRA-sized rate over-fits (the node warns).") + [
                io.Combo.Input("method", options=["lora", "full"], default="lora",
                               tooltip="lora: low-rank adapters on every linear and conv layer (fast, small). "
                                       "full: all weights (the paper's setting, slow and large)."),
                io.Int.Input("rank", default=DEFAULTS["rank"], min=1, max=256, tooltip="LoRA rank (ignored by full)."),
                _checkpointing_input(),
            ],
            outputs=[
                io.Model.Output("finetuned_model", display_name="model", tooltip="The fine-tuned model: a patched clone of the input MODEL."),
                io.LoraModel.Output("lora", display_name="lora", tooltip="The trained delta, for the stock Save LoRA node."),
                io.LossMap.Output("loss", display_name="loss", tooltip="Loss per step, for the Plot Loss Graph node."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, conditioning, latent, steps, learning_rate, seed, method, rank,
                gradient_checkpointing) -> io.NodeOutput:
        # The widget's default is LoRA's rate; switching the method to full keeps it unless the user
        # changes it: the stage warns then, in the log and on the node.
        patched, lora_sd, losses = finetune_stage(
            model, conditioning, latent, steps=steps, lr=learning_rate, seed=seed, method=method, rank=rank,
            gradient_checkpointing=gradient_checkpointing, node_id=_node_id(cls))
        return io.NodeOutput(patched, lora_sd, {"loss": losses})
