"""The Imagic core on a tiny random diffusers model: objective, both stages, interpolation, results."""
import math

import numpy as np

import pytest
import torch
from torch.nn.utils import parametrize

from imagic import (ImagicCancelled, ImagicError, ImagicResult, denoising_loss, evaluate_objective, finetune,
                    held_out_pairs, interpolate, load_result, optimize_embedding, run_training)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert set(after) == set(before), "parameters were added or removed"
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"
    assert all(p.grad is None for p in module.parameters()), "a model weight received a gradient"
    assert not parametrize.is_parametrized(module)


@pytest.fixture(scope="module")
def case(pipe, photo):
    img = pipe.load_image(photo, 16)
    x0 = pipe.encode_image(img)
    e_tgt = pipe.encode_text("a photo of a sitting dog")
    den = pipe.denoiser(*img.size)
    pairs = held_out_pairs(den, x0, count=24, seed=7)
    return dict(x0=x0, e_tgt=e_tgt, den=den, pairs=pairs)


@pytest.fixture(scope="module")
def stage1(case):
    e_opt, losses = optimize_embedding(case["den"], case["x0"], case["e_tgt"], steps=60, lr=3e-2, seed=0,
                                       noise_samples=4)
    return e_opt, losses


# ----------------------------------------------------------------------------- objective
class LinearDenoiser:
    """A model whose output we can compute by hand: 0.5 * x_t + mean(context)."""

    noise_scale = 1.0

    def __init__(self, prediction_type):
        self.prediction_type = prediction_type

    def sample_timesteps(self, n, generator):
        return torch.rand(n, generator=generator)

    def alpha_sigma(self, t):
        return torch.cos(t), torch.sin(t)

    def predict(self, x_t, t, cond):
        return 0.5 * x_t + cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "flow"])
def test_objective_matches_hand_computed_loss_on_a_known_model(ptype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 2, 3, 3, generator=g)
    noise = torch.randn(3, 2, 3, 3, generator=g)
    t = torch.tensor([0.1, 0.7, 1.3])
    cond = {"context": torch.full((1, 4, 5), 0.25)}
    den = LinearDenoiser(ptype)
    if ptype == "flow":
        den.alpha_sigma = lambda t: (1 - t, t)
    a, s = den.alpha_sigma(t)
    a, s = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    pred = 0.5 * x_t + 0.25
    target = {"epsilon": noise, "v_prediction": a * noise - s * x0, "flow": noise - x0}[ptype]
    expected = ((pred - target) ** 2).mean()
    assert denoising_loss(den, x0, cond, noise, t).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("which", ["epsilon", "v_prediction"])
def test_objective_on_the_real_unet_is_the_models_own_loss(which, pipe, tiny_vpred_dir):
    from imagic.pipeline import ImagicPipeline

    p = pipe if which == "epsilon" else ImagicPipeline.from_pretrained(tiny_vpred_dir, device="cpu")
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 900])
    cond = p.encode_text("a red car")
    den = p.denoiser(16, 16)
    assert den.prediction_type == which
    ac = p.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    with torch.no_grad():
        out = p.unet(x_t, t, encoder_hidden_states=cond["context"].expand(2, -1, -1)).sample
        target = noise if which == "epsilon" else ac.sqrt() * noise - (1 - ac).sqrt() * x0
        expected = ((out - target) ** 2).mean().item()
        got = denoising_loss(den, x0, cond, noise, t).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_flow_objective_on_the_real_unet_is_the_velocity_loss_at_shifted_uniform_t(tiny_flow_dir):
    """A FlowMatch folder trains on x_t = (1 - t) x0 + t noise, target noise - x0, the UNet reading
    1000 t, with t drawn uniformly and then shifted as the scheduler's shift says."""
    from imagic.pipeline import ImagicPipeline

    p = ImagicPipeline.from_pretrained(tiny_flow_dir, device="cpu")
    den = p.denoiser(16, 16)
    assert den.prediction_type == "flow"
    u = torch.rand(4000, generator=torch.Generator().manual_seed(5))
    t = den.sample_timesteps(4000, torch.Generator().manual_seed(5))
    assert torch.allclose(t, 3 * u / (1 + 2 * u))  # shift 3
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.1, 0.8])
    cond = p.encode_text("a red car")
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    with torch.no_grad():
        out = p.unet(x_t, t * 1000, encoder_hidden_states=cond["context"].expand(2, -1, -1)).sample
        expected = ((out - (noise - x0)) ** 2).mean().item()
        got = denoising_loss(den, x0, cond, noise, t).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_flow_folder_runs_both_stages_and_samples_with_exact_eta_endpoints(tiny_flow_dir, photo):
    from imagic.pipeline import ImagicPipeline

    p = ImagicPipeline.from_pretrained(tiny_flow_dir, device="cpu")
    before = snapshot(p.unet)
    img = p.load_image(photo, 16)
    x0, e_tgt, den = p.encode_image(img), p.encode_text("a photo of a sitting dog"), p.denoiser(*img.size)
    pairs = held_out_pairs(den, x0, count=24, seed=7)
    start = evaluate_objective(den, x0, e_tgt, pairs)
    e_opt, _ = optimize_embedding(den, x0, e_tgt, steps=40, lr=3e-2, seed=0, noise_samples=4)
    mid = evaluate_objective(den, x0, e_opt, pairs)
    delta, _ = finetune(den, x0, e_opt, steps=30, lr=3e-3, seed=0, noise_samples=4)
    with den.attach(delta):
        end = evaluate_objective(den, x0, e_opt, pairs)
    assert mid < start and end < 0.9 * mid, (start, mid, end)
    assert_unchanged(p.unet, before)
    result = ImagicResult(e_tgt=e_tgt, e_opt=e_opt, delta=delta,
                          settings=dict(width=img.size[0], height=img.size[1]))
    a = p.sample(result, [0.0, 1.0], steps=4)
    b = p.sample(ImagicResult(e_tgt=e_opt, e_opt=e_opt, delta=delta, settings=result.settings), [0.0], steps=4)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])), "eta 0 samples e_opt exactly"
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    sdedit = p.sample(result, [1.0], steps=4, init_image=img, strength=0.25)[0]
    assert sdedit.size == img.size


