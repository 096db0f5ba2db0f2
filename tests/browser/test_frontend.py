"""The shipped workflows in ComfyUI's real web frontend (see conftest.py for what is needed).

For every ``workflows/*.json``:
- it is dropped on the canvas as a user drags the file in, and the frontend reports no missing
  node types, no dialog or toast, no broken link, no invalid widget value, and gives back the
  file's widget values (frontend.Frontend.load);
- the frontend's ``app.graphToPrompt()`` output is accepted by the backend's ``POST /prompt``
  validation (200, no node_errors). The prompt is then taken off the queue (or interrupted):
  only validation is tested here. The model files the workflows name exist in the server's
  folders (the tiny SD1.5 checkpoint under every checkpoint name, empty placeholders for
  other models, a small PNG for input pictures), so the workflows are tested unchanged.

The basic SD1.5 workflow is also run from the page: tiny checkpoint, a 64x64 uploaded
picture, 64x64 latents, 2 + 2 training steps and 2 sampler steps set through the graph's
widgets, the Run button, and the finished run in the backend's /history must hold the saved
picture, which /view serves.

The server also serves what the frontend shows beside the graph: each node's help page
(web/docs/<NodeId>.md at the URL the node library fetches) and the workflows as templates with
their thumbnails.
"""

from __future__ import annotations

import io
import json
import time
import urllib.parse

import pytest

from . import comfy_server, frontend

WORKFLOWS = comfy_server.workflow_files()
RUN_TIMEOUT_S = 900          # 2 cores shared with other jobs: the tiny run took 15 s to 80 s


def _ids(paths):
    return [p.stem for p in paths]


