"""Fixtures for tests that run inside a real ComfyUI host (see comfy_host.py).

Without a host (COMFYUI_PATH unset and the repo not under a ComfyUI custom_nodes/ folder)
every test in tests/host is skipped with the reason; IMAGIC_REQUIRE_HOST=1 makes that a
failure instead. IMAGIC_HOST_CKPT_CACHE=<dir> keeps the generated checkpoints between runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from . import checkpoints, comfy_host

_HERE = Path(__file__).parent.resolve()


def _host_required() -> bool:
    return os.environ.get(comfy_host.REQUIRE_ENV_VAR, "").strip() not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if comfy_host.find_comfyui() is not None or _host_required():
        return
    skip = pytest.mark.skip(reason=comfy_host.skip_reason())
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> comfy_host.HostSession:
    """The session's HostSession: host imported (CPU), folders in a temp dir, one executor."""
    if comfy_host.find_comfyui() is None:
        if _host_required():
            pytest.fail(comfy_host.skip_reason())
        pytest.skip(comfy_host.skip_reason())
    return comfy_host.default_session(tmp_path_factory.mktemp("comfy_host"))


NODE_IDS = ["ImagicOptimizeEmbedding", "ImagicFinetuneUNet", "ImagicInterpolateConditioning", "ImagicEtaSweep",
            "ImagicSaveEmbedding", "ImagicLoadEmbedding"]


@pytest.fixture(scope="module")
def pack(comfy):
    """The pack as the host loaded it: its ``nodes.host`` and ``imagic`` packages, ``imagic.deltas``, and
    the registered node classes by id."""
    ids = comfy.load_pack()
    missing = [i for i in NODE_IDS if i not in comfy.nodes.NODE_CLASS_MAPPINGS]
    assert not missing, f"pack did not register {missing} (import failed? registered: {ids})"
    mod = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["ImagicOptimizeEmbedding"].__module__]
    pkg = mod.__name__.rsplit(".", 2)[0]  # <pack>.nodes.nodes_train -> <pack>
    return dict(host=sys.modules[pkg + ".nodes.host"], imagic=sys.modules[pkg + ".imagic"],
                deltas=importlib.import_module(pkg + ".imagic.deltas"),
                classes={i: comfy.nodes.NODE_CLASS_MAPPINGS[i] for i in NODE_IDS})


@pytest.fixture(scope="session")
def imagic_pack(comfy) -> list[str]:
    """Load this repository as a ComfyUI pack; the node ids it registered (raises if it failed)."""
    ids = comfy.load_pack(comfy_host.REPO_ROOT)
    assert ids, "the pack loaded but registered no nodes"
    return ids


def _ckpt_cache_dir(tmp_path_factory) -> Path:
    env = os.environ.get("IMAGIC_HOST_CKPT_CACHE", "").strip()
    if env:
        d = Path(env).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        return d
    return tmp_path_factory.getbasetemp() / "ckpt_cache"


def _checkpoint(comfy, tmp_path_factory, builder, name) -> checkpoints.CheckpointInfo:
    cache = _ckpt_cache_dir(tmp_path_factory)
    info = checkpoints.cached_checkpoint(builder, cache, name, comfy.dirs["checkpoints"])
    comfy.folder_paths.filename_list_cache.clear()
    return info


@pytest.fixture(scope="session")
def sd15_ckpt_info(comfy, tmp_path_factory) -> checkpoints.CheckpointInfo:
    return _checkpoint(comfy, tmp_path_factory, checkpoints.make_sd15_checkpoint, "imagic_tiny_sd15.safetensors")


@pytest.fixture(scope="session")
def sd15_ckpt(sd15_ckpt_info) -> str:
    """ckpt_name of a tiny SD1.5 checkpoint in the session's checkpoints folder."""
    return sd15_ckpt_info.path.name


@pytest.fixture(scope="session")
def sd2v_ckpt_info(comfy, tmp_path_factory) -> checkpoints.CheckpointInfo:
    return _checkpoint(comfy, tmp_path_factory, checkpoints.make_sd2_vpred_checkpoint,
                       "imagic_tiny_sd2v.safetensors")


@pytest.fixture(scope="session")
def sd2v_ckpt(sd2v_ckpt_info) -> str:
    """ckpt_name of a tiny SD2.x v-prediction checkpoint (~520 MB, ~15 s, built on first request)."""
    return sd2v_ckpt_info.path.name


@pytest.fixture(scope="session")
def sdxl_ckpt_info(comfy, tmp_path_factory) -> checkpoints.CheckpointInfo:
    return _checkpoint(comfy, tmp_path_factory, checkpoints.make_sdxl_checkpoint,
                       "imagic_tiny_sdxl.safetensors")


@pytest.fixture(scope="session")
def sdxl_ckpt(sdxl_ckpt_info) -> str:
    """ckpt_name of a tiny SDXL checkpoint (~1.1 GB, ~35 s, built on first request)."""
    return sdxl_ckpt_info.path.name
