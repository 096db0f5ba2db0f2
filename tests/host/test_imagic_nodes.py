"""The Imagic nodes inside a real ComfyUI host (skipped without one; see conftest.py)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from .comfy_host import call_node, host_device

from .conftest import NODE_IDS

TEXT = "a photo of a sitting dog"


def photo_pixels(h=64, w=64):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x / w, y / h, np.full_like(x, 0.3, dtype=float)], -1)
    img[16:40, 20:44] = [0.95, 0.9, 0.1]
    return torch.from_numpy(img).float()[None]


@pytest.fixture(scope="module")
def loaded(comfy, pack, sd15_ckpt):
    """MODEL, CLIP, VAE of the tiny SD1.5 checkpoint, loaded as the host's loaders do."""
    nodes = comfy.nodes
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(sd15_ckpt)[:3]
        target = nodes.CLIPTextEncode().encode(clip, TEXT)[0]
        empty = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.VAEEncode().encode(vae, photo_pixels())[0]
    return dict(model=model, clip=clip, vae=vae, target=target, empty=empty, latent=latent)


def call(node_cls, **kw):
    """Call a node as the executor does: under inference mode, outputs as a tuple."""
    with torch.inference_mode():
        return node_cls.execute(**kw).args


def objective(pack, model, cond, latent, count=24):
    """The core objective on fixed held-out (noise, sigma) pairs, measured through the host."""
    HA, imagic = pack["host"], pack["imagic"]
    tensor, extra = cond[0]
    h, w = latent["samples"].shape[-2:]
    den = HA.ComfyDenoiser(model, extra, w * 8, h * 8)
    with den.loaded():
        x0 = HA.latent_for(model, latent).to(den.device)
        pairs = imagic.held_out_pairs(den, x0, count=count, seed=11)
        return imagic.evaluate_objective(den, x0, HA.text_embedding(den, tensor, extra), pairs)


def sample(comfy, model, positive, negative, latent, seed=3):
    with torch.inference_mode():
        return comfy.nodes.common_ksampler(model, seed, 3, 5.0, "euler", "normal", positive, negative,
                                           {"samples": torch.zeros_like(latent["samples"])})[0]["samples"].clone()


