"""The drag-and-drop workflows in workflows/: validated against the host, and run headlessly on
tiny checkpoints (skipped without a host; see conftest.py).

Every workflow is converted from the UI format with workflow_tools.to_api, shrunk (tiny
checkpoint, a 64x64 photo written into the input folder, sizes 64, 2 steps everywhere) and
queued through HostSession.run_prompt, exactly as the frontend would queue it.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from . import checkpoints, workflow_tools as wt
from .comfy_host import REPO_ROOT

WORKFLOWS = REPO_ROOT / "workflows"
FILES = wt.workflow_files(WORKFLOWS)
EXPECTED = ["imagic_basic_sd15", "imagic_controlnet", "imagic_eta_sweep", "imagic_flux", "imagic_save_and_reload",
            "imagic_sdxl", "imagic_upscale", "imagic_zimage"]
# File names the workflows reference that the user supplies (models, the photo, saved results).
USER_FILES = {"v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors", "example.png",
              "control_v11p_sd15_canny.pth", "RealESRGAN_x4plus.pth", "imagic_edit_500_steps_00001_.safetensors",
              "imagic_edit.safetensors", "flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
              "ae.safetensors", "z_image_bf16.safetensors", "qwen_3_4b.safetensors"}
SD15_WORKFLOWS = {"imagic_basic_sd15", "imagic_controlnet", "imagic_eta_sweep", "imagic_save_and_reload",
                  "imagic_upscale"}
PHOTO = "imagic_wf_photo.png"
TRAINING = {"ImagicOptimizeEmbedding", "ImagicFinetuneUNet"}


def workflow(name) -> dict:
    return wt.load(WORKFLOWS / f"{name}.json")


@pytest.fixture(scope="module")
def host(comfy, imagic_pack):
    """The session with the pack loaded, a photo in the input folder, controlnet/upscale folders."""
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    img = np.stack([x * 4, y * 4, np.full_like(x, 80)], -1).astype(np.uint8)
    img[16:44, 20:44] = [240, 230, 30]  # a block with sharp edges, for Canny
    Image.fromarray(img).save(comfy.dirs["input"] / PHOTO)
    fp = comfy.folder_paths
    for name in ("controlnet", "upscale_models"):
        d = comfy.dirs["checkpoints"].parent / name
        d.mkdir(exist_ok=True)
        fp.add_model_folder_path(name, str(d), is_default=True)
    fp.filename_list_cache.clear()
    return comfy


def definitions(comfy):
    return wt.Definitions(comfy.nodes.NODE_CLASS_MAPPINGS)


def shrink(prompt: dict, ckpt: str, steps: int = 2, size: int = 64, **files) -> dict:
    """The tiny version of a queued workflow: tiny checkpoint, the test photo, 64 px, 2 steps.

    ``files``: input name -> file name (control_net_name, model_name, lora_name, embedding).
    """
    for entry in prompt.values():
        ins = entry["inputs"]
        if "ckpt_name" in ins:
            ins["ckpt_name"] = ckpt
        if entry["class_type"] == "LoadImage":
            ins["image"] = PHOTO
        for k in ("width", "height", "target_width", "target_height"):
            if isinstance(ins.get(k), int):
                ins[k] = size
        if isinstance(ins.get("steps"), int):
            ins["steps"] = min(ins["steps"], steps)
        for k, v in files.items():
            if k in ins:
                ins[k] = v
    return prompt


def ids_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, e in prompt.items() if e["class_type"] == class_type]


def run(comfy, prompt):
    result = comfy.run_prompt(prompt, check=True)
    assert result.success
    return result


def saved_images(comfy, result, prompt, class_type="SaveImage"):
    paths = [p for nid in ids_of(prompt, class_type) for p in result.image_paths(nid)]
    assert paths and all(p.is_file() for p in paths), f"no {class_type} output: {result.outputs}"
    return paths


def image_size(path):
    from PIL import Image
    with Image.open(path) as im:
        return im.size


# ------------------------------------------------------------------------------ static checks
def test_the_expected_workflows_are_there():
    assert [p.stem for p in FILES] == EXPECTED


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_workflow_validates_against_the_host(host, path):
    wf = wt.load(path)
    problems = wt.validate(wf, definitions(host), files=USER_FILES) + wt.layout_problems(wf)
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)
    assert wf["version"] == 0.4 and "config" in wf and "extra" in wf and "groups" in wf
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and "eta" in notes[0]["widgets_values"][0], "each workflow explains itself in a Note"
    for n in wf["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties"} <= set(n)
        if n["type"] not in wt.FRONTEND_ONLY:
            assert n["properties"].get("Node name for S&R") == n["type"]
    prompt = wt.to_api(wf, definitions(host))
    assert prompt and not any(e["class_type"] in wt.FRONTEND_ONLY for e in prompt.values())


def test_workflows_use_real_use_values(host):
    """512 for SD1.5, 1024 for SDXL, the nodes' defaults for training, eta in 0.6-0.8; the flow workflows
    with a preset (imagic.defaults.WORKFLOW_PRESETS) at its size and steps."""
    from imagic.defaults import DEFAULTS, WORKFLOW_PRESETS

    for path in FILES:
        prompt = wt.to_api(wt.load(path), definitions(host))
        preset = WORKFLOW_PRESETS.get(path.name)
        size = preset["size"] if preset else 512 if path.stem in SD15_WORKFLOWS else 1024
        steps = dict(DEFAULTS, **(preset or {}))
        for nid, e in prompt.items():
            ins = e["inputs"]
            if e["class_type"] in TRAINING:
                key = "embedding_steps" if e["class_type"] == "ImagicOptimizeEmbedding" else "finetune_steps"
                assert ins["steps"] == steps[key], (path.name, nid)
            if e["class_type"] in ("ImageScale", "EmptyLatentImage", "EmptySD3LatentImage", "CLIPTextEncodeSDXL"):
                assert ins["width"] == ins["height"] == size, (path.name, nid)
            if e["class_type"] == "ImagicInterpolateConditioning":
                assert 0.6 <= ins["eta"] <= 0.8
            if "ckpt_name" in ins:
                assert ins["ckpt_name"] == ("sd_xl_base_1.0.safetensors" if path.stem not in SD15_WORKFLOWS
                                            else "v1-5-pruned-emaonly.safetensors")


# -------------------------------------------------------------------------- the tools themselves
def _tool_graph():
    """Checkpoint -> Reroute -> KSampler; a PrimitiveNode drives the seed; a bypassed
    ConditioningZeroOut sits on the positive; a muted SaveImage; a Note."""
    def node(i, t, inputs=(), outputs=(), widgets=None, mode=0, pos=(0, 0)):
        return {"id": i, "type": t, "pos": [pos[0], pos[1]], "size": [200, 100], "flags": {}, "order": i,
                "mode": mode, "inputs": [dict(name=n, type=ty, link=l) for n, ty, l in inputs],
                "outputs": [dict(name=n, type=ty, links=ls, slot_index=j) for j, (n, ty, ls) in enumerate(outputs)],
                "properties": {}, "widgets_values": widgets if widgets is not None else []}
    nodes = [
        node(1, "CheckpointLoaderSimple", outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2, 3]),
                                                   ("VAE", "VAE", [])], widgets=["x.safetensors"]),
        node(2, "Reroute", inputs=[("", "*", 1)], outputs=[("", "MODEL", [4])]),
        node(3, "CLIPTextEncode", inputs=[("clip", "CLIP", 2)], outputs=[("CONDITIONING", "CONDITIONING", [5])],
             widgets=["a dog"]),
        node(4, "ConditioningZeroOut", inputs=[("conditioning", "CONDITIONING", 5)],
             outputs=[("CONDITIONING", "CONDITIONING", [6])], mode=4),
        node(5, "CLIPTextEncode", inputs=[("clip", "CLIP", 3)], outputs=[("CONDITIONING", "CONDITIONING", [7])],
             widgets=[""]),
        node(6, "EmptyLatentImage", outputs=[("LATENT", "LATENT", [8])], widgets=[64, 64, 1]),
        node(7, "PrimitiveNode", outputs=[("INT", "INT", [9])], widgets=[1234, "fixed"]),
        node(8, "KSampler", inputs=[("model", "MODEL", 4), ("positive", "CONDITIONING", 6),
                                    ("negative", "CONDITIONING", 7), ("latent_image", "LATENT", 8),
                                    ("seed", "INT", 9)],
             outputs=[("LATENT", "LATENT", [10])], widgets=[7, "randomize", 3, 5.0, "euler", "normal", 1.0]),
        node(9, "SaveLatent", inputs=[("samples", "LATENT", 10)], widgets=["x"]),
        node(10, "Note", widgets=["hello"]),
        node(11, "SaveLatent", inputs=[("samples", "LATENT", 11)], widgets=["y"], mode=2),
    ]
    nodes[7]["outputs"][0]["links"].append(11)
    nodes[7]["inputs"][4]["widget"] = {"name": "seed"}
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 3, 0, "CLIP"], [3, 1, 1, 5, 0, "CLIP"], [4, 2, 0, 8, 0, "MODEL"],
             [5, 3, 0, 4, 0, "CONDITIONING"], [6, 4, 0, 8, 1, "CONDITIONING"], [7, 5, 0, 8, 2, "CONDITIONING"],
             [8, 6, 0, 8, 3, "LATENT"], [9, 7, 0, 8, 4, "INT"], [10, 8, 0, 9, 0, "LATENT"],
             [11, 8, 0, 11, 0, "LATENT"]]
    return {"last_node_id": 11, "last_link_id": 11, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def test_converter_follows_reroutes_primitives_bypass_and_mute(host):
    prompt = wt.to_api(_tool_graph(), definitions(host))
    assert set(prompt) == {"1", "3", "5", "6", "8", "9"}  # Reroute, bypassed, Primitive, muted, Note left out
    k = prompt["8"]["inputs"]
    assert k["model"] == ["1", 0], "through the Reroute"
    assert k["positive"] == ["3", 0], "the bypassed node passes its CONDITIONING input through"
    assert k["seed"] == 1234, "the PrimitiveNode's value"
    assert (k["steps"], k["cfg"], k["sampler_name"], k["scheduler"], k["denoise"]) == (3, 5.0, "euler", "normal", 1.0), \
        "the control_after_generate value after seed is skipped"
    assert prompt["6"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}


def test_converter_maps_v3_widgets_and_the_load_image_upload_widget(host):
    prompt = wt.to_api(workflow("imagic_basic_sd15"), definitions(host))
    ft = prompt[ids_of(prompt, "ImagicFinetuneUNet")[0]]["inputs"]
    assert {k: v for k, v in ft.items() if not isinstance(v, list)} == dict(
        steps=500, learning_rate=0.0001, seed=0, method="lora", rank=4, gradient_checkpointing=True)
    assert prompt[ids_of(prompt, "LoadImage")[0]]["inputs"] == {"image": "example.png"}


def test_validator_reports_each_kind_of_problem(host):
    defs = definitions(host)
    assert wt.validate(_tool_graph(), defs, files={"x.safetensors"}) == []
    wf = _tool_graph()
    wf["nodes"][2]["widgets_values"] = [5]                      # STRING gets an int
    wf["nodes"][5]["widgets_values"] = [8, 64, 0]               # below min
    wf["nodes"][7]["widgets_values"][4] = "not_a_sampler"        # combo
    wf["nodes"][7]["widgets_values"][1] = "sometimes"            # control value
    wf["links"][6][5] = "LATENT"                                  # link type
    wf["nodes"][7]["inputs"][3]["link"] = None                   # required latent_image unconnected
    wf["links"] = [l for l in wf["links"] if l[0] != 8]
    wf["nodes"][5]["outputs"][0]["links"] = []
    wf["nodes"].append({"id": 12, "type": "NoSuchNode", "pos": [0, 0], "size": [1, 1], "flags": {}, "order": 0,
                        "mode": 0, "inputs": [], "outputs": [], "properties": {}})
    wf["last_node_id"] = 12
    wf["id"] = None                                              # frontend 1.27 cannot load it
    text = "\n".join(wt.validate(wf, defs))
    for expected in ["'text': 5 is not a STRING", "8 is below min 16", "'not_a_sampler' is not one of the options",
                     "'sometimes'", "link 7: type LATENT but", "required input 'latent_image' is not connected",
                     "unknown node type 'NoSuchNode'", "'x.safetensors' is not one of the options",
                     "workflow id None is not a string"]:
        assert expected in text, f"{expected!r} not reported in:\n{text}"


# ---------------------------------------------------------------------------------- execution
def test_basic_sd15_runs(host, sd15_ckpt):
    prompt = shrink(wt.to_api(workflow("imagic_basic_sd15"), definitions(host)), sd15_ckpt)
    result = run(host, prompt)
    (image,) = saved_images(host, result, prompt)
    assert image_size(image) == (64, 64)
    assert len(ids_of(prompt, "LossGraphNode")) == 2
    for nid in ids_of(prompt, "LossGraphNode"):
        assert result.outputs[nid]["images"], "the loss graph is shown"


def test_eta_sweep_gives_one_image_per_eta(host, sd15_ckpt):
    wf = workflow("imagic_eta_sweep")
    prompt = shrink(wt.to_api(wf, definitions(host)), sd15_ckpt)
    etas = prompt[ids_of(prompt, "ImagicEtaSweep")[0]]["inputs"]["etas"]
    result = run(host, prompt)
    assert len(saved_images(host, result, prompt)) == len(etas.split(",")) == 6


def test_sdxl_runs(host, sdxl_ckpt):
    # One step everywhere: the tiny SDXL still has the full CLIP-G and a 130M UNet (minutes on 2 CPUs).
    prompt = shrink(wt.to_api(workflow("imagic_sdxl"), definitions(host)), sdxl_ckpt, steps=1)
    result = run(host, prompt)
    (image,) = saved_images(host, result, prompt)
    assert image_size(image) == (64, 64)


def make_tiny_controlnet(path) -> Path:
    """An SD1.5 ControlNet with the tiny UNet's config (detected as SD15 by the host's loader)."""
    import comfy.cldm.cldm
    import comfy.ops
    import comfy.supported_models
    import comfy.utils

    config = dict(comfy.supported_models.SD15(dict(checkpoints.SD15_UNET)).unet_config)
    config.pop("out_channels")
    gen = torch.Generator().manual_seed(0)
    net = checkpoints._materialise(lambda: comfy.cldm.cldm.ControlNet(
        hint_channels=3, operations=comfy.ops.disable_weight_init, **config), gen)
    sd = {"control_model." + k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    comfy.utils.save_torch_file(sd, str(path))
    return path


def test_controlnet_runs_with_a_tiny_controlnet(host, sd15_ckpt, caplog):
    import logging
    folder = Path(host.folder_paths.get_folder_paths("controlnet")[0])
    cn = make_tiny_controlnet(folder / "imagic_tiny_controlnet.safetensors")
    host.folder_paths.filename_list_cache.clear()
    prompt = shrink(wt.to_api(workflow("imagic_controlnet"), definitions(host)), sd15_ckpt,
                    control_net_name=cn.name)
    with caplog.at_level(logging.WARNING):
        result = run(host, prompt)
    assert not [r for r in caplog.records if "missing controlnet keys" in r.getMessage()]
    assert ids_of(prompt, "ControlNetApplyAdvanced")[0] in result.executed
    (image,) = saved_images(host, result, prompt)
    assert image_size(image) == (64, 64)
    assert saved_images(host, result, prompt, "PreviewImage"), "the Canny edges are previewed"


def make_tiny_esrgan(path) -> Path:
    """An ESRGAN (RRDBNet) x2 with 8 filters and one block, in the old 'model.N' key layout."""
    import comfy.utils
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_upscale_runs_hires_fix_and_the_optional_upscale_model(host, sd15_ckpt):
    wf = workflow("imagic_upscale")
    optional = wt.nodes_in_group(wf, "Optional: upscale model")
    assert {n["type"] for n in wf["nodes"] if n["id"] in optional} == {"UpscaleModelLoader", "ImageUpscaleWithModel",
                                                                       "SaveImage"}
    assert all(n["mode"] == wt.MODE_MUTED for n in wf["nodes"] if n["id"] in optional)
    # As shipped: the hires fix (Upscale Latent By 1.5, second KSampler at denoise 0.5).
    prompt = shrink(wt.to_api(wf, definitions(host)), sd15_ckpt)
    assert not ids_of(prompt, "UpscaleModelLoader")
    second = [k for k in ids_of(prompt, "KSampler") if prompt[k]["inputs"]["denoise"] < 1.0]
    assert len(second) == 1 and prompt[second[0]]["inputs"]["denoise"] == 0.5
    result = run(host, prompt)
    (hires,) = saved_images(host, result, prompt)
    assert image_size(hires) == (96, 96), "64 px latent upscaled by 1.5"
    # With the optional group enabled (Ctrl+M), on a tiny x2 ESRGAN.
    folder = Path(host.folder_paths.get_folder_paths("upscale_models")[0])
    esrgan = make_tiny_esrgan(folder / "imagic_tiny_esrgan_x2.safetensors")
    host.folder_paths.filename_list_cache.clear()
    prompt = shrink(wt.to_api(wt.with_modes(wf, {i: wt.MODE_ALWAYS for i in optional}), definitions(host)),
                    sd15_ckpt, model_name=esrgan.name)
    result = run(host, prompt)
    sizes = sorted(image_size(p) for p in saved_images(host, result, prompt))
    assert sizes == [(96, 96), (192, 192)]
    assert not TRAINING & {prompt[k]["class_type"] for k in result.executed}, "training was cached"


def test_save_then_reload_resamples_without_training(host, sd15_ckpt):
    wf = workflow("imagic_save_and_reload")
    part1 = wt.nodes_in_group(wf, "1. ")
    part2 = wt.nodes_in_group(wf, "2. ")
    assert all(n["mode"] == wt.MODE_MUTED for n in wf["nodes"] if n["id"] in part2)
    loras_out = host.dirs["output"] / "loras"
    before = set(loras_out.glob("*.safetensors")) if loras_out.exists() else set()

    # Part 1 as shipped: train, save the LoRA and the embeddings, sample.
    prompt = shrink(wt.to_api(wf, definitions(host)), sd15_ckpt)
    assert TRAINING <= {e["class_type"] for e in prompt.values()}
    assert not ids_of(prompt, "ImagicLoadEmbedding") and not ids_of(prompt, "LoraLoaderModelOnly")
    result = run(host, prompt)
    saved_images(host, result, prompt)
    new = sorted(set(loras_out.glob("imagic_edit_*.safetensors")) - before)
    assert len(new) == 1, f"Save LoRA wrote {new}"
    # The file the stock saver really wrote is the one the reload group and the Note name, up to the
    # saver's counter (00001 in a fresh output folder) and the steps this shrunk prompt gave it.
    (reload_name,) = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoraLoaderModelOnly"]
    (saver,) = [n for n in wf["nodes"] if n["type"] == "SaveLoRA"]
    shipped_steps, run_steps = saver["widgets_values"][1], prompt[ids_of(prompt, "SaveLoRA")[0]]["inputs"]["steps"]
    written = re.sub(r"_\d{5}_\.safetensors$", "_00001_.safetensors", new[0].name)
    assert written == reload_name.replace(f"_{shipped_steps}_steps_", f"_{run_steps}_steps_"), (written, reload_name)
    assert reload_name in next(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note")
    (emb_name,) = result.outputs[ids_of(prompt, "ImagicSaveEmbedding")[0]]["text"]
    assert (host.dirs["imagic"] / emb_name).is_file(), "the embedding is written to models/imagic"

    # What the Note tells the user: move the LoRA to models/loras (the embedding is already in
    # models/imagic), mute part 1, enable part 2.
    shutil.move(str(new[0]), host.dirs["loras"] / new[0].name)
    host.folder_paths.filename_list_cache.clear()
    flipped = wt.with_modes(wf, {**{i: wt.MODE_MUTED for i in part1}, **{i: wt.MODE_ALWAYS for i in part2}})
    assert wt.validate(flipped, definitions(host), files=USER_FILES) == []
    prompt2 = shrink(wt.to_api(flipped, definitions(host)), sd15_ckpt, lora_name=new[0].name, embedding=emb_name)
    assert not TRAINING & {e["class_type"] for e in prompt2.values()}
    result2 = run(host, prompt2)
    ran = {prompt2[k]["class_type"] for k in result2.executed}
    assert {"LoraLoaderModelOnly", "ImagicLoadEmbedding", "ImagicInterpolateConditioning", "KSampler"} <= ran
    assert not TRAINING & ran
    (image,) = saved_images(host, result2, prompt2)
    assert image_size(image) == (64, 64)


# ------------------------------------------------------------------------- flow-model workflows
def _flow_files(host, family: str, tmp_dir) -> tuple[str, str]:
    """(diffusion-model file, VAE file) for a flow workflow: the family's tiny file and a TAESD with its
    latent channels (the host's VAELoader detects TAESD by its keys)."""
    import comfy.taesd.taesd
    import safetensors.torch

    from . import flow_models

    spec = flow_models.FAMILIES[family]
    fp = host.folder_paths
    models = Path(tmp_dir) / "diffusion_models"
    vae_dir = Path(tmp_dir) / "vae"
    models.mkdir(exist_ok=True)
    vae_dir.mkdir(exist_ok=True)
    flow_models.register_diffusion_models_folder(models)
    fp.add_model_folder_path("vae", str(vae_dir), is_default=True)
    unet = f"tiny_{family}.safetensors"
    if not (models / unet).exists():
        try:
            spec.build(models / unet, seed=0)
        except flow_models.NotOnThisHost as e:
            pytest.skip(str(e))
    vae_name = f"tiny_taesd_{spec.latent_shape[1]}ch.safetensors"
    vae = comfy.taesd.taesd.TAESD(latent_channels=spec.latent_shape[1])
    checkpoints._init_module_(vae, torch.Generator().manual_seed(0))
    safetensors.torch.save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vae_dir / vae_name))
    fp.filename_list_cache.clear()
    return unet, vae_name


