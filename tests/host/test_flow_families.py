"""The Imagic nodes on flow-matching families, each a tiny diffusion-model file the host detects as
that family and loads with the stock Load Diffusion Model node (flow_models.py), conditioning built
in code with the family's shapes (its real text encoders are billions of parameters).

Qwen-Image, Lumina 2 and Z-Image cannot be made small for the host's detection (380M-910M
parameters, 15-100 s each here): they run with IMAGIC_HOST_SLOW=1.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from . import flow_models
from .comfy_host import call_node
from .test_imagic_nodes import objective, objective_by_hand

SLOW = os.environ.get("IMAGIC_HOST_SLOW", "") not in ("", "0")
FAMILIES = [pytest.param(name, marks=pytest.mark.skipif(spec.heavy and not SLOW, reason=(
    f"{name}: hundreds of millions of parameters at the smallest size the host detects; set IMAGIC_HOST_SLOW=1")),
    id=name) for name, spec in flow_models.FAMILIES.items()]


@pytest.fixture(scope="module")
def models_dir(comfy, tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusion_models")
    flow_models.register_diffusion_models_folder(d)
    return d


_LOADED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _drop_loaded_models():
    """Release the last family's MODEL with the module (not at interpreter exit, after the host's globals)."""
    yield
    _LOADED.clear()


@pytest.fixture
def fam(comfy, pack, models_dir, request):
    """(spec, MODEL from the stock UNETLoader, conditioning, latent) of the family; one at a time in memory."""
    name = request.param
    if name not in _LOADED:
        _LOADED.clear()
        # The host keeps every loaded model (on a CPU, in RAM): free the last family's before the next one, or
        # the opt-in families together pass 23 GB.
        import gc

        gc.collect()  # (the host's finalizers edit its loaded-model list: not during unload_all_models' walk)
        from comfy import model_management  # (not "import comfy...": that would rebind the fixture's name)

        model_management.unload_all_models()
        model_management.soft_empty_cache()
        spec = flow_models.FAMILIES[name]
        path = models_dir / f"tiny_{name}.safetensors"
        if not path.exists():
            try:
                spec.build(path, seed=0)
            except flow_models.NotOnThisHost as e:
                pytest.skip(str(e))
        comfy.folder_paths.filename_list_cache.clear()
        with torch.inference_mode():
            (model,) = call_node("UNETLoader", unet_name=path.name, weight_dtype="default")
        cond, latent = flow_models.conditioning(spec, seed=1), flow_models.latent(spec, seed=2)
        try:  # one step: a host whose kernels for this family have no backward is refused with that reason
            call(pack["classes"]["ImagicOptimizeEmbedding"], model=model, conditioning=cond, latent=latent, steps=1,
                 learning_rate=1e-3, seed=0)
        except Exception as e:
            if "gradients cannot pass through" not in str(e):
                raise
            pytest.skip(f"{name} on this host: {e}")
        _LOADED[name] = (spec, model, cond, latent)
    return _LOADED[name]


def families(test):
    return pytest.mark.parametrize("fam", FAMILIES, indirect=True)(test)


def call(node_cls, **kw):
    with torch.inference_mode():
        return node_cls.execute(**kw).args


def sample(model, positive, negative, latent, seed=3, steps=2, cfg=1.0):
    import nodes

    with torch.inference_mode():
        lat = {"samples": torch.zeros_like(latent["samples"])}
        return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", positive, negative, lat)[0]["samples"].clone()


# --------------------------------------------------------------------------------------------------
@families
def test_the_family_is_detected_and_trained_as_a_flow_model(pack, fam):
    spec, model, cond, latent = fam
    assert type(model.model.model_config).__name__ == spec.model_class
    den = pack["host"].ComfyDenoiser(model, cond[0][1], 64, 64)
    assert den.prediction_type == "flow"


@families
def test_the_nodes_objective_is_the_hand_computed_velocity_loss(pack, fam):
    spec, model, cond, latent = fam
    node, hand, kind = objective_by_hand(pack, model, cond, latent, [0.15, 0.5, 0.9])
    assert kind == "flow"
    assert node == pytest.approx(hand, rel=1e-3)


@families
def test_noise_levels_are_drawn_with_the_models_shift(pack, fam):
    """Uniform over the model's own (shifted) schedule, the one its sampler uses: not plain uniform t."""
    spec, model, cond, latent = fam
    den = pack["host"].ComfyDenoiser(model, cond[0][1], 64, 64)
    table = model.get_model_object("model_sampling").sigmas.float()
    s = den.sample_timesteps(20000, torch.Generator().manual_seed(0)).cpu()
    assert torch.isin(s, table).all()
    assert s.mean().item() == pytest.approx(table.mean().item(), abs=0.01)
    if table.mean() > 0.55:  # a shift above 1 moves the training noise up, as the model was trained
        assert s.mean() > 0.55