def graph(ckpt, eta=0.7, emb_steps=5, ft_steps=5, method="lora", text=TEXT, batch=1):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "5": {"class_type": "ImagicOptimizeEmbedding",
              "inputs": {"model": ["1", 0], "conditioning": ["2", 0], "latent": ["4", 0], "steps": emb_steps,
                         "learning_rate": 0.01, "seed": 0}},
        "6": {"class_type": "ImagicFinetuneUNet",
              "inputs": {"model": ["1", 0], "conditioning": ["5", 0], "latent": ["4", 0], "steps": ft_steps,
                         "learning_rate": 0.001, "seed": 0, "method": method, "rank": 4,
                         "gradient_checkpointing": True}},
        "7": {"class_type": "ImagicInterpolateConditioning",
              "inputs": {"target": ["2", 0], "optimized": ["5", 0], "eta": eta}},
        "8": {"class_type": "KSampler",
              "inputs": {"model": ["6", 0], "positive": ["7", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                         "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "imagic_test"}},
    }


# --------------------------------------------------------------------------------------------
def test_pack_registers_every_node_through_the_hosts_loader(pack, comfy):
    for node_id in NODE_IDS:
        schema = pack["classes"][node_id].GET_SCHEMA()
        assert schema.category == "Imagic" and schema.description
        assert all(i.tooltip for i in schema.inputs), f"{node_id}: every input needs a tooltip"


def test_imagic_graph_runs_and_changing_eta_reruns_only_interpolate_onwards(comfy, pack, sd15_ckpt):
    comfy.reset_executor()
    first = comfy.run_prompt(graph(sd15_ckpt, eta=0.7), check=True)
    assert {"5", "6", "7", "8"} <= set(first.executed)
    image = first.image_paths("10")
    assert image and image[0].is_file()
    second = comfy.run_prompt(graph(sd15_ckpt, eta=0.9), check=True)
    assert "5" not in second.executed and "6" not in second.executed, second.executed
    assert {"7", "8", "9", "10"} <= set(second.executed)


def test_stages_lower_the_objective_and_the_base_model_is_untouched(comfy, pack, loaded):
    C = pack["classes"]
    model, target, latent = loaded["model"], loaded["target"], loaded["latent"]
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    before = sample(comfy, model, target, loaded["empty"], latent)

    base = objective(pack, model, target, latent)
    e_opt, loss1 = call(C["ImagicOptimizeEmbedding"], model=model, conditioning=target, latent=latent, steps=40,
                        learning_rate=0.02, seed=0)
    stage1 = objective(pack, model, e_opt, latent)
    tuned, lora, loss2 = call(C["ImagicFinetuneUNet"], model=model, conditioning=e_opt, latent=latent, steps=30,
                              learning_rate=3e-3, seed=0, method="lora", rank=4, gradient_checkpointing=True)
    stage2 = objective(pack, tuned, e_opt, latent)
    assert stage1 < base, (base, stage1)
    assert stage2 < 0.9 * stage1, (stage1, stage2)
    assert len(loss1["loss"]) == 40 and len(loss2["loss"]) == 30
    assert set(e_opt[0][1]) == set(target[0][1]), "e_opt keeps the conditioning's dict keys"

    for k, v in model.model.state_dict().items():
        assert torch.equal(v, state[k]), f"base weight {k} changed"
    after = sample(comfy, model, target, loaded["empty"], latent)
    assert torch.equal(before, after), "the base MODEL must sample exactly as before training"
    assert not torch.equal(sample(comfy, tuned, target, loaded["empty"], latent), before)


def test_full_finetune_lowers_the_objective_too(comfy, pack, loaded, caplog):
    C = pack["classes"]
    e_opt = loaded["target"]
    start = objective(pack, loaded["model"], e_opt, loaded["latent"])
    with caplog.at_level(logging.WARNING):
        tuned, diff, _ = call(C["ImagicFinetuneUNet"], model=loaded["model"], conditioning=e_opt,
                              latent=loaded["latent"], steps=15, learning_rate=1e-4, seed=0, method="full", rank=4,
                              gradient_checkpointing=False)
    assert any(k.endswith(".diff") for k in diff)
    assert objective(pack, tuned, e_opt, loaded["latent"]) < 0.9 * start
    # 1e-4 is the LoRA widget default: with full, the node says so (the tiny model needs it to move here).
    warned = [r.getMessage() for r in caplog.records if "Imagic Fine-tune UNet" in r.getMessage()]
    assert len(warned) == 1 and "full fine-tuning at learning rate 1e-4 " in warned[0], warned


def test_saved_lora_loads_with_stock_loader_and_predicts_like_the_node_model(comfy, pack, loaded):
    C = pack["classes"]
    tuned, lora, _ = call(C["ImagicFinetuneUNet"], model=loaded["model"], conditioning=loaded["target"],
                          latent=loaded["latent"], steps=8, learning_rate=3e-3, seed=1, method="lora", rank=4,
                          gradient_checkpointing=False)
    stock, not_loaded = comfy.save_and_reload_lora(loaded["model"], lora, "imagic_test")
    assert not not_loaded
    a = sample(comfy, tuned, loaded["target"], loaded["empty"], loaded["latent"])
    b = sample(comfy, stock, loaded["target"], loaded["empty"], loaded["latent"])
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_save_and_load_embedding_round_trip(comfy, pack, loaded):
    C = pack["classes"]
    e_opt, _ = call(C["ImagicOptimizeEmbedding"], model=loaded["model"], conditioning=loaded["target"],
                    latent=loaded["latent"], steps=3, learning_rate=0.01, seed=0)
    with torch.inference_mode():
        C["ImagicSaveEmbedding"].execute(target=loaded["target"], optimized=e_opt, filename_prefix="roundtrip")
    comfy.folder_paths.filename_list_cache.clear()
    tgt, opt = call(C["ImagicLoadEmbedding"], embedding="roundtrip.safetensors", model=loaded["model"])
    assert torch.equal(tgt[0][0], loaded["target"][0][0]) and torch.equal(opt[0][0], e_opt[0][0])


def test_eta_sweep_gives_one_conditioning_per_eta_with_exact_endpoints(pack, loaded):
    C = pack["classes"]
    e_opt = [[loaded["target"][0][0] + 1.0, dict(loaded["target"][0][1])]]
    (conds,) = call(C["ImagicEtaSweep"], target=loaded["target"], optimized=e_opt, etas="0, 0.5, 1")
    assert len(conds) == 3
    assert torch.equal(conds[0][0][0], e_opt[0][0]) and torch.equal(conds[2][0][0], loaded["target"][0][0])
    assert C["ImagicEtaSweep"].validate_inputs(etas="0.5, high") is not True


def test_eta_sweep_graph_samples_once_per_eta(comfy, pack, sd15_ckpt):
    p = graph(sd15_ckpt, emb_steps=2, ft_steps=2)
    p["7"] = {"class_type": "ImagicEtaSweep", "inputs": {"target": ["2", 0], "optimized": ["5", 0],
                                                        "etas": "0.5, 0.8, 1.0"}}
    r = comfy.run_prompt(p, check=True)
    assert len(r.image_paths("10")) == 3


# -------------------------------------------------------------------------------------- errors
def error_of(result):
    assert not result.success
    return result.error.get("exception_message", "")


def test_conditioning_with_several_entries_is_refused(comfy, pack, sd15_ckpt):
    p = graph(sd15_ckpt)
    p["11"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["3", 0]}}
    p["5"]["inputs"]["conditioning"] = ["11", 0]
    assert "has 2 entries" in error_of(comfy.run_prompt(p))


def test_latent_batch_is_refused_with_how_to_pick_one(comfy, pack, sd15_ckpt):
    msg = error_of(comfy.run_prompt(graph(sd15_ckpt, batch=2)))
    assert "batch of 2" in msg and "Latent From Batch" in msg


def test_target_and_optimized_of_different_token_lengths_are_refused(comfy, pack, sd15_ckpt):
    p = graph(sd15_ckpt, emb_steps=1, ft_steps=1)
    p["12"] = {"class_type": "CLIPTextEncode", "inputs": {"text": " ".join(["dog"] * 100), "clip": ["1", 1]}}
    p["7"]["inputs"]["target"] = ["12", 0]
    assert "cannot interpolate" in error_of(comfy.run_prompt(p))


def test_conditioning_of_another_model_family_is_refused(pack, loaded):
    wide = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(Exception, match="2048 wide but this MODEL expects 768"):
        call(pack["classes"]["ImagicOptimizeEmbedding"], model=loaded["model"], conditioning=wide,
             latent=loaded["latent"], steps=1, learning_rate=0.01, seed=0)


def test_exploding_training_stops_with_advice(pack, loaded):
    with pytest.raises(Exception, match="Lower the learning rate"):
        call(pack["classes"]["ImagicFinetuneUNet"], model=loaded["model"], conditioning=loaded["target"],
             latent=loaded["latent"], steps=30, learning_rate=1.0, seed=0, method="full", rank=4,
             gradient_checkpointing=False)


def test_unreadable_embedding_file_is_refused(comfy, pack):
    (comfy.dirs["imagic"] / "broken.safetensors").write_bytes(b"not safetensors at all")
    comfy.folder_paths.filename_list_cache.clear()
    with pytest.raises(Exception, match="not a readable safetensors file"):
        call(pack["classes"]["ImagicLoadEmbedding"], embedding="broken.safetensors")


def test_cancel_stops_training_unpatched_and_caches_nothing(comfy, pack, sd15_ckpt, loaded):
    comfy.reset_executor()
    p = graph(sd15_ckpt, emb_steps=2, ft_steps=200)

    def cancel_in_finetune(node_id, value, total):
        if node_id == "6" and value >= 2:
            comfy.interrupt()

    r = comfy.run_prompt(p, progress_callback=cancel_in_finetune)
    assert not r.success and r.error is not None
    steps_seen = [d["value"] for d in r.progress if d.get("node") == "6"]
    assert max(steps_seen) <= 3, "training must stop within one step of Cancel"
    # Nothing half-trained was cached: the next run trains node 6 again (and only reuses stage 1).
    p["6"]["inputs"]["steps"] = 2
    again = comfy.run_prompt(p, check=True)
    assert "6" in again.executed and "5" not in again.executed


# ------------------------------------------------------------------------------ other families
def _family_case(comfy, ckpt, size):
    nodes = comfy.nodes
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt)[:3]
        target = nodes.CLIPTextEncode().encode(clip, TEXT)[0]
        latent = nodes.VAEEncode().encode(vae, photo_pixels(size, size))[0]
    return model, target, latent


