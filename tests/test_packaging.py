"""What the ComfyUI registry and the host read from the pack, checked without a host."""
import fnmatch
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE_IDS = sorted(set(re.findall(r'node_id="(\w+)"', "".join(p.read_text() for p in (ROOT / "nodes").glob("*.py")))))


def test_registry_metadata_declares_publisher_icon_and_the_tested_host_floor():
    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["Icon"].endswith("docs/icon.png") and (ROOT / "docs" / "icon.png").is_file()
    assert comfy["requires-comfyui"] == ">=0.8.0"
    assert "0.8.0" in (ROOT / "README.md").read_text()


def test_every_node_has_help_in_web_docs_and_search_aliases():
    assert len(NODE_IDS) == 6, NODE_IDS
    assert re.search(r'^WEB_DIRECTORY = "\./web"$', (ROOT / "__init__.py").read_text(), re.M)
    for node_id in NODE_IDS:
        doc = ROOT / "web" / "docs" / f"{node_id}.md"
        assert doc.is_file(), f"no {doc.relative_to(ROOT)}: the node library would show no help"
        assert doc.read_text().startswith("# Imagic "), doc
    source = "".join(p.read_text() for p in (ROOT / "nodes").glob("nodes_*.py"))
    assert source.count("search_aliases=[\"imagic\"") == len(NODE_IDS)


def _ignored(rel: str, patterns) -> bool:
    return any(rel.startswith(p) if p.endswith("/") else fnmatch.fnmatch(rel, p) for p in patterns)


def test_comfyignore_keeps_tests_benchmarks_and_pictures_out_but_not_what_the_nodes_need():
    patterns = [l.strip() for l in (ROOT / ".comfyignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    for rel in ("tests/test_core.py", "benchmarks/results/edit_quality.json", "docs/workflows/imagic_sdxl.png",
                "imagic/toy/model/unet/diffusion_pytorch_model.safetensors"):
        assert _ignored(rel, patterns), rel
    needed = ["__init__.py", "pyproject.toml", "web/docs/ImagicFinetuneUNet.md", "workflows/imagic_basic_sd15.json"]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "nodes").glob("*.py")]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "imagic").glob("*.py")]
    assert not [rel for rel in needed if _ignored(rel, patterns)]
    # What the nodes import from imagic/ must not be under an ignored folder.
    imported = set(re.findall(r"from \.\.imagic(?:\.(\w+))? import", "".join(
        p.read_text() for p in (ROOT / "nodes").glob("*.py"))))
    assert not [m for m in imported if m and _ignored(f"imagic/{m}/", patterns)]


def test_every_workflow_has_a_template_thumbnail():
    for wf in sorted((ROOT / "workflows").glob("*.json")):
        thumb = wf.with_suffix(".jpg")
        assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name}: no JPEG thumbnail"