# ----------------------------------------------------------------------------- stages
def test_stage1_lowers_held_out_objective_and_leaves_model_untouched(pipe, case):
    before = snapshot(pipe.unet)
    e_opt, losses = optimize_embedding(case["den"], case["x0"], case["e_tgt"], steps=60, lr=3e-2, seed=0,
                                       noise_samples=4)
    base = evaluate_objective(case["den"], case["x0"], case["e_tgt"], case["pairs"])
    fitted = evaluate_objective(case["den"], case["x0"], e_opt, case["pairs"])
    assert fitted < base * 0.99, (base, fitted)
    assert len(losses) == 60
    assert_unchanged(pipe.unet, before)
    assert not torch.equal(e_opt["context"], case["e_tgt"]["context"])


@pytest.mark.parametrize("method,lr", [("lora", 1e-2), ("full", 1e-3)])
@pytest.mark.filterwarnings("ignore::imagic.errors.ImagicWarning")  # a tiny random model needs a large rate
def test_stage2_lowers_objective_further_and_never_mutates_the_model(pipe, case, stage1, method, lr):
    e_opt, _ = stage1
    before = snapshot(pipe.unet)
    stage1_value = evaluate_objective(case["den"], case["x0"], e_opt, case["pairs"])
    delta, losses = finetune(case["den"], case["x0"], e_opt, steps=25, lr=lr, method=method, seed=0,
                             noise_samples=4)
    assert_unchanged(pipe.unet, before)
    with case["den"].attach(delta):
        tuned = evaluate_objective(case["den"], case["x0"], e_opt, case["pairs"])
    assert tuned < 0.8 * stage1_value, (stage1_value, tuned)
    assert_unchanged(pipe.unet, before)
    assert delta.method == method and len(losses) == 25


def test_lora_side_branch_is_the_merged_weight_function_with_gradients_only_on_the_lora(pipe, case, stage1):
    """The diffusers adapter runs LoRA beside each layer (less memory); it must equal weight + up @ down."""
    from imagic.deltas import make_delta

    e_opt, _ = stage1
    delta = make_delta("lora", pipe.unet, 4, seed=1)
    with torch.no_grad():
        for up in delta.up:  # up starts at zero; make the delta matter
            up.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    den = case["den"]
    noise, t = case["pairs"]
    x_t = case["x0"] + noise[:4]
    before = snapshot(pipe.unet)
    outs = {}
    for side in (True, False):
        den.lora_side_branch = side
        try:
            with den.attach(delta):
                out = den.predict(x_t, t[:4], {k: v.expand(4, *v.shape[1:]) for k, v in e_opt.items()})
                out.square().mean().backward()
        finally:
            den.lora_side_branch = True
        outs[side] = (out.detach(), [p.grad.clone() for p in delta.parameters()])
        delta.zero_grad(set_to_none=True)
    with torch.no_grad(), den.attach(None):
        plain = den.predict(x_t, t[:4], {k: v.expand(4, *v.shape[1:]) for k, v in e_opt.items()})
    assert not torch.allclose(outs[True][0], plain, atol=1e-4), "the LoRA must change the output"
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=1e-4, atol=1e-5)
    for g_side, g_merged in zip(outs[True][1], outs[False][1]):
        torch.testing.assert_close(g_side, g_merged, rtol=1e-3, atol=1e-6)
    assert_unchanged(pipe.unet, before)