def test_sd2_v_prediction_trains_on_the_v_objective(comfy, pack, sd2v_ckpt):
    model, target, latent = _family_case(comfy, sd2v_ckpt, 64)
    C, HA = pack["classes"], pack["host"]
    assert HA.ComfyDenoiser(model, {}, 64, 64).prediction_type == "v_prediction"
    base = objective(pack, model, target, latent, count=12)
    e_opt, _ = call(C["ImagicOptimizeEmbedding"], model=model, conditioning=target, latent=latent, steps=25,
                    learning_rate=0.02, seed=0)
    tuned, _, _ = call(C["ImagicFinetuneUNet"], model=model, conditioning=e_opt, latent=latent, steps=20,
                       learning_rate=3e-3, seed=0, method="lora", rank=4, gradient_checkpointing=True)
    stage1 = objective(pack, model, e_opt, latent, count=12)
    assert stage1 < base and objective(pack, tuned, e_opt, latent, count=12) < 0.9 * stage1


def test_sdxl_optimizes_the_pooled_vector_with_size_conditioning(comfy, pack, sdxl_ckpt):
    model, target, latent = _family_case(comfy, sdxl_ckpt, 64)
    C = pack["classes"]
    assert target[0][0].shape[-1] == 2048
    e_opt, loss = call(C["ImagicOptimizeEmbedding"], model=model, conditioning=target, latent=latent, steps=15,
                       learning_rate=0.02, seed=0)
    assert not torch.equal(e_opt[0][1]["pooled_output"], target[0][1]["pooled_output"]), "pooled must be optimized"
    assert e_opt[0][1]["pooled_output"].shape == target[0][1]["pooled_output"].shape
    tuned, lora, loss2 = call(C["ImagicFinetuneUNet"], model=model, conditioning=e_opt, latent=latent, steps=6,
                              learning_rate=3e-3, seed=0, method="lora", rank=4, gradient_checkpointing=True)
    assert np.mean(loss2["loss"][-3:]) < np.mean(loss2["loss"][:3]) * 1.5 and lora


