"""Both stages, the LoRA round trip and sampling on every weight format users load (weight_formats.py),
on a tiny Flux.1 dev and a tiny SD1.5 UNet, through the loaders that read each format.

GGUF files go through city96's ComfyUI-GGUF (``UnetLoaderGGUF``), found at IMAGIC_COMFYUI_GGUF or in
the host's ``custom_nodes/ComfyUI-GGUF``; without it those formats skip with that reason. The files
are written by the tests (PyPI's ``gguf`` for GGUF) and never committed.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from . import flow_models, weight_formats
from .comfy_host import call_node
from .test_flow_families import training_copy_loaded
from .test_imagic_nodes import objective

FAMILIES = ("flux_dev", "sd15")
GGUF_ARCH = {"flux_dev": "flux", "sd15": "sd1"}


def _gguf_pack(comfy) -> Path | None:
    env = os.environ.get("IMAGIC_COMFYUI_GGUF", "").strip()
    candidates = [Path(env)] if env else [Path(comfy.host.root) / "custom_nodes" / "ComfyUI-GGUF"]
    return next((p for p in candidates if (p / "nodes.py").is_file() and (p / "ops.py").is_file()), None)


@pytest.fixture(scope="module")
def gguf_loader(comfy):
    path = _gguf_pack(comfy)
    if path is None:
        return None
    try:
        import gguf  # noqa: F401  (the tests write their GGUF files with it)
    except ImportError:
        return None
    comfy.load_pack(path, strict=True)
    return comfy.nodes.NODE_CLASS_MAPPINGS.get("UnetLoaderGGUF")


@pytest.fixture(scope="module")
def files_dir(comfy, tmp_path_factory):
    d = tmp_path_factory.mktemp("weight_formats")
    flow_models.register_diffusion_models_folder(d)
    comfy.folder_paths.folder_names_and_paths["diffusion_models"] = ([str(d)], {".safetensors", ".gguf"})
    return d


def _state_dict(family, sd15_ckpt_info):
    if family == "flux_dev":
        try:
            sd, _, _ = flow_models.detected_state_dict("flux_dev")
        except flow_models.NotOnThisHost as e:
            pytest.skip(str(e))
        return sd
    full = load_file(str(sd15_ckpt_info.path))
    prefix = "model.diffusion_model."
    return {k[len(prefix):]: v.to(torch.bfloat16) for k, v in full.items() if k.startswith(prefix)}


def _inputs(family):
    if family == "flux_dev":
        return flow_models.conditioning("flux_dev", seed=1), flow_models.latent("flux_dev", seed=2)
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 77, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    return cond, {"samples": torch.randn(1, 4, 8, 8, generator=g)}


_MODELS: dict = {}


@pytest.fixture
def loaded_format(comfy, pack, files_dir, gguf_loader, sd15_ckpt_info, request):
    family, fmt_name = request.param
    fmt = weight_formats.FORMATS[fmt_name]
    if fmt_name.startswith("mixed_"):
        from comfy import quant_ops

        if fmt_name[len("mixed_"):] not in getattr(quant_ops, "QUANT_ALGOS", {}):
            pytest.skip(f"this host has no {fmt_name[len('mixed_'):]} layout (comfy.quant_ops.QUANT_ALGOS)")
    if fmt.loader == "gguf" and gguf_loader is None:
        pytest.skip("GGUF needs ComfyUI-GGUF (IMAGIC_COMFYUI_GGUF or custom_nodes/ComfyUI-GGUF) and PyPI's gguf")
    key = (family, fmt_name)
    if key not in _MODELS:
        _MODELS.clear()
        # The host's finalizers drop entries of its loaded-model list when a model is collected: let that happen
        # now, not in the middle of unload_all_models' walk over the list (an IndexError in the host).
        import gc

        gc.collect()
        from comfy import model_management  # (not "import comfy...": that would rebind the fixture's name)

        model_management.unload_all_models()
        sd = _state_dict(family, sd15_ckpt_info)
        ext = "gguf" if fmt.loader == "gguf" else "safetensors"
        path = weight_formats.write(fmt_name, sd, files_dir / f"{family}_{fmt_name}.{ext}", GGUF_ARCH[family])
        comfy.folder_paths.filename_list_cache.clear()
        with torch.inference_mode():
            try:
                if fmt.loader == "gguf":
                    (model,) = gguf_loader().load_unet(path.name)
                else:
                    (model,) = call_node("UNETLoader", unet_name=path.name, weight_dtype=fmt.weight_dtype)
            except (ValueError, AttributeError) as e:  # 0.33 on a packed layout: detection reads packed shapes
                if not fmt_name.startswith("mixed_"):
                    raise
                pytest.skip(f"the host itself cannot load this {fmt_name} file ({type(e).__name__}: {str(e)[:120]})")
        cond, latent = _inputs(family)
        if fmt_name.startswith("mixed_"):
            _host_runs_it_or_skip(model, cond, latent, fmt_name)
        _MODELS[key] = (fmt, model, cond, latent)
    return _MODELS[key]


def _host_runs_it_or_skip(model, cond, latent, fmt_name):
    """Some of the host's layouts have no working CPU path for every shape (nvfp4, convrot_w4a4 in 0.33): when
    the host's own sampler cannot run the model, there is nothing for Imagic to train on here."""
    import nodes

    negative = [[torch.zeros_like(cond[0][0]), dict(cond[0][1])]]
    try:
        with torch.inference_mode():
            nodes.common_ksampler(model, 0, 1, 1.0, "euler", "simple", cond, negative,
                                  {"samples": torch.zeros_like(latent["samples"])})
    except (RuntimeError, ValueError) as e:
        pytest.skip(f"the host itself cannot sample this {fmt_name} model on this device ({type(e).__name__}: "
                    f"{str(e)[:120]})")


