"""The harness itself, on stock nodes: a real ComfyUI host runs a tiny SD1.5 graph."""

from __future__ import annotations

import logging
import os

import pytest

from . import checkpoints
from .comfy_host import PromptValidationError


def txt2img_prompt(ckpt_name: str, seed: int = 1, prefix: str = "host_harness") -> dict:
    """API-format prompt: checkpoint -> 2 x CLIPTextEncode -> 64x64 latent -> KSampler -> decode -> save."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_tiny_sd15_checkpoint_is_detected_as_sd15(sd15_ckpt_info):
    assert (sd15_ckpt_info.model_class, sd15_ckpt_info.model_type) == ("SD15", "EPS")
    assert checkpoints.detect(sd15_ckpt_info.path) == ("SD15", "EPS")


def test_stock_graph_runs_and_second_run_reuses_cache(comfy, sd15_ckpt, caplog):
    from PIL import Image

    caplog.set_level(logging.WARNING)
    first = comfy.run_prompt(txt2img_prompt(sd15_ckpt, seed=1), check=True)
    assert first.success
    assert set(first.executed) == {"1", "2", "3", "4", "5", "6", "7"}
    # The loader found every weight it expects in the tiny checkpoint.
    assert not [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
    # KSampler reported its 2 steps through comfy.utils.ProgressBar.
    assert [p["value"] for p in first.progress if p["node"] == "5"][-1:] == [2]

    [path] = first.image_paths("7")
    assert path.is_file()
    with Image.open(path) as im:
        assert im.size == (64, 64)

    second = comfy.run_prompt(txt2img_prompt(sd15_ckpt, seed=2), check=True)
    assert "5" in second.executed
    for cached in ("1", "2", "3", "4"):
        assert cached not in second.executed, f"node {cached} re-ran: executed={second.executed}"
        assert cached in second.cached
    [path2] = second.image_paths("7")
    assert path2.is_file() and path2 != path


def test_invalid_prompt_raises_with_node_errors(comfy):
    prompt = txt2img_prompt("no_such_checkpoint.safetensors")
    with pytest.raises(PromptValidationError) as exc:
        comfy.run_prompt(prompt)
    assert "1" in exc.value.node_errors
    assert "no_such_checkpoint" in str(exc.value)


PACK_INIT = '''
from .impl import NODE_CLASS_MAPPINGS
'''
PACK_IMPL = '''
class HarnessAddOne:
    CATEGORY = "testing"
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -100, "max": 100})}}

    def run(self, value):
        return {"ui": {"value": [value + 1]}, "result": (value + 1,)}


NODE_CLASS_MAPPINGS = {"HarnessAddOne": HarnessAddOne}
'''


def test_load_pack_registers_a_v1_pack_and_runs_its_node(comfy, tmp_path):
    pack = tmp_path / "harness_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(PACK_INIT)
    (pack / "impl.py").write_text(PACK_IMPL)
    assert comfy.load_pack(pack) == ["HarnessAddOne"]
    result = comfy.run_prompt({"1": {"class_type": "HarnessAddOne", "inputs": {"value": 41}}}, check=True)
    assert result.executed == ["1"]
    assert result.outputs["1"] == {"value": [42]}


def test_load_pack_reports_import_errors(comfy, tmp_path):
    from .comfy_host import PackLoadError

    pack = tmp_path / "broken_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text("import no_such_module_for_harness\n")
    with pytest.raises(PackLoadError, match="no_such_module_for_harness"):
        comfy.load_pack(pack)


@pytest.mark.skipif(os.environ.get("IMAGIC_HOST_SLOW", "") in ("", "0"),
                    reason="builds ~0.5 GB and ~1.1 GB checkpoints: set IMAGIC_HOST_SLOW=1")
@pytest.mark.parametrize("fixture,expected", [("sd2v_ckpt_info", ("SD20", "V_PREDICTION")),
                                              ("sdxl_ckpt_info", ("SDXL", "EPS"))])
def test_large_tiny_checkpoints_load_and_sample(comfy, request, caplog, fixture, expected):
    info = request.getfixturevalue(fixture)
    assert (info.model_class, info.model_type) == expected
    caplog.set_level(logging.WARNING)
    result = comfy.run_prompt(txt2img_prompt(info.path.name, prefix=fixture), check=True)
    assert not [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
    [path] = result.image_paths("7")
    assert path.is_file()