def test_training_sees_an_upstream_lora_and_keeps_it(comfy, pack, loaded):
    """A LoRA loaded before the Imagic nodes is part of the model they train on and return."""
    C = pack["classes"]
    _, lora, _ = call(C["ImagicFinetuneUNet"], model=loaded["model"], conditioning=loaded["target"],
                      latent=loaded["latent"], steps=5, learning_rate=1e-2, seed=2, method="lora", rank=4,
                      gradient_checkpointing=False)
    upstream = call_node("LoraModelLoader", model=loaded["model"], lora=lora, strength_model=1.0)[0]
    assert objective(pack, upstream, loaded["target"], loaded["latent"]) != pytest.approx(
        objective(pack, loaded["model"], loaded["target"], loaded["latent"]), rel=1e-6)
    tuned, _, _ = call(C["ImagicFinetuneUNet"], model=upstream, conditioning=loaded["target"],
                       latent=loaded["latent"], steps=2, learning_rate=1e-3, seed=0, method="lora", rank=4,
                       gradient_checkpointing=False)
    assert set(upstream.patches) <= set(tuned.patches)
    assert all(len(tuned.patches[k]) == len(upstream.patches[k]) + 1 for k in upstream.patches)


@pytest.mark.parametrize("reload", [None, True], ids=["as-chosen", "host-reload"])
def test_training_runs_on_a_private_non_dynamic_model_and_leaves_the_input_model_loaded(comfy, pack, loaded, reload):
    """The training model is the pack's own: not the input's network, never the DynamicVRAM patcher, with
    ordinary (non-inference) frozen weights used as they are; the input MODEL keeps its weights and its
    place. As chosen for this MODEL: the host's reload for a DynamicVRAM MODEL, else a private network on
    the input's memory (no copy). host-reload: the path a DynamicVRAM MODEL takes, forced here."""
    import inspect

    HA, mm = pack["host"], comfy.host.model_management
    model = loaded["model"]
    can_reload = "force_deepcopy" in inspect.signature(model.clone).parameters and model.cached_patcher_init is not None
    if reload and not can_reload:
        # Before ComfyUI 0.11 there is no clone(force_deepcopy=True) (nor DynamicVRAM): a MODEL that would
        # need the reload is refused with the way out, not trained through.
        den = HA.ComfyDenoiser(model, loaded["target"][0][1], 64, 64)
        den.reload = True
        with pytest.raises(Exception, match="cannot be copied for training.*--disable-dynamic-vram"):
            with den.loaded():
                pass
        assert den.patcher is None
        return
    dynamic = hasattr(model, "is_dynamic") and model.is_dynamic()
    if host_device() == "cuda" and can_reload:
        # scripts/gpu_host_check.sh: the case this guards against is the DynamicVRAM input MODEL.
        assert dynamic, "expected the host's DynamicVRAM default on NVIDIA"
    with torch.inference_mode():
        mm.load_models_gpu([model])
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    tensor, extra = loaded["target"][0]
    den = HA.ComfyDenoiser(model, extra, 64, 64)
    den.reload = reload
    with den.loaded():
        assert den.base is not model.model and den.base.diffusion_model is not model.model.diffusion_model
        assert not (hasattr(den.patcher, "is_dynamic") and den.patcher.is_dynamic())
        weights = list(den.base.diffusion_model.parameters())
        originals = list(model.model.diffusion_model.parameters())
        assert weights and not any(w.is_inference() or w.requires_grad for w in weights)
        assert not {id(w) for w in weights} & {id(w) for w in originals}
        shared = {w.data_ptr() for w in originals} & {w.data_ptr() for w in weights}
        if den.owns_weights:
            assert reload or dynamic
            assert not shared, "a reloaded copy has memory of its own"
        else:
            assert len(shared) == len(weights), "a plain MODEL's weights are used where they are: no copy"
        if hasattr(mm, "in_training"):
            assert mm.in_training, "set while training, as the host's own trainer does"
    assert den.patcher is None, "the training model is dropped when the stage ends"
    assert not getattr(mm, "in_training", False)
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(lm.model is model for lm in mm.current_loaded_models), "the input MODEL stays loaded"