def test_full_finetune_trains_a_copy_and_hands_back_the_exact_difference(pipe, case, stage1):
    """Full fine-tuning trains W' (no weight + difference formed per step) and returns D = W' - W,
    with which the model computes exactly what it computed with W' during training."""
    from imagic.deltas import FullDelta, applied, make_delta

    e_opt, _ = stage1
    den = case["den"]
    before = snapshot(pipe.unet)
    delta = make_delta("full", pipe.unet, 4, seed=0)
    assert delta.training_form
    with torch.no_grad():
        for w in delta.parameters():
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 1e-3)
    noise, t = case["pairs"]
    x_t, cond = case["x0"] + noise[:2], {k: v.expand(2, *v.shape[1:]) for k, v in e_opt.items()}
    with torch.no_grad(), applied(delta, pipe.unet):
        trained = den.predict(x_t, t[:2], cond)
    trained_weights = [w.clone() for w in delta.parameters()]
    delta.finish()
    assert not delta.training_form and isinstance(delta, FullDelta)
    params = dict(pipe.unet.named_parameters())
    for name, w in zip(sorted(delta.names()), trained_weights):
        assert torch.equal(delta.delta(name), w - params[name])
    with torch.no_grad(), applied(delta, pipe.unet):
        again = den.predict(x_t, t[:2], cond)
    torch.testing.assert_close(again, trained, rtol=1e-5, atol=1e-6)
    assert_unchanged(pipe.unet, before)


def test_full_finetune_offloads_the_base_while_training_and_gives_the_same_difference(pipe, case, stage1,
                                                                                   tmp_path, monkeypatch):
    """With the base offloaded, the UNet's own weights live in a mapped temporary file during training
    (their memory is freed), the difference is bit for bit the one trained without offloading, and the
    weights are back in ordinary memory, unchanged, with the file gone."""
    import tempfile

    from imagic.deltas import FullDelta

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    e_opt, den = stage1[0], case["den"]
    before = snapshot(pipe.unet)
    params = list(pipe.unet.parameters())
    ptrs = [p.data_ptr() for p in params]
    seen = {}

    def watch(step, delta):
        if step == 1:
            seen["files"] = sorted(f.name for f in tmp_path.iterdir())
            seen["moved"] = sum(p.data_ptr() != ptr for p, ptr in zip(params, ptrs))

    def run(offload):
        den.offload_base = offload
        try:
            return finetune(den, case["x0"], e_opt, steps=3, lr=1e-4, method="full", seed=0,
                            watch=watch if offload else None)[0]
        finally:
            den.offload_base = True

    plain, offloaded = run(False), run(True)
    assert isinstance(offloaded, FullDelta)
    assert len(seen["files"]) == 1 and seen["files"][0].startswith("imagic_base_"), seen
    assert seen["moved"] == len(ptrs), "every trained weight must leave its memory while training"
    assert list(tmp_path.iterdir()) == [], "the temporary file is deleted"
    a, b = plain.to_state_dict(), offloaded.to_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_unchanged(pipe.unet, before)