@pytest.fixture(scope="module", autouse=True)
def _drop_models():
    yield
    _MODELS.clear()


CASES = [pytest.param((f, n), id=f"{f}-{n}") for f in FAMILIES for n in weight_formats.FORMATS]


def family_of(model) -> str:
    return type(model.model).__name__.lower()  # flux / basemodel: the saved LoRA's name per family


def call(node_cls, **kw):
    with torch.inference_mode():
        return node_cls.execute(**kw).args


def _stored_as(fmt, model):
    """The weights are in the file's format (not silently dequantized at load)."""
    types = {type(p).__name__ for p in model.model.diffusion_model.parameters()}
    dtypes = {p.dtype for p in model.model.diffusion_model.parameters()}
    if fmt.name.startswith("fp8_"):
        return {"fp8_e5m2": torch.float8_e5m2}.get(fmt.name, torch.float8_e4m3fn) in dtypes
    if fmt.name == "scaled_fp8" or fmt.name.startswith("mixed_"):
        return "QuantizedTensor" in types
    if fmt.loader == "gguf":
        return "GGMLTensor" in types
    # Plain files: the host picks the compute dtype for the device at load (on a CPU it loads 16-bit files as
    # fp32); what the test holds is that the weights stay exactly as loaded.
    return dtypes <= {torch.float32, torch.float16, torch.bfloat16}