def test_full_finetune_delta_does_not_depend_on_what_else_patched_the_shared_network(comfy, pack, loaded):
    """The training network shares the input's weights; a LoRA'd clone of the same network sampled just
    before (its weights patched in place) must not change what a full fine-tune hands back."""
    C = pack["classes"]
    kw = dict(conditioning=loaded["target"], latent=loaded["latent"], steps=3, learning_rate=1e-4, seed=4,
              method="full", rank=4, gradient_checkpointing=False)
    _, plain, _ = call(C["ImagicFinetuneUNet"], model=loaded["model"], **kw)
    _, lora, _ = call(C["ImagicFinetuneUNet"], model=loaded["model"], **dict(kw, method="lora", learning_rate=1e-2))
    upstream = call_node("LoraModelLoader", model=loaded["model"], lora=lora, strength_model=1.0)[0]
    sample(comfy, upstream, loaded["target"], loaded["empty"], loaded["latent"])  # patches the shared weights
    _, again, _ = call(C["ImagicFinetuneUNet"], model=loaded["model"], **kw)
    assert plain.keys() == again.keys() and any(k.endswith(".diff") for k in plain)
    assert all(torch.equal(plain[k], again[k]) for k in plain)


def test_model_kinds_imagic_cannot_train_are_refused_by_name(comfy, pack, loaded):
    """An image-to-image flow model (0.33's IMG_TO_IMG_FLOW, a CONST subclass that predicts x0 with no
    noise) must not be trained as a text-to-image flow model; a flow model with scaled training noise
    carries its scale into the objective."""
    import comfy.model_sampling as kinds

    C = pack["classes"]

    def with_sampling(kind, **settings):
        class Sampling(kinds.ModelSamplingDiscreteFlow, kind):
            pass

        m = loaded["model"].clone()
        m.add_object_patch("model_sampling", Sampling(loaded["model"].model.model_config))
        ms = m.get_model_object("model_sampling")
        for k, v in settings.items():
            getattr(ms, f"set_{k}")(v)
        return m

    if hasattr(kinds, "IMG_TO_IMG_FLOW"):
        with pytest.raises(Exception, match="IMG_TO_IMG_FLOW"):
            call(C["ImagicOptimizeEmbedding"], model=with_sampling(kinds.IMG_TO_IMG_FLOW), conditioning=loaded["target"],
                 latent=loaded["latent"], steps=1, learning_rate=1e-3, seed=0)
    for name in ("X0", "IMG_TO_IMG", "EDM", "V_PREDICTION_DDPM", "COSMOS_RFLOW"):
        kind = getattr(kinds, name, None)
        if kind is None:
            continue
        with pytest.raises(Exception, match=f"parameterization .*{name}.* not supported"):
            call(C["ImagicFinetuneUNet"], model=with_sampling(kind), conditioning=loaded["target"],
                 latent=loaded["latent"], steps=1, learning_rate=1e-3, seed=0, method="lora", rank=4,
                 gradient_checkpointing=False)
    flow = with_sampling(kinds.CONST)
    den = pack["host"].ComfyDenoiser(flow, {}, 64, 64)
    assert den.prediction_type == "flow" and den.noise_scale == 1.0
    if hasattr(kinds.ModelSamplingDiscreteFlow, "set_noise_scale"):
        scaled = pack["host"].ComfyDenoiser(with_sampling(kinds.CONST, noise_scale=8.0), {}, 64, 64)
        assert scaled.noise_scale == 8.0


def _with_model_sampling(loaded, sampling_cls):
    m = loaded["model"].clone()
    m.add_object_patch("model_sampling", sampling_cls(loaded["model"].model.model_config))
    return m


def test_prediction_kinds_are_an_allowlist_of_exact_classes(comfy, pack, loaded):
    """A kind the pack does not know is refused by name even when it subclasses a supported one (ComfyUI
    0.38's IMG_TO_IMG_VELOCITY(CONST) predicts image minus output from the image itself), and so is a
    schedule that redefines a prediction method; the supported kinds keep their objective."""
    import comfy.model_sampling as kinds

    host, C = pack["host"], pack["classes"]

    class NEW_KIND(kinds.CONST):
        pass

    class IMG_TO_IMG_VELOCITY(kinds.CONST):  # as ComfyUI 0.38's comfy/model_sampling.py defines it
        def calculate_denoised(self, sigma, model_output, model_input):
            return model_input - model_output

        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            return latent_image

    for kind in (NEW_KIND, IMG_TO_IMG_VELOCITY):
        sampling = type("Sampling", (kinds.ModelSamplingDiscreteFlow, kind), {})
        with pytest.raises(Exception, match=f"parameterization .*{kind.__name__}.* not supported"):
            call(C["ImagicOptimizeEmbedding"], model=_with_model_sampling(loaded, sampling),
                 conditioning=loaded["target"], latent=loaded["latent"], steps=1, learning_rate=1e-3, seed=0)

    class Redefined(kinds.ModelSamplingDiscreteFlow, kinds.CONST):
        def calculate_denoised(self, sigma, model_output, model_input):
            return model_output

    with pytest.raises(Exception, match="Redefined redefines calculate_denoised"):
        host.prediction_type_of(_with_model_sampling(loaded, Redefined))
    edm_v = _with_model_sampling(loaded, type("Sampling", (kinds.ModelSamplingContinuousEDM, kinds.V_PREDICTION), {}))
    edm_v.get_model_object("model_sampling").set_parameters(0.002, 80.0, 0.5)  # Playground-style data scale
    with pytest.raises(Exception, match="sigma_data 0.5"):
        host.prediction_type_of(edm_v)
    for schedule, kind, objective in ((kinds.ModelSamplingDiscrete, kinds.EPS, "epsilon"),
                                      (kinds.ModelSamplingDiscrete, kinds.V_PREDICTION, "v_prediction"),
                                      (kinds.ModelSamplingDiscreteFlow, kinds.CONST, "flow")):
        sampling = type("Sampling", (schedule, kind), {})
        assert host.prediction_type_of(_with_model_sampling(loaded, sampling)) == objective


