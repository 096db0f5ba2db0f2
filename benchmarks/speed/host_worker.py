"""The host backend's worker: ComfyUI imported in this process, this repository loaded as a node pack, and
one stage run through the pack's own stage runner on the host's model classes."""
from __future__ import annotations

import importlib
import os
import sys
import time

from common import HOST_FILES, ROOT, comfyui_root

from .builders import build_host_model
from .configs import TEXT_SHAPES


def import_host(cuda: bool):
    """Import ComfyUI in this process in the order tests/host/comfy_host.py uses, then load this
    repository as a node pack the way ComfyUI does (``nodes.load_custom_node``). Returns the pack's
    ``nodes.host`` package: the stage runner the training nodes call, as loaded by the host."""
    import asyncio

    root = comfyui_root()
    if root is None:
        raise RuntimeError(f"COMFYUI_PATH={os.environ.get('COMFYUI_PATH')!r} is not a ComfyUI folder "
                           f"(needs {', '.join(HOST_FILES)})")
    # Before this repository on sys.path: its nodes/ package would shadow the host's nodes.py.
    sys.path.insert(0, str(root))
    # 1. comfy.model_management reads the CLI args at import time: CPU mode first, unless on CUDA.
    from comfy.cli_args import args as host_args
    host_args.cpu = not cuda
    import comfy.model_management as mm
    if (mm.cpu_state == mm.CPUState.CPU) == cuda:
        raise RuntimeError(f"the host's device state is {mm.cpu_state}, wanted {'CUDA' if cuda else 'CPU'}")
    # 2. The host's top-level utils package before nodes.py (which puts comfy/ first on sys.path).
    import utils.extra_config  # noqa: F401
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(ROOT))) or "ImagicFinetuneUNet" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError(f"ComfyUI could not load {ROOT} as a node pack (the host's log on stderr says why)")
    return pack_host(nodes)


def pack_host(nodes):
    """The pack's ``nodes.host`` package as the host loaded it (under the module name the host gave the pack)."""
    node_module = nodes.NODE_CLASS_MAPPINGS["ImagicFinetuneUNet"].__module__  # <pack>.nodes.nodes_train
    return importlib.import_module(node_module.rsplit(".", 1)[0] + ".host")


def host_stage(args, cfg, meter):
    """One stage exactly as the nodes run it: the pack's stage runner (``nodes/host/stages.py``), the
    code Optimize Embedding and Fine-tune UNet call, under the executor's inference mode, on the
    inputs CLIP Text Encode and VAE Encode would give. Only the step count, the learning rate
    (imagic.defaults), the Adam kind and checkpointing come from the configuration; the clock starts
    once the training copy is loaded."""
    import torch

    from imagic.defaults import DEFAULTS

    t_import = time.perf_counter()
    host = import_host(args.device == "cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.ldm.modules.attention as attention

    t_build = time.perf_counter()
    with torch.inference_mode():  # as the checkpoint loader node builds it: the weights are inference tensors
        patcher, info = build_host_model(args.model, cfg["dtype"], args.tiny)
    info.update(attention=attention.optimized_attention.__name__, import_s=round(t_build - t_import, 2),
                build_s=round(time.perf_counter() - t_build, 2))
    total = args.warmup + args.steps
    g = torch.Generator().manual_seed(1)

    def started(den, e):
        info["conditioning"] = {k: list(v.shape) for k, v in e.items()}
        meter.start()  # after load_models_gpu: the weights are where training uses them

    with torch.inference_mode():  # every node runs under it; the stage turns it off for training
        # What CLIP Text Encode and VAE Encode would give: SDXL's pooled vector rides in the dict.
        shapes = TEXT_SHAPES[args.model]
        extra = {"pooled_output": torch.randn(*shapes["pooled"], generator=g)} if "pooled" in shapes else {}
        conditioning = [[torch.randn(*shapes["context"], generator=g), extra]]
        latent = {"samples": torch.randn(1, 4, args.latent, args.latent, generator=g)}
        common = dict(steps=total, seed=0, adam=cfg["adam"], on_start=started, on_step=meter)
        if args.stage == "embedding":
            _, losses = host.optimize_embedding_stage(patcher, conditioning, latent, lr=DEFAULTS["lr_embedding"],
                                                      **common)
        else:
            lr = DEFAULTS["lr_finetune_lora"] if cfg["method"] == "lora" else DEFAULTS["lr_finetune_full"]
            _, _, losses = host.finetune_stage(patcher, conditioning, latent, lr=lr, method=cfg["method"],
                                               rank=DEFAULTS["rank"], gradient_checkpointing=cfg["ckpt"], **common)
    return info, losses