def test_workflows_exist():
    assert WORKFLOWS, f"no workflows in {comfy_server.REPO_ROOT / 'workflows'}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_workflow_loads_cleanly(app_page, path):
    wf = frontend.read_workflow(path)
    report = app_page.load(wf, path.stem)
    assert report.checks["nodes"] == len(wf["nodes"])
    assert not report.problems, (f"{path.name} in the frontend:\n  " + "\n  ".join(report.problems))


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_workflow_prompt_validates(app_page, server, path):
    """graphToPrompt() of the loaded workflow passes the backend's validation."""
    wf = frontend.read_workflow(path)
    app_page.load(wf, path.stem)     # problems of loading are test_workflow_loads_cleanly's
    prompt = app_page.graph_to_prompt()["output"]
    active = {str(n["id"]) for n in wf["nodes"]
              if n.get("mode", 0) == 0 and n["type"] not in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")}
    assert set(prompt) == active, f"graphToPrompt nodes {sorted(prompt)} != active nodes {sorted(active)}"
    server.wait_idle()
    status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": "imagic-browser-test"})
    try:
        assert status == 200 and not (body or {}).get("node_errors"), \
            f"POST /prompt: {status} {body}"
    finally:
        if status == 200 and isinstance(body, dict) and body.get("prompt_id"):
            server.cancel(body["prompt_id"])
            server.wait_idle()


def test_every_imagic_node_has_the_help_page_the_node_library_fetches(server):
    info = server.get_json("/object_info")
    mine = {k: v for k, v in info.items() if v.get("category") == "Imagic"}
    assert len(mine) == 6, sorted(mine)
    for name, node in mine.items():
        # The frontend's NodeHelpService: /extensions/<custom node folder>/docs/<node name>.md
        folder = node["python_module"].split(".")[1]
        status, body = server.request(f"/extensions/{urllib.parse.quote(folder)}/docs/{name}.md")
        assert status == 200 and body.decode().startswith(f"# {node['display_name']}"), (name, status)
        if "search_aliases" in node:  # since ComfyUI 0.9
            assert "imagic" in node["search_aliases"], name


def test_workflows_are_served_as_templates_with_thumbnails(server):
    templates = server.get_json("/api/workflow_templates")
    assert sorted(templates.get(comfy_server.PACK_NAME, [])) == sorted(p.stem for p in WORKFLOWS), templates
    json_only = comfy_server.templates_json_only(server.root)
    for p in WORKFLOWS:
        status, body = server.request(f"/api/workflow_templates/{comfy_server.PACK_NAME}/{p.stem}.json")
        assert status == 200 and json.loads(body) == json.loads(p.read_text()), p.stem
        # The template browser's picture for a custom node's template: <name>.jpg beside it, where the
        # host serves the folder; a host that serves templates as JSON only answers 404 for it.
        status, body = server.request(f"/api/workflow_templates/{comfy_server.PACK_NAME}/{p.stem}.jpg")
        if json_only:
            assert status == 404, p.stem
        else:
            assert status == 200 and body[:3] == b"\xff\xd8\xff", p.stem


def _basic_workflow():
    for p in WORKFLOWS:
        if "basic" in p.stem and "sd15" in p.stem:
            return p
    return None


def test_basic_workflow_runs_from_the_page(fresh_page, server, tmp_path):
    path = _basic_workflow()
    if path is None:
        pytest.skip("no workflows/*basic*sd15*.json")
    fe = fresh_page
    wf = frontend.read_workflow(path)

    picture = comfy_server.tiny_png(tmp_path / "imagic_browser_input.png", 64)
    uploaded = server.upload_image(picture)["name"]

    fe.load(wf, path.stem)
    fe.close_messages()
    fe.refresh_combos()            # the uploaded picture in LoadImage's list
    small = {
        "CheckpointLoaderSimple": {"ckpt_name": comfy_server.TINY_CKPT},
        "LoadImage": {"image": uploaded},
        "ImageScale": {"width": 64, "height": 64},
        "EmptyLatentImage": {"width": 64, "height": 64},
        "ImagicOptimizeEmbedding": {"steps": 2},
        "ImagicFinetuneUNet": {"steps": 2},
        "KSampler": {"steps": 2},
    }
    for node_type, values in small.items():
        assert fe.set_widgets_by_type(node_type, **values), f"{path.name} has no {node_type}"

    prompt = fe.graph_to_prompt()["output"]
    saves = {k: v["inputs"]["filename_prefix"] for k, v in prompt.items() if v["class_type"] == "SaveImage"}
    assert saves, "no SaveImage in the prompt"
    subfolder, _, stem = next(iter(saves.values())).rpartition("/")

    server.wait_idle()
    before = set(server.get_json("/history"))
    t0 = time.perf_counter()
    fe.click_run()

    # The result is read from the backend's /history, which every frontend has (frontend 1.49 has no
    # Queue side-bar tab any more); the picture must then be the one the page can show via /view.
    found, run_id, entry = None, None, {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and found is None:
        new = [k for k in server.get_json("/history") if k not in before]
        if new:
            run_id = new[0]
            entry = server.get_json(f"/history/{run_id}")[run_id]
            st = entry.get("status", {})
            if st.get("status_str") == "error":
                pytest.fail(f"the run failed: {st.get('messages')}\n{server.log_tail()}")
            if st.get("completed"):
                for node_out in entry.get("outputs", {}).values():
                    for img in node_out.get("images", []):
                        if img["filename"].startswith(stem + "_") and img.get("subfolder", "") == subfolder:
                            found = img
                if found is None:
                    pytest.fail(f"the run completed without {subfolder}/{stem}_*.png: {entry.get('outputs')}")
                break
        ui = fe.ui_messages()
        if ui["dialogs"]:
            pytest.fail(f"the page shows a dialog while running: {ui['dialogs']}")
        fe.page.wait_for_timeout(1000)
    elapsed = time.perf_counter() - t0
    assert found, (f"no finished run with {subfolder}/{stem}_*.png in /history after {RUN_TIMEOUT_S} s "
                   f"(run {run_id}: {entry.get('status')})\n{server.log_tail()}")
    assert set(entry["prompt"][2]) == set(prompt), "the Run button queued the graph the page converts"

    # The picture the run saved, as the page would fetch it: a 64x64 PNG served by /view.
    from PIL import Image
    query = urllib.parse.urlencode({"filename": found["filename"], "subfolder": found.get("subfolder", ""),
                                    "type": found.get("type", "output")})
    status, data = server.request("/view?" + query)
    assert status == 200
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    saved = server.base / "output" / subfolder
    assert (saved / found["filename"]).is_file()
    found = "/view?" + query
    print(f"\n{path.name}: queued with the Run button, picture in the page after {elapsed:.1f} s: {found}")


# ----------------------------------------------------------------------------- the checks' own test
# Each corruption of the basic workflow must be caught by Frontend.load, so that a clean report
# above means something.

def _corrupt_unknown_type(wf):
    n = next(n for n in wf["nodes"] if n["type"] == "ImagicInterpolateConditioning")
    n["type"] = "ImagicNoSuchNode"
    return "missing node type: ImagicNoSuchNode"


def _corrupt_combo(wf):
    n = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    n["widgets_values"][4] = "no_such_sampler"
    return "not one of its"


def _corrupt_widget_count(wf):
    n = next(n for n in wf["nodes"] if n["type"] == "ImagicOptimizeEmbedding")
    n["widgets_values"] = n["widgets_values"][1:]
    n.pop("widgets_values_named", None)
    # Frontend 1.27 gave back other values than the file had ("serialized:"); 1.49 keeps the shifted
    # values, which the widget checks then catch (a string in a number widget, a value below min).
    return "ImagicOptimizeEmbedding"


def _corrupt_link(wf):
    # Point the link into KSampler.positive at KSampler.latent_image instead (file only).
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    pos = next(i for i in ks["inputs"] if i["name"] == "positive")
    link = next(l for l in wf["links"] if l[0] == pos["link"])
    link[4] = next(k for k, i in enumerate(ks["inputs"]) if i["name"] == "latent_image")
    return ""   # any problem (a toast of the frontend's link repair, or a link check)


CORRUPTIONS = [_corrupt_unknown_type, _corrupt_combo, _corrupt_widget_count, _corrupt_link]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=[c.__name__[9:] for c in CORRUPTIONS])
def test_load_checks_catch_broken_workflows(app_page, corrupt):
    path = _basic_workflow()
    if path is None:
        pytest.skip("no workflows/*basic*sd15*.json")
    wf = frontend.read_workflow(path)
    expect = corrupt(wf)
    report = app_page.load(wf, f"broken_{path.stem}")
    app_page.close_messages()
    assert report.problems, f"{corrupt.__name__}: not caught"
    assert any(expect in p for p in report.problems), report.problems