def test_each_family_gets_its_verdict_before_training(comfy, pack, loaded):
    """A tested family trains silently, an untested one with a warning that says so, a refused one (its text
    arrives as token ids, say) stops with the reason before any work."""
    from types import SimpleNamespace

    stages = pack["host"].stages
    assert stages.family_warning(loaded["model"]) is None  # SD15
    fake = lambda name: SimpleNamespace(model=SimpleNamespace(model_config=type(name, (), {})()))
    assert "AuraFlow is not tested" in stages.family_warning(fake("AuraFlow"))
    assert "does not know" in stages.family_warning(fake("SomeFutureModel"))
    with pytest.raises(Exception, match="HiDream-O1 cannot be edited with Imagic: the text reaches the model as token ids"):
        stages.family_warning(fake("HiDreamO1"))
    # A family not in the table whose text encoder hands over token ids is refused on its conditioning.
    ids = [[torch.zeros(1, 12, 1, dtype=torch.long), {}]]
    with pytest.raises(Exception, match="holds token ids"):
        call(pack["classes"]["ImagicOptimizeEmbedding"], model=loaded["model"], conditioning=ids,
             latent=loaded["latent"], steps=1, learning_rate=1e-3, seed=0)


def test_a_noise_level_of_zero_is_never_drawn(comfy, pack, loaded):
    """The prediction is recovered by dividing by sigma: a schedule whose table contains 0 (a family of
    ComfyUI 0.38 has one) never has it drawn, and a table with no level above 0 is refused."""
    import comfy.model_sampling as kinds

    host = pack["host"]
    model = _with_model_sampling(loaded, type("Sampling", (kinds.ModelSamplingDiscreteFlow, kinds.CONST), {}))
    ms = model.get_model_object("model_sampling")
    table = ms.sigmas.clone()
    ms.sigmas = torch.cat([torch.zeros(len(table)), table])  # half the table at 0
    den = host.ComfyDenoiser(model, {}, 64, 64)
    drawn = den.sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert (drawn > 0).all() and drawn.min() == table.min()
    ms.sigmas = torch.zeros(5)
    with pytest.raises(Exception, match="no noise level above zero"):
        host.ComfyDenoiser(model, {}, 64, 64)
    ms.sigmas = table