@pytest.mark.parametrize("loaded_format", CASES, indirect=True)
def test_both_stages_train_on_the_format_and_the_lora_reloads_on_the_same_base(comfy, pack, loaded_format):
    fmt, model, cond, latent = loaded_format
    C = pack["classes"]
    assert _stored_as(fmt, model), {type(p).__name__ for p in model.model.diffusion_model.parameters()}
    before = weight_formats.fingerprint(model.model.diffusion_model)
    base = objective(pack, model, cond, latent, count=12)
    e_opt, loss1 = call(C["ImagicOptimizeEmbedding"], model=model, conditioning=cond, latent=latent, steps=15,
                        learning_rate=0.02, seed=0)
    stage1 = objective(pack, model, e_opt, latent, count=12)
    tuned, lora, loss2 = call(C["ImagicFinetuneUNet"], model=model, conditioning=e_opt, latent=latent, steps=15,
                              learning_rate=3e-3, seed=0, method="lora", rank=4, gradient_checkpointing=True)
    stage2 = objective(pack, tuned, e_opt, latent, count=12)
    losses = torch.tensor(loss1["loss"] + loss2["loss"])
    assert torch.isfinite(losses).all(), losses
    assert stage1 < base and stage2 < stage1, (base, stage1, stage2)
    assert not weight_formats.same(before, weight_formats.fingerprint(model.model.diffusion_model)), \
        "the base must stay bit for bit in its stored format"
    # The LoRA as stock Save LoRA writes it, on the same quantized base with the stock loader.
    stock, not_loaded = comfy.save_and_reload_lora(model, lora, f"imagic_{family_of(model)}_{fmt.name}")
    assert not not_loaded
    for m in (tuned, stock):
        assert objective(pack, m, e_opt, latent, count=12) == pytest.approx(stage2, rel=1e-4)
    import nodes

    negative = [[torch.zeros_like(cond[0][0]), dict(cond[0][1])]]
    with torch.inference_mode():
        lat = {"samples": torch.zeros_like(latent["samples"])}
        out = nodes.common_ksampler(tuned, 3, 2, 1.0, "euler", "simple", e_opt, negative, lat)[0]["samples"]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("loaded_format", [c for c in CASES if weight_formats.FORMATS[c.values[0][1]].quantized],
                         indirect=True)
def test_full_finetune_on_a_quantized_base_is_refused_with_the_way_out(pack, loaded_format):
    fmt, model, cond, latent = loaded_format
    before = weight_formats.fingerprint(model.model.diffusion_model)
    with pytest.raises(Exception, match="stored quantized .* Use method lora .* bf16/fp16 file"):
        call(pack["classes"]["ImagicFinetuneUNet"], model=model, conditioning=cond, latent=latent, steps=2,
             learning_rate=5e-7, seed=0, method="full", rank=4, gradient_checkpointing=False)
    assert not weight_formats.same(before, weight_formats.fingerprint(model.model.diffusion_model))


def _saved_weight_copies(pack, model, cond, latent, checkpointing: bool) -> list:
    """The tensors autograd keeps for the backward pass of one stage-1 prediction through the training copy that
    have the shape of a layer's weight (or its transpose) and are not a stored parameter: weight copies."""
    shapes = {tuple(s) for s in pack["deltas"].lora_target_shapes(model.model.diffusion_model).values()}
    shapes |= {s[::-1] for s in shapes}
    copies = {}

    def pack_hook(t):
        if type(t) in (torch.Tensor, torch.nn.Parameter) and tuple(t.shape) in shapes:
            copies[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with training_copy_loaded(pack, model, cond, latent, checkpointing) as (den, x0, e):
        den.predict(x0 + 0.5, torch.tensor([0.5]), e)  # the first call runs the in-place probe
        stored = {p.untyped_storage().data_ptr() for p in den.base.parameters()
                  if type(p) in (torch.Tensor, torch.nn.Parameter)}
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            out = den.predict(x0 + 0.5, torch.tensor([0.5]), e)
        out.float().sum().backward()
    return [shape for ptr, shape in copies.items() if ptr not in stored]


@pytest.mark.parametrize("loaded_format", [c for c in CASES if weight_formats.FORMATS[c.values[0][1]].quantized],
                         indirect=True)
def test_training_keeps_no_dequantized_copy_of_the_weights(pack, loaded_format):
    """Quantized weights are read as inference reads them, one layer at a time: a layer's dequantized weight is
    made again in the backward pass, not kept for it (that was one full-precision copy of the model in stage 1)."""
    fmt, model, cond, latent = loaded_format
    for checkpointing in (False, True):
        copies = _saved_weight_copies(pack, model, cond, latent, checkpointing)
        assert not copies, (fmt.name, checkpointing, len(copies), copies[:3])