def test_cancelled_full_finetune_puts_the_offloaded_base_back(pipe, case, stage1, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = snapshot(pipe.unet)
    calls = []
    with pytest.raises(ImagicCancelled):
        finetune(case["den"], case["x0"], stage1[0], steps=10, lr=1e-4, method="full",
                 cancel=lambda: calls.append(1) or len(calls) > 2)
    assert_unchanged(pipe.unet, before)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_offloading_is_a_clear_error_and_changes_nothing(pipe, case, stage1, monkeypatch):
    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    before = snapshot(pipe.unet)
    with pytest.raises(ImagicError, match="could not write the base weights .* free disk space"):
        finetune(case["den"], case["x0"], stage1[0], steps=2, lr=1e-4, method="full")
    assert_unchanged(pipe.unet, before)


def test_flow_objective_with_scaled_training_noise_is_the_velocity_of_the_scaled_noise():
    """x_t = (1 - t) x0 + t * (s * noise), target s * noise - x0 (ComfyUI's CONST noise_scale), by hand."""
    from imagic.objective import denoising_loss

    class Flow:
        prediction_type, noise_scale = "flow", 8.0

        def alpha_sigma(self, t):
            return 1 - t, t

        def predict(self, x_t, t, cond):
            self.seen = x_t
            return cond["context"].reshape(x_t.shape)

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 2, 3, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    t = torch.tensor([0.25, 0.75])
    pred = torch.randn(1, 2 * 3 * 3, generator=g)  # one prediction, shared by the 2 noise samples
    den = Flow()
    loss = denoising_loss(den, x0, {"context": pred}, noise, t)
    tt = t.reshape(2, 1, 1, 1)
    assert torch.allclose(den.seen, (1 - tt) * x0 + tt * (8.0 * noise))
    want = ((pred.expand(2, -1).reshape(2, 2, 3, 3) - (8.0 * noise - x0)) ** 2).mean()
    assert torch.allclose(loss, want)


def test_stepping_in_backward_is_the_same_adam():
    """run_training's step_in_backward (each tensor steps as its gradient completes, gradients freed)
    gives the same parameters as one Adam step over all tensors after backward."""
    from imagic import run_training

    def train(step_in_backward):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
        losses = run_training(net.parameters(), lambda: net(x).square().mean(), 7, 1e-2, "test",
                              adam="plain", step_in_backward=step_in_backward)
        return losses, [p.detach().clone() for p in net.parameters()], [p.grad for p in net.parameters()]

    losses_a, params_a, _ = train(False)
    losses_b, params_b, grads_b = train(True)
    assert losses_a == losses_b and losses_a[-1] < losses_a[0]
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert all(g is None for g in grads_b), "stepping in backward frees every gradient"


def test_zero_steps_skip_a_stage_and_negative_steps_are_an_error(case):
    e_opt, losses = optimize_embedding(case["den"], case["x0"], case["e_tgt"], steps=0, lr=1e-3)
    assert losses == [] and torch.equal(e_opt["context"], case["e_tgt"]["context"])
    delta, losses = finetune(case["den"], case["x0"], e_opt, steps=0, lr=1e-3)
    assert delta is None and losses == []
    with pytest.raises(ImagicError, match="0 \\(skip this stage\\) or more"):
        optimize_embedding(case["den"], case["x0"], case["e_tgt"], steps=-1, lr=1e-3)
    with pytest.raises(ImagicError, match="fine-tune steps"):
        finetune(case["den"], case["x0"], e_opt, steps=-5, lr=1e-3)


def test_same_seed_gives_identical_e_opt_and_lora(case):
    def run(seed):
        e_opt, _ = optimize_embedding(case["den"], case["x0"], case["e_tgt"], steps=5, lr=1e-2, seed=seed)
        delta, _ = finetune(case["den"], case["x0"], e_opt, steps=5, lr=1e-2, seed=seed)
        return e_opt, delta.to_state_dict()

    (e1, d1), (e2, d2), (e3, _) = run(3), run(3), run(4)
    assert torch.equal(e1["context"], e2["context"])
    assert d1.keys() == d2.keys() and all(torch.equal(d1[k], d2[k]) for k in d1)
    assert not torch.equal(e1["context"], e3["context"])


def test_cancel_stops_training_and_leaves_the_model_as_it_was(pipe, case, stage1):
    before = snapshot(pipe.unet)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(ImagicCancelled, match="at step 3"):
        finetune(case["den"], case["x0"], stage1[0], steps=50, lr=1e-2, cancel=cancel)
    assert_unchanged(pipe.unet, before)


def test_non_finite_loss_stops_with_advice_to_lower_the_learning_rate():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ImagicError, match="Lower the learning rate"):
        run_training([p], lambda: (p * float("nan")).sum(), steps=3, lr=1.0, stage="test")
    assert torch.equal(p.detach(), torch.zeros(2)), "a NaN step must not reach the parameters"


def test_bad_latent_and_conditioning_get_clear_errors(case):
    den, x0, e = case["den"], case["x0"], case["e_tgt"]
    with pytest.raises(ImagicError, match="batch of 2 images"):
        optimize_embedding(den, x0.repeat(2, 1, 1, 1), e, steps=1, lr=1e-3)
    with pytest.raises(ImagicError, match="NaN"):
        optimize_embedding(den, x0, {"context": e["context"] * float("nan")}, steps=1, lr=1e-3)
    with pytest.raises(ImagicError, match="empty"):
        optimize_embedding(den, x0, {}, steps=1, lr=1e-3)