def test_augmented_assignments_go_out_of_place_only_while_training(pack):
    """The mode that lets autograd through the DiTs' residual updates: ``x += y`` becomes ``x = x + y``
    only while gradients are recorded; an explicit ``x.add_(y)`` and ``x[i] += y`` still write; under
    no_grad everything is as written. A ``+=`` through a view bound to a name does not reach its base
    under the mode, so a model whose output that changes is found by the check and refused."""
    safety = pack["host"].autograd_safety

    def run(grad):
        with torch.set_grad_enabled(grad), safety.OutOfPlaceAugmented():
            x = torch.ones(3)
            alias = x
            x += 1
            called = torch.ones(3)
            called_alias = called
            called.add_(1)
            base = torch.ones(4)
            view = base[:2]
            view *= 3
            item = torch.ones(4)
            item[1:3] += 2
        return alias, x, called_alias, base, item

    alias, x, called_alias, base, item = run(grad=True)
    assert alias.tolist() == [1, 1, 1] and x.tolist() == [2, 2, 2], "+= under grad must not write in place"
    assert called_alias.tolist() == [2, 2, 2], "an explicit add_ call is left as it is"
    assert item.tolist() == [1, 3, 3, 1], "x[i] += y stores back into x"
    assert base.tolist() == [1, 1, 1, 1], "under the mode a view's += does not reach its base"
    alias, x, called_alias, base, item = run(grad=False)
    assert alias.tolist() == [2, 2, 2] and alias is x, "without gradients += stays in place"
    assert base.tolist() == [3, 3, 1, 1]

    def residual(x):  # a DiT-style residual update after an op that saved x: the mode keeps its output
        h = x * 2
        g = h * h
        h += 1
        return g + h

    def through_a_view(x):  # writes through a view and reads the base again: the mode would change it
        h = x * 2
        g = h * h
        v = h[:, :1]
        v += 5
        return g + h

    x = torch.randn(2, 3)
    assert safety.writes_saved_tensors(residual, x) and safety.writes_saved_tensors(through_a_view, x)
    assert not safety.writes_saved_tensors(lambda t: (t * 2).exp() + 1, x)
    assert not safety.changes_the_result(residual, x)
    assert safety.changes_the_result(through_a_view, x)

    def explicit_call(x):  # an explicit in-place call on a saved tensor (0.38's QwenImage21 addcmul_): the mode
        h = x * 2          # cannot help, so the denoiser refuses such a model at its first step
        g = h * h
        h.add_(1)
        return g + h

    assert not safety.writes_saved_tensors(safety.autograd_safe(residual), x), "the mode makes += safe"
    assert safety.writes_saved_tensors(safety.autograd_safe(explicit_call), x)
    # A host kernel with no backward (ComfyUI 0.8's comfy_kitchen rope for HunyuanImage 2.1): a clear refusal.
    with pytest.raises(Exception, match="imagic_test.no_backward.* has no backward.* update ComfyUI"):
        safety.writes_saved_tensors(lambda t: _no_backward_op()(t) + 1, x)


_NO_BACKWARD = []


def _no_backward_op():
    """A custom op with no autograd formula, registered once per session."""
    if not _NO_BACKWARD:
        @torch.library.custom_op("imagic_test::no_backward", mutates_args=())
        def no_backward(t: torch.Tensor) -> torch.Tensor:
            return t * 2

        @no_backward.register_fake
        def _(t):
            return torch.empty_like(t)

        _NO_BACKWARD.append(no_backward)
    return _NO_BACKWARD[0]


def test_the_out_of_place_mode_is_off_where_the_probe_finds_no_in_place_write(comfy, pack, loaded):
    """The first call with gradients probes the model: SD1.5's UNet writes no tensor autograd saved, so
    the mode (a Python call per op) stays off for it; the flow-family tests train Flux with it on."""
    host = pack["host"]
    tensor, extra = loaded["target"][0]
    den = host.ComfyDenoiser(loaded["model"], extra, 64, 64)
    assert den.out_of_place is None
    with den.loaded():
        x0 = host.latent_for(loaded["model"], loaded["latent"]).to(den.device)
        sigma = den.sample_timesteps(1, torch.Generator().manual_seed(0))
        den.predict(x0 + torch.randn_like(x0) * sigma, sigma, host.text_embedding(den, tensor, extra))
        assert den.out_of_place is False