def _text_in_code(host, family: str, prompt: dict) -> str:
    """The family's real text encoders (T5-XXL 4.7B, Qwen3-4B) cannot be built small for the host's
    loaders: each CLIPTextEncode becomes a test node that gives the family's conditioning shapes, and
    the CLIP loader goes. Every other node runs as saved. Returns the test node's id."""
    import zlib

    from . import flow_models

    spec = flow_models.FAMILIES[family]

    class FamilyText:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"text": ("STRING", {"multiline": True})}}

        RETURN_TYPES, FUNCTION, CATEGORY = ("CONDITIONING",), "encode", "testing"

        def encode(self, text):
            return (flow_models.conditioning(spec, seed=zlib.crc32(text.encode())),)

    node_id = f"ImagicTestText_{family}"
    host.nodes.NODE_CLASS_MAPPINGS[node_id] = FamilyText
    for nid in [k for k, e in prompt.items() if e["class_type"] in ("CLIPLoader", "DualCLIPLoader")]:
        del prompt[nid]
    for e in prompt.values():
        if e["class_type"] == "CLIPTextEncode":
            e["class_type"], e["inputs"] = node_id, {"text": e["inputs"]["text"]}
    return node_id


def _run_flow_workflow(host, name, family, tmp_path):
    unet, vae = _flow_files(host, family, tmp_path)
    prompt = shrink(wt.to_api(workflow(name), definitions(host)), "", unet_name=unet, vae_name=vae)
    node_id = _text_in_code(host, family, prompt)
    try:
        result = run(host, prompt)
    finally:
        host.nodes.NODE_CLASS_MAPPINGS.pop(node_id, None)
    (image,) = saved_images(host, result, prompt)
    assert image_size(image) == (64, 64)
    trained = {e["class_type"] for nid, e in prompt.items() if nid in result.executed}
    assert {"UNETLoader", "ImagicOptimizeEmbedding", "ImagicFinetuneUNet", "ImagicInterpolateConditioning",
            "KSampler"} <= trained
    return prompt, result


def test_flux_workflow_runs_with_flux_guidance_on_a_tiny_flux_dev(host, tmp_path):
    prompt, _ = _run_flow_workflow(host, "imagic_flux", "flux_dev", tmp_path)
    assert ids_of(prompt, "FluxGuidance") and ids_of(prompt, "ConditioningZeroOut")


@pytest.mark.skipif(os.environ.get("IMAGIC_HOST_SLOW", "") in ("", "0"),
                    reason="the smallest Z-Image the host detects is 909M parameters: set IMAGIC_HOST_SLOW=1")
def test_zimage_workflow_runs_on_a_tiny_zimage(host, tmp_path):
    prompt, _ = _run_flow_workflow(host, "imagic_zimage", "zimage", tmp_path)
    assert ids_of(prompt, "ModelSamplingAuraFlow")