# ----------------------------------------------------------------------------- interpolation
def test_interpolate_endpoints_are_exact_and_midpoint_is_linear():
    g = torch.Generator().manual_seed(0)
    e_tgt = {"context": torch.randn(1, 4, 8, generator=g), "pooled": torch.randn(1, 8, generator=g)}
    e_opt = {k: v + torch.randn(v.shape, generator=g) for k, v in e_tgt.items()}
    for k in e_tgt:
        assert torch.equal(interpolate(e_tgt, e_opt, 0.0)[k], e_opt[k])
        assert torch.equal(interpolate(e_tgt, e_opt, 1)[k], e_tgt[k])
        assert torch.allclose(interpolate(e_tgt, e_opt, 0.5)[k], (e_tgt[k] + e_opt[k]) / 2, atol=1e-6)
        assert torch.allclose(interpolate(e_tgt, e_opt, 2.0)[k], 2 * e_tgt[k] - e_opt[k], atol=1e-5)
    assert torch.equal(interpolate(e_tgt["pooled"], e_opt["pooled"], 0), e_opt["pooled"])


def test_interpolate_rejects_mismatched_shapes_and_non_numbers():
    with pytest.raises(ImagicError, match=r"shape \(1, 77, 768\).*\(1, 154, 768\)"):
        interpolate({"context": torch.zeros(1, 77, 768)}, {"context": torch.zeros(1, 154, 768)}, 0.5)
    with pytest.raises(ImagicError, match="different parts"):
        interpolate({"context": torch.zeros(1, 2, 3)}, {"context": torch.zeros(1, 2, 3), "pooled": torch.zeros(1, 3)}, 0.5)
    with pytest.raises(ImagicError, match="eta must be a number"):
        interpolate(torch.zeros(1), torch.zeros(1), "high")
    with pytest.raises(ImagicError, match="finite"):
        interpolate(torch.zeros(1), torch.zeros(1), math.nan)


# ----------------------------------------------------------------------------- results
def test_save_load_and_resample_reproduce_the_same_image(pipe, photo, tmp_path):
    result = pipe.train(photo, "a photo of a sitting dog", embedding_steps=5, finetune_steps=5, size=16,
                        lr_finetune=1e-2)
    first = pipe.sample(result, [0.0, 0.7], seed=5, steps=4)
    path = result.save(tmp_path / "r.safetensors")
    loaded = load_result(path)
    assert loaded.settings["target_text"] == "a photo of a sitting dog"
    assert loaded.delta.to_state_dict().keys() == result.delta.to_state_dict().keys()
    again = pipe.sample(loaded, [0.0, 0.7], seed=5, steps=4)
    import numpy as np

    for a, b in zip(first, again):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1])), "eta should change the image"


def test_loading_a_broken_or_foreign_file_says_what_is_wrong(tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ImagicError, match="not a readable safetensors file"):
        load_result(junk)
    foreign = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(1)}, foreign)
    with pytest.raises(ImagicError, match="not an Imagic result"):
        load_result(foreign)
    with pytest.raises(ImagicError, match="not found"):
        load_result(tmp_path / "missing.safetensors")


def test_result_from_another_model_family_is_refused(pipe):
    wide = {"context": torch.zeros(1, 16, 2048)}
    with pytest.raises(ImagicError, match="another model family"):
        pipe.sample(ImagicResult(e_tgt=wide, e_opt=wide, settings={"width": 16, "height": 16}), [0.5], steps=1)


def test_sdxl_folder_trains_the_pooled_vector_and_samples_at_the_photos_aspect(tmp_path, photo):
    from tiny_models import save_tiny_sd

    from imagic.pipeline import ImagicPipeline

    p = ImagicPipeline.from_pretrained(save_tiny_sd(tmp_path / "xl", sdxl=True, seed=2), device="cpu")
    assert p.is_sdxl
    result = p.train(photo, "a photo of a red car", embedding_steps=4, finetune_steps=2, lr_embedding=5e-2, size=16)
    assert set(result.e_opt) == {"context", "pooled"}
    assert not torch.equal(result.e_opt["pooled"], result.e_tgt["pooled"]), "SDXL's pooled vector must be optimized"
    (image,) = p.sample(result, [0.7], steps=2)
    assert image.size == (16, 8)