def test_lora_side_branch_on_the_host_is_the_merged_weight_with_the_same_gradients(comfy, pack, loaded):
    """On the host's own network (comfy ops layers), LoRA as a side branch computes what weight + up @ down
    computes, with the same LoRA gradients, and the input MODEL's weights stay as they were."""
    from importlib import import_module

    HA = pack["host"]
    deltas = import_module(pack["imagic"].__name__ + ".deltas")
    model = loaded["model"]
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    tensor, extra = loaded["target"][0]
    den = HA.ComfyDenoiser(model, extra, 64, 64)
    with den.loaded():
        delta = deltas.make_delta("lora", den.trainable_module(), 4, seed=1)
        with torch.no_grad():
            for up in delta.up:
                up.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        x0 = HA.latent_for(model, loaded["latent"])
        noise = torch.randn((2,) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(3))
        sigma = den.sample_timesteps(2, torch.Generator().manual_seed(4))
        cond = {"context": tensor.clone().float().expand(2, -1, -1)}
        outs = {}
        for side in (True, False):
            with deltas.applied(delta, den.trainable_module(), side_branch=side):
                out = den.predict(x0 + noise * sigma.reshape(-1, 1, 1, 1), sigma, cond)
                out.square().mean().backward()
            outs[side] = (out.detach(), [p.grad.clone() for p in delta.parameters()])
            delta.zero_grad(set_to_none=True)
        with torch.no_grad():
            plain = den.predict(x0 + noise * sigma.reshape(-1, 1, 1, 1), sigma, cond)
    assert not torch.allclose(outs[True][0], plain, atol=1e-4), "the LoRA must change the output"
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=1e-4, atol=1e-5)
    for g_side, g_merged in zip(outs[True][1], outs[False][1]):
        torch.testing.assert_close(g_side, g_merged, rtol=1e-3, atol=1e-6)
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ the objective, by hand
def objective_by_hand(pack, model, cond, latent, sigmas, seed=5):
    """(the node's objective, the same loss computed by hand) at the given noise levels.

    By hand: x_t from the parameterization's own formula, the target in the model's training
    parameterization, and the prediction as the network's raw output (caught with a forward hook),
    so a wrong x_t, a wrong target or a prediction recovered in the wrong form all show.
    """
    HA, imagic = pack["host"], pack["imagic"]
    tensor, extra = cond[0]
    h, w = latent["samples"].shape[-2:]
    den = HA.ComfyDenoiser(model, extra, w * 8, h * 8)
    seen = {}
    with den.loaded():
        net = den.base.diffusion_model
        hooks = [net.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0] if a else k["x"]), with_kwargs=True),
                 net.register_forward_hook(lambda m, a, out: seen.update(out=out))]
        try:
            x0 = HA.latent_for(model, latent).to(den.device)
            s = torch.tensor(sigmas, dtype=torch.float32)
            noise = torch.randn((len(sigmas),) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(seed))
            e = HA.text_embedding(den, tensor, extra)
            with torch.no_grad():
                node = imagic.denoising_loss(den, x0, e, noise, s).item()
        finally:
            for hk in hooks:
                hk.remove()
    sv = s.view((-1,) + (1,) * (x0.ndim - 1))
    noise = noise * den.noise_scale
    if den.prediction_type == "flow":
        x_t, target = (1 - sv) * x0 + sv * noise, noise - x0
    else:  # the DDPM form of the host's sigma: alpha = 1 / sqrt(1 + sigma^2)
        alpha, sigma_ddpm = torch.rsqrt(1 + sv * sv), sv * torch.rsqrt(1 + sv * sv)
        x_t = alpha * x0 + sigma_ddpm * noise
        target = noise if den.prediction_type == "epsilon" else alpha * noise - sigma_ddpm * x0
    torch.testing.assert_close(seen["x"].float(), x_t, rtol=2e-3, atol=2e-3)  # what the network was given
    hand = torch.nn.functional.mse_loss(seen["out"].float(), target).item()
    return node, hand, den.prediction_type


@pytest.mark.parametrize("family,expect", [("sd15", "epsilon"), ("sd2v", "v_prediction")])
def test_the_nodes_objective_is_the_hand_computed_training_loss(comfy, pack, sd15_ckpt, sd2v_ckpt, family, expect):
    model, target, latent = _family_case(comfy, sd15_ckpt if family == "sd15" else sd2v_ckpt, 64)
    node, hand, kind = objective_by_hand(pack, model, target, latent, [0.5, 3.0, 12.0])
    assert kind == expect
    assert node == pytest.approx(hand, rel=1e-4)


def test_full_finetune_offloads_the_input_models_weights_while_training_and_puts_them_back(comfy, pack, loaded):
    """A full fine-tune reads only its trained copy: the input MODEL's weights (which the training
    network shares) leave their memory while it trains, and come back bit for bit, as the same kind
    of tensor on the same device; the trained difference is the same as without offloading."""
    import comfy.utils

    C, model = pack["classes"], loaded["model"]
    net = model.model.diffusion_model
    params = dict(net.named_parameters())
    before = {k: (p.detach().clone(), p.data_ptr(), p.is_inference(), p.device) for k, p in params.items()}
    moved = []
    old_hook = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        if value == 1:
            moved.append(sum(p.data_ptr() != before[k][1] for k, p in params.items()))

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        _, diff, _ = call(C["ImagicFinetuneUNet"], model=model, conditioning=loaded["target"], latent=loaded["latent"],
                          steps=2, learning_rate=1e-6, seed=0, method="full", rank=4, gradient_checkpointing=False)
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
    weights = [k for k in params if k.endswith((".weight", ".bias"))]
    assert moved and moved[0] >= len(weights), (moved, len(weights))
    for k, p in net.named_parameters():
        value, _, inference, device = before[k]
        assert torch.equal(p, value) and p.is_inference() == inference and p.device == device, k
    HA = pack["host"]
    # The same training without offloading (the core's applied() with offload_base off) gives the same difference.
    den_cls = HA.ComfyDenoiser
    plain_attach = den_cls.attach
    try:
        den_cls.attach = lambda self, delta: pack["deltas"].applied(delta, self.base.diffusion_model)
        _, diff_plain, _ = call(C["ImagicFinetuneUNet"], model=model, conditioning=loaded["target"],
                                latent=loaded["latent"], steps=2, learning_rate=1e-6, seed=0, method="full", rank=4,
                                gradient_checkpointing=False)
    finally:
        den_cls.attach = plain_attach
    assert diff.keys() == diff_plain.keys() and all(torch.equal(diff[k], diff_plain[k]) for k in diff)