@families
def test_both_stages_lower_the_familys_objective_and_the_base_is_untouched(comfy, pack, fam):
    spec, model, cond, latent = fam
    C = pack["classes"]
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    base = objective(pack, model, cond, latent, count=12)
    steps, lr = spec.stage1
    e_opt, loss1 = call(C["ImagicOptimizeEmbedding"], model=model, conditioning=cond, latent=latent, steps=steps,
                        learning_rate=lr, seed=0)
    stage1 = objective(pack, model, e_opt, latent, count=12)
    tuned, lora, loss2 = call(C["ImagicFinetuneUNet"], model=model, conditioning=e_opt, latent=latent, steps=20,
                              learning_rate=3e-3, seed=0, method="lora", rank=4, gradient_checkpointing=True)
    stage2 = objective(pack, tuned, e_opt, latent, count=12)
    assert stage1 < base and stage2 < stage1, (base, stage1, stage2)
    assert set(e_opt[0][1]) == set(cond[0][1]), "e_opt keeps every key of the conditioning (guidance, masks, ...)"
    if spec.guidance is not None:
        assert e_opt[0][1]["guidance"] == spec.guidance
    if spec.pooled_width is not None:  # the model reads the pooled vector: stage 1 optimizes it too
        assert not torch.equal(e_opt[0][1]["pooled_output"], cond[0][1]["pooled_output"])
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, state[k]), f"base weight {k} changed"


@contextmanager
def training_copy_loaded(pack, model, cond, latent, checkpointing: bool, weights_on_device=None):
    """(denoiser, x0, e) as a training step has them: the node's denoiser over the training copy, loaded, the
    photo's latent and the text embedding as a leaf that takes gradients, with autograd on."""
    host = pack["host"]
    tensor, extra = cond[0][0], cond[0][1]
    den = host.ComfyDenoiser(model, extra, *host.conditioning.image_size(extra, latent))
    den.weights_on_device = weights_on_device
    with torch.inference_mode(False), den.loaded(checkpointing):
        x0 = host.conditioning.latent_for(model, latent)
        e = {k: v.detach().clone().requires_grad_(True) for k, v in host.conditioning.text_embedding(den, tensor, extra).items()}
        yield den, x0, e


