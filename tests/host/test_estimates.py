"""What the training nodes tell the user before and while they train: the memory/time estimate before the
first step (nodes/host/estimate.py on the core's imagic.cost), the refusal of a step that cannot fit, and
the rate and time left in the progress text (nodes/host/progress.py)."""
from __future__ import annotations

import pytest
import torch

from . import flow_models
from .comfy_host import call_node

GB = 1024 ** 3


@pytest.fixture
def node_texts(comfy, monkeypatch):
    """The texts the pack sends under a node: ``server.PromptServer.instance`` is the web server in ComfyUI;
    here a recorder stands at its ``send_progress_text`` (the websocket end), everything before it is real."""
    import server

    texts = []

    class Browser:
        def send_progress_text(self, text, node_id, sid=None):
            texts.append((node_id, text))

    monkeypatch.setattr(server.PromptServer, "instance", Browser(), raising=False)
    return texts


def test_progress_text_carries_the_rate_and_the_time_left(pack, node_texts):
    progress_mod = pack["host"].progress
    now = [100.0]
    p = progress_mod.NodeProgress(30, "7", "fine-tune (lora)", clock=lambda: now[0])
    p.info = "estimate: fits"
    for step in range(1, 31):
        now[0] += 2.0 if step > 1 else 9.0  # the first step is slow (kernels, the probe): not in the rate
        p(step, 30, 0.5)
    by_step = {int(t.splitlines()[-1].split()[2].split("/")[0]): t for _, t in node_texts}
    assert "s/step" not in by_step[1]
    assert "2.0 s/step, 40 s left" in by_step[10], by_step[10]
    assert by_step[30].splitlines()[0] == "estimate: fits" and by_step[30].endswith("2.0 s/step")
    assert progress_mod._duration(3725) == "1 h 02 min" and progress_mod._duration(75) == "1 min 15 s"


def test_a_step_that_cannot_fit_is_refused_before_loading_with_the_levers(pack):
    from_cost = pack["imagic"].cost
    decide = pack["host"].estimate.decide
    est = from_cost.estimate("Flux", 1024, 1024, stage="finetune", checkpointing=False, weight_bytes=12 * GB)
    with pytest.raises(pack["imagic"].ImagicError) as e:
        decide(est, free_bytes=est["memory_bytes"] - est["weights_bytes"] - GB, on_gpu=True, steps=500)
    msg = str(e.value)
    assert "will not fit" in msg and "smaller photo" in msg and "gradient_checkpointing on" in msg
    assert msg.count("checkpointing") == 1 and "(as loaded)" in msg, "each lever once; the weights as loaded"
    # The weights alone do not fit, the step does: it trains, with the weights streamed, and says so.
    plan = decide(est, free_bytes=est["memory_bytes"] - 4 * GB, on_gpu=True, steps=500)
    assert "stream to the GPU" in plan.info and plan.memory_required == est["memory_bytes"] - est["weights_bytes"]
    # Enough memory: it fits; on a CPU nothing is refused.
    assert "should fit" in decide(est, est["memory_bytes"] + GB, True, 500).info
    assert decide(est, GB, on_gpu=False, steps=500).memory_required > 0


@pytest.fixture(scope="module")
def tiny_flux(comfy, tmp_path_factory):
    d = tmp_path_factory.mktemp("estimate_models")
    flow_models.register_diffusion_models_folder(d)
    path = d / "tiny_flux_dev.safetensors"
    try:
        flow_models.FAMILIES["flux_dev"].build(path, seed=0)
    except flow_models.NotOnThisHost as e:
        pytest.skip(str(e))
    comfy.folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        (model,) = call_node("UNETLoader", unet_name=path.name, weight_dtype="default")
    return model


def test_the_node_shows_the_estimate_before_the_first_step(pack, tiny_flux, node_texts):
    spec = flow_models.FAMILIES["flux_dev"]
    cond, latent = flow_models.conditioning(spec, seed=1), flow_models.latent(spec, seed=2)
    with torch.inference_mode():
        pack["host"].stages.optimize_embedding_stage(tiny_flux, cond, latent, steps=12, lr=1e-3, seed=0, node_id="5")
    assert {n for n, _ in node_texts} == {"5"}
    first, last = node_texts[0][1], node_texts[-1][1]
    assert first.startswith("estimate: Flux.1 dev at") and "GB" in first, first
    assert "embedding 1/12" in first and "left" not in first
    assert "embedding 10/12" in node_texts[1][1] and " left" in node_texts[1][1], node_texts[1][1]
    assert last.startswith("estimate: ") and "embedding 12/12" in last