def gradients(pack, model, cond, latent, checkpointing: bool, weights_on_device=None):
    """(output, d/d latent, d/d context, out-of-place, bytes streamed) of one prediction through the training copy,
    as a training step sees them."""
    with training_copy_loaded(pack, model, cond, latent, checkpointing, weights_on_device) as (den, x0, e):
        x = (x0 + 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
        out = den.predict(x, torch.tensor([0.5]), e)
        out.float().pow(2).sum().backward()
        return out.detach(), x.grad, e["context"].grad, den.out_of_place, den.offloaded_bytes


@families
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_forward(pack, fam):
    """Checkpointed blocks run their forward again in the backward pass: a block that wrote its own input in
    place (Flux's ``img += ...``) would then recompute from the written values. The in-place probe runs with
    checkpointing paused so it sees such writes, and the blocks then run out of place: same gradients."""
    spec, model, cond, latent = fam
    plain, ckpt = gradients(pack, model, cond, latent, False), gradients(pack, model, cond, latent, True)
    assert plain[3] == ckpt[3], "the in-place probe must decide the same with checkpointing"
    for name, a, b in zip(("output", "d/d latent", "d/d context"), plain[:3], ckpt[:3]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@families
def test_weights_streamed_from_ram_give_the_same_training_step(comfy, pack, fam):
    """A model larger than the GPU trains with the host's partial loading: the weights that do not fit stay in
    RAM and are streamed layer by layer (an upstream LoRA applied as they stream), and each is made again in
    the backward pass instead of kept. On a CPU the host never needs to; ``weights_on_device`` makes it (the
    host's own ``partially_unload``), and the step must be the one of the fully loaded model."""
    spec, model, cond, latent = fam
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    tuned, _, _ = call(pack["classes"]["ImagicFinetuneUNet"], model=model, conditioning=cond, latent=latent, steps=2,
                       learning_rate=3e-2, seed=0, method="lora", rank=4, gradient_checkpointing=False)
    full = gradients(pack, tuned, cond, latent, True)
    assert full[4] == 0
    for kept in (0, tuned.model_size() // 2):
        streamed = gradients(pack, tuned, cond, latent, True, weights_on_device=kept)
        assert streamed[4] > tuned.model_size() // 3, "the host must have left weights in RAM"
        for name, a, b in zip(("output", "d/d latent", "d/d context"), full[:3], streamed[:3]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name, k=kept: f"{n}, {k} B kept: {m}")
    for k, v in model.model.state_dict().items():  # streaming and the LoRA never wrote the shared weights
        assert torch.equal(v, state[k]), f"base weight {k} changed"


@families
def test_saved_lora_loads_with_the_stock_loader_and_samples_like_the_node_model(comfy, pack, fam):
    spec, model, cond, latent = fam
    C = pack["classes"]
    tuned, lora, _ = call(C["ImagicFinetuneUNet"], model=model, conditioning=cond, latent=latent, steps=4,
                          learning_rate=3e-3, seed=1, method="lora", rank=4, gradient_checkpointing=False)
    stock, not_loaded = comfy.save_and_reload_lora(model, lora, f"imagic_{spec.name}")
    assert not not_loaded
    negative = [[torch.zeros_like(cond[0][0]), dict(cond[0][1])]]
    a, b = sample(tuned, cond, negative, latent), sample(stock, cond, negative, latent)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert not torch.equal(a, sample(model, cond, negative, latent)), "the LoRA must change the model"


@families
def test_cancel_stops_training_within_a_step_and_leaves_the_model(comfy, pack, fam):
    import comfy.model_management as mm
    import comfy.utils

    spec, model, cond, latent = fam
    C = pack["classes"]
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    seen, cancelled_at = [], []
    old_hook = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):  # the host's progress bar skips values: note where
        seen.append(value)
        if value >= 2 and not cancelled_at:
            cancelled_at.append(value)
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            call(C["ImagicFinetuneUNet"], model=model, conditioning=cond, latent=latent, steps=200,
                 learning_rate=3e-3, seed=0, method="lora", rank=4, gradient_checkpointing=True)
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
        mm.interrupt_current_processing(False)
    assert max(seen) <= cancelled_at[0] + 1, (seen, cancelled_at)
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, state[k]), f"base weight {k} changed"


@families
def test_the_finetuned_model_samples_the_interpolated_conditioning_through_the_stock_sampler(pack, fam):
    spec, model, cond, latent = fam
    C = pack["classes"]
    e_opt, _ = call(C["ImagicOptimizeEmbedding"], model=model, conditioning=cond, latent=latent, steps=3,
                    learning_rate=0.02, seed=0)
    tuned, _, _ = call(C["ImagicFinetuneUNet"], model=model, conditioning=e_opt, latent=latent, steps=3,
                       learning_rate=3e-3, seed=0, method="lora", rank=4, gradient_checkpointing=True)
    (edit,) = call(C["ImagicInterpolateConditioning"], target=cond, optimized=e_opt, eta=0.7)
    assert set(edit[0][1]) == set(cond[0][1])
    want = 0.7 * cond[0][0] + 0.3 * e_opt[0][0]
    torch.testing.assert_close(edit[0][0], want)
    negative = [[torch.zeros_like(cond[0][0]), dict(cond[0][1])]]
    out = sample(tuned, edit, negative, latent, cfg=2.0)
    assert out.shape[-2:] == latent["samples"].shape[-2:] and torch.isfinite(out).all()
    assert not torch.equal(out, sample(model, edit, negative, latent, cfg=2.0))


# ------------------------------------------------------------------ reference latents (edit models)
# Flux Kontext, Flux.2 and Krea 2 (like Qwen-Image-Edit) read reference images from the conditioning
# (ReferenceLatent: "reference_latents", optionally "reference_latents_method"). The training nodes
# train with them exactly as the sampler passes them: the objective is the one the edit will be
# sampled with. Krea 2's "index_timestep_zero" method runs its blocks' slice-wise in-place
# modulation (mul_/add_ on views of activations), which must pass gradients.
REFERENCE_CASES = [pytest.param("flux_dev", None, id="flux_dev-kontext"),
                   pytest.param("flux2", None, id="flux2-index"),
                   pytest.param("krea2", "index", id="krea2-index"),
                   pytest.param("krea2", "index_timestep_zero", id="krea2-index_timestep_zero")]


@pytest.mark.parametrize("fam, method", REFERENCE_CASES, indirect=["fam"])
def test_reference_latents_are_trained_with_as_the_sampler_passes_them(comfy, pack, fam, method):
    spec, model, cond, latent = fam
    C = pack["classes"]
    extra = dict(cond[0][1], reference_latents=[flow_models.latent(spec, seed=7)["samples"]])
    if method is not None:
        extra["reference_latents_method"] = method
    with_ref = [[cond[0][0], extra]]
    base_with, base_without = objective(pack, model, with_ref, latent, count=12), objective(pack, model, cond, latent, count=12)
    assert base_with != pytest.approx(base_without, rel=1e-6), "the reference must reach the model"
    seen = []
    hook = model.model.diffusion_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("ref_latents") is not None), with_kwargs=True)
    try:
        steps, lr = spec.stage1
        e_opt, loss1 = call(C["ImagicOptimizeEmbedding"], model=model, conditioning=with_ref, latent=latent,
                            steps=steps, learning_rate=lr, seed=0)
        tuned, _, loss2 = call(C["ImagicFinetuneUNet"], model=model, conditioning=e_opt, latent=latent, steps=15,
                               learning_rate=3e-3, seed=0, method="lora", rank=4, gradient_checkpointing=True)
    finally:
        hook.remove()
    assert seen and all(seen), "every training call must carry the reference latents"
    assert "reference_latents" in e_opt[0][1] and e_opt[0][1].get("reference_latents_method") == method
    stage1 = objective(pack, model, e_opt, latent, count=12)
    stage2 = objective(pack, tuned, e_opt, latent, count=12)
    assert stage1 < base_with and stage2 < stage1, (base_with, stage1, stage2)
    assert all(torch.isfinite(torch.tensor(v)) for v in loss1["loss"] + loss2["loss"])
