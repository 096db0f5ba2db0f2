"""Stage 3's fast paths (``ImagicPipeline.sample``): the same images as the plain way of computing them,
the base model and the result's delta bit for bit as they were afterwards (also after an error), and
the empty prompt encoded once."""
import copy

import numpy as np
import pytest
import torch

from imagic import ImagicPipeline, ImagicResult
from imagic.deltas import FullDelta, applied, delta_from_state_dict, make_delta

SIZE, STEPS = 16, 3


def bits(t):
    """Bit patterns, so -0.0 and 0.0 (equal as numbers) count as different."""
    return t.detach().contiguous().view(torch.int32)


def bit_snapshot(tensors):
    return [bits(t).clone() for t in tensors]


def assert_bit_equal(tensors, before, what):
    for i, (t, b) in enumerate(zip(tensors, before)):
        assert torch.equal(bits(t), b), f"{what}: tensor {i} changed"


def fresh_pipe(pipe, unet=None):
    """A new pipeline on the session pipeline's parts (its own caches)."""
    return ImagicPipeline(unet or pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, vae=pipe.vae)


@pytest.fixture(scope="module")
def embeddings(pipe):
    e_tgt = pipe.encode_text("a photo of a sitting dog")
    g = torch.Generator().manual_seed(0)
    return e_tgt, {"context": e_tgt["context"] + 0.3 * torch.randn(e_tgt["context"].shape, generator=g)}


def lora_delta(unet, seed=1):
    delta = make_delta("lora", unet, 4, seed=seed)
    with torch.no_grad():
        for up in delta.up:  # up starts at zero: make the delta matter
            up.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed + 1))
    return delta.finish().requires_grad_(False)


def full_delta(unet):
    """A difference as stage 2 hands it back (W' - W), with two elements planted where (W + D) - W does
    not give D back bit for bit: half an ulp of W (the sum is a tie, rounded to even) and -0.0
    (W + -0.0 - W is +0.0). Returns the delta and the planted tensor's name."""
    delta = make_delta("full", unet, 4, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in delta.tensors:
            t.add_(torch.randn(t.shape, generator=g), alpha=0.02)
    delta.finish().requires_grad_(False)
    params = dict(unet.named_parameters())
    name = next(n for n in delta.names() if n.endswith(".weight") and params[n].numel() > 8)
    w, d = params[name].detach().view(-1), delta.tensors[delta._index[name]].detach().view(-1)
    with torch.no_grad():
        d[0] = (torch.nextafter(w[0], torch.tensor(float("inf"))) - w[0]) / 2
        d[1] = -0.0
    return delta, name


def differences(delta):
    """A full delta's D = W' - W per tensor, whichever form it is in."""
    return [delta.delta(n) for n in sorted(delta.names(), key=delta._index.get)]


def reference_images(pipe, result, delta_as_weights):
    """The image of the plain way: a copy of the UNet whose weights hold W + D, sampled without a delta."""
    unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name in delta_as_weights:
                p.copy_(p + delta_as_weights[name].to(p.dtype))
    plain = ImagicResult(e_tgt=result.e_tgt, e_opt=result.e_opt, delta=None, settings=result.settings)
    return fresh_pipe(pipe, unet).sample(plain, [0.3, 0.8], seed=4, steps=STEPS)


def test_full_difference_samples_the_merged_weights_bit_for_bit_and_leaves_base_and_delta_as_they_were(
        pipe, embeddings):
    delta, planted = full_delta(pipe.unet)
    params = dict(pipe.unet.named_parameters())
    w = params[planted].detach().view(-1)
    d = delta.tensors[delta._index[planted]].detach().view(-1)
    way_back = (w[:2] + d[:2]) - w[:2]
    assert not torch.equal(bits(way_back), bits(d[:2])), "the planted elements' way back must be lossy"
    result = ImagicResult(*embeddings, delta=delta, settings=dict(width=SIZE, height=SIZE, method="full"))
    base, diff = bit_snapshot(pipe.unet.parameters()), bit_snapshot(delta.tensors)
    reference = reference_images(pipe, result, {n: delta.delta(n) for n in delta.names()})
    images = pipe.sample(result, [0.3, 0.8], seed=4, steps=STEPS)
    assert_bit_equal(pipe.unet.parameters(), base, "base model")
    for a, b in zip(images, reference):
        assert np.array_equal(np.asarray(a), np.asarray(b)), "W + D held in place must be the merged weights"
    # Bound at the first call (W + D written over D): later calls add nothing and write nothing.
    assert delta.bound_to(pipe.unet)
    assert_bit_equal(differences(delta), diff, "the difference read from the bound delta")
    assert_bit_equal(list(delta.to_state_dict().values()), diff, "the difference saved from the bound delta")
    held = bit_snapshot(delta.tensors)
    again = pipe.sample(result, [0.3, 0.8], seed=4, steps=STEPS)
    assert_bit_equal(delta.tensors, held, "the bound delta at a second call")
    assert_bit_equal(pipe.unet.parameters(), base, "base model after a second call")
    for a, b in zip(again, images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    delta.finish()
    assert not delta.training_form
    assert_bit_equal(delta.tensors, diff, "full difference after finish()")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_an_error_mid_sampling_leaves_base_and_delta_bit_for_bit(pipe, embeddings, method):
    delta = lora_delta(pipe.unet) if method == "lora" else full_delta(pipe.unet)[0]
    result = ImagicResult(*embeddings, delta=delta, settings=dict(width=SIZE, height=SIZE, method=method))
    # (a full difference stays bound to the UNet after its first call: what must not change is D itself)
    values = (lambda: list(delta.parameters())) if method == "lora" else (lambda: differences(delta))
    base, own = bit_snapshot(pipe.unet.parameters()), bit_snapshot(values())

    def progress(step, total, loss):
        if step == 2:
            raise KeyboardInterrupt("stopped mid-sampling")

    with pytest.raises(KeyboardInterrupt):
        pipe.sample(result, [0.7], steps=STEPS, progress=progress)
    assert_bit_equal(pipe.unet.parameters(), base, "base model")
    assert_bit_equal(values(), own, f"{method} delta")
    assert not torch.nn.utils.parametrize.is_parametrized(pipe.unet)
    assert not any(m._forward_hooks for m in pipe.unet.modules()), "a LoRA hook was left behind"
    pipe.sample(result, [0.7], steps=1)  # and it still samples
    assert_bit_equal(values(), own, f"{method} delta after sampling again")


def test_an_error_while_adding_the_difference_in_takes_it_out_again(pipe, monkeypatch):
    """Interrupted half-way through the tensors (and inside one), the delta is put back as it was."""
    import imagic.deltas as deltas

    delta, _ = full_delta(pipe.unet)
    own = bit_snapshot(delta.tensors)
    monkeypatch.setattr(deltas, "_CHUNK", 64)  # several chunks per tensor
    calls = {"n": 0}
    real_bits = deltas._bits

    def failing_bits(t):
        calls["n"] += 1
        if calls["n"] == 41:
            raise RuntimeError("out of memory, say")
        return real_bits(t)

    monkeypatch.setattr(deltas, "_bits", failing_bits)
    with pytest.raises(RuntimeError, match="out of memory"):
        with applied(delta, pipe.unet, inference=True):
            pass
    assert_bit_equal(delta.tensors, own, "full difference")
    assert not torch.nn.utils.parametrize.is_parametrized(pipe.unet)


def test_lora_added_in_place_at_sampling_is_the_side_branch_of_training(pipe):
    """Without autograd the up projection is accumulated into the layer's output (one matrix product);
    it must compute what the side branch computes with autograd (``out + scale * up(down(x))``), in
    NCHW, channels_last and inference mode. Tolerance: the same products summed by the same BLAS
    call; at most the last bits of a float differ (measured: equal on this model)."""
    delta = lora_delta(pipe.unet)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 16, pipe.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([300, 700])
    with applied(delta, pipe.unet):
        with torch.enable_grad():
            trained_way = pipe.unet(x, t, ctx).sample.detach()
        with torch.no_grad():
            fast = pipe.unet(x, t, ctx).sample
            fast_cl = pipe.unet(x.contiguous(memory_format=torch.channels_last), t, ctx).sample
        with torch.inference_mode():
            fast_inf = pipe.unet(x, t, ctx).sample.clone()
    with torch.no_grad():
        plain = pipe.unet(x, t, ctx).sample
    assert not torch.allclose(trained_way, plain, atol=1e-3), "the LoRA must change the output"
    for out in (fast, fast_cl, fast_inf):
        torch.testing.assert_close(out, trained_way, rtol=1e-5, atol=1e-6)


def test_lora_sample_equals_sampling_its_merged_weights(pipe, embeddings):
    """The whole sampling call with the LoRA as an in-place side branch against the same LoRA written
    into a copy of the weights (W + scale * up @ down): images within one level of 255 (the two sum the
    same terms in another order; the rounding of a pixel can fall either way)."""
    delta = lora_delta(pipe.unet)
    result = ImagicResult(*embeddings, delta=delta, settings=dict(width=SIZE, height=SIZE, method="lora"))
    images = pipe.sample(result, [0.3, 0.8], seed=4, steps=STEPS)
    reference = reference_images(pipe, result, {n: delta.delta(n) for n in delta.names()})
    plain = fresh_pipe(pipe).sample(ImagicResult(*embeddings, settings=result.settings), [0.3, 0.8], seed=4,
                                    steps=STEPS)
    for a, b, c in zip(images, reference, plain):
        a, b, c = (np.asarray(v, dtype=np.int16) for v in (a, b, c))
        assert np.abs(a - b).max() <= 1
        assert np.abs(a - c).max() > 1, "the LoRA must change the image"


def test_the_empty_prompt_is_encoded_once(pipe, embeddings):
    fresh = fresh_pipe(pipe)
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        result = ImagicResult(*embeddings, delta=None, settings=dict(width=SIZE, height=SIZE))
        fresh.sample(result, [0.7], steps=1)
        assert len(calls) == 1, "the first call encodes the empty prompt once (it was twice)"
        fresh.sample(result, [0.7], steps=1)
        assert len(calls) == 1, "a second call reuses it"
        p = next(pipe.text_encoder.parameters())
        with torch.no_grad():
            p.mul_(1.0)  # an in-place write: the cached embedding may be stale
        fresh.sample(result, [0.7], steps=1)
        assert len(calls) == 2, "a text encoder written in place is encoded again"
    finally:
        hook.remove()
    torch.testing.assert_close(fresh.empty_text()["context"], pipe.encode_text("")["context"], rtol=0, atol=0)


def test_a_loaded_full_difference_samples_like_the_trained_one(pipe, embeddings, tmp_path):
    """The in-place merge also serves a difference read back from a file (its own tensors)."""
    delta, _ = full_delta(pipe.unet)
    loaded = delta_from_state_dict(delta.to_state_dict())
    assert isinstance(loaded, FullDelta)
    settings = dict(width=SIZE, height=SIZE, method="full")
    a = pipe.sample(ImagicResult(*embeddings, delta=delta, settings=settings), [0.7], seed=1, steps=2)
    b = pipe.sample(ImagicResult(*embeddings, delta=loaded, settings=settings), [0.7], seed=1, steps=2)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_a_difference_of_no_two_float_tensors_falls_back_to_a_merged_copy(pipe, embeddings, monkeypatch):
    """A D that is not W' - W of two float tensors: (W + D) - W misses it in most elements, so
    ``merged_in_place`` gives those tensors a merged copy; same images, the delta unchanged."""
    shapes = {n: p.shape for n, p in pipe.unet.named_parameters() if n.endswith((".weight", ".bias"))}
    delta = FullDelta(shapes)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for t in delta.tensors:
            t.copy_(torch.randn(t.shape, generator=g) * 0.01)
    delta.requires_grad_(False)
    result = ImagicResult(*embeddings, delta=delta, settings=dict(width=SIZE, height=SIZE, method="full"))
    own = bit_snapshot(delta.tensors)
    reference = reference_images(pipe, result, {n: delta.delta(n) for n in delta.names()})
    import imagic.deltas as deltas

    adds = []
    real_add = deltas._add_keeping_the_way_back
    monkeypatch.setattr(deltas, "_add_keeping_the_way_back", lambda d, w: adds.append(1) or real_add(d, w))
    images = pipe.sample(result, [0.3, 0.8], seed=4, steps=STEPS)
    assert not delta.training_form, "such a D cannot be bound (its way back would take more than a copy)"
    assert_bit_equal(delta.tensors, own, "full difference")
    for a, b in zip(images, reference):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    first = len(adds)
    again = pipe.sample(result, [0.3, 0.8], seed=4, steps=STEPS)
    assert len(adds) - first < first, "a second call must not try to bind it again"
    assert_bit_equal(delta.tensors, own, "full difference after a second call")
    for a, b in zip(again, images):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_bound_difference_sampled_on_another_network_is_its_difference_again(pipe, embeddings):
    """Bound to one UNet at its first call, a difference read back from a file comes back bit for bit as
    D for another UNet (half-ulp ties and -0.0 included), which then gets its own weights + D."""
    delta, _ = full_delta(pipe.unet)
    diff = bit_snapshot(delta.tensors)
    result = ImagicResult(*embeddings, delta=delta, settings=dict(width=SIZE, height=SIZE, method="full"))
    pipe.sample(result, [0.7], seed=1, steps=1)
    assert delta.bound_to(pipe.unet)
    other = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for q in other.parameters():
            q.add_(0.5)
    reference = reference_images(fresh_pipe(pipe, other), result, {n: delta.delta(n) for n in delta.names()})
    images = fresh_pipe(pipe, other).sample(result, [0.3, 0.8], seed=4, steps=STEPS)
    assert not delta.bound_to(pipe.unet)  # (nor to ``other``: W + 0.5 + D does not lead back to this D)
    for a, b in zip(images, reference):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    delta.finish()
    assert_bit_equal(delta.tensors, diff, "full difference after two bindings")


def test_a_full_fine_tune_from_train_samples_its_trained_weights_as_they_are(pipe, photo, tmp_path):
    """``train`` hands a full fine-tune back as the trained weights W' bound to its UNet: sampling reads
    W' itself (nothing added per call), which is exactly a copy of the UNet holding W'; the base and W'
    are bit for bit as they were; saved, it is the difference W' - W, and read back it samples the same
    image up to rounding (W + (W' - W) need not be W')."""
    from imagic.results import load_result, save_result

    base = bit_snapshot(pipe.unet.parameters())
    result = pipe.train(photo, "a photo of a sitting dog", embedding_steps=2, finetune_steps=3, lr_finetune=1e-3,
                        method="full", size=SIZE, warn=lambda message: None)
    delta = result.delta
    assert isinstance(delta, FullDelta) and delta.bound_to(pipe.unet)
    assert_bit_equal(pipe.unet.parameters(), base, "base model after training")
    trained = bit_snapshot(delta.tensors)
    peer = copy.deepcopy(pipe.unet)  # the peer's way: the fine-tune written into the weights
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if name in delta.names():
                p.copy_(delta.weight(name))
    plain = dict(e_tgt=result.e_tgt, e_opt=result.e_opt, delta=None, settings=result.settings)
    reference = fresh_pipe(pipe, peer).sample(ImagicResult(**plain), [0.3, 0.8], seed=4, steps=STEPS)
    storage = [p.data_ptr() for p in pipe.unet.parameters()]
    images = pipe.sample(result, [0.3, 0.8], seed=4, steps=STEPS)
    assert storage == [p.data_ptr() for p in pipe.unet.parameters()], \
        "sampling must not move the base out and back (parking is for training; it costs a copy per call)"
    untuned = fresh_pipe(pipe).sample(ImagicResult(**plain), [0.3, 0.8], seed=4, steps=STEPS)
    assert_bit_equal(pipe.unet.parameters(), base, "base model after sampling")
    assert_bit_equal(delta.tensors, trained, "trained weights")
    assert delta.bound_to(pipe.unet)
    for a, b, c in zip(images, reference, untuned):
        assert np.array_equal(np.asarray(a), np.asarray(b)), "sampling must compute with W' itself"
        assert not np.array_equal(np.asarray(a), np.asarray(c)), "the fine-tune must change the image"
    params = dict(pipe.unet.named_parameters())
    path = save_result(result, tmp_path / "full.safetensors")
    loaded = load_result(path)
    assert not loaded.delta.training_form
    for name in delta.names():
        assert torch.equal(loaded.delta.delta(name), delta.weight(name) - params[name])
    again = pipe.sample(loaded, [0.3, 0.8], seed=4, steps=STEPS)
    for a, b in zip(images, again):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_trained_weights_applied_to_another_network_become_the_difference(pipe, embeddings):
    """W' replaces the weights only of the network it was trained on; another network (here a copy with
    other weights) gets its own weights + (W' - W), never W' in place of them."""
    delta = make_delta("full", pipe.unet, 4, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in delta.tensors:
            t.add_(torch.randn(t.shape, generator=g), alpha=0.02)
    delta.requires_grad_(False)
    params = dict(pipe.unet.named_parameters())
    expected = {n: (delta.weight(n) - params[n]).clone() for n in delta.names()}
    other = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    assert not delta.bound_to(other)
    result = ImagicResult(*embeddings, delta=delta, settings=dict(width=SIZE, height=SIZE, method="full"))
    images = fresh_pipe(pipe, other).sample(result, [0.3, 0.8], seed=4, steps=STEPS)
    assert not delta.training_form
    for n in delta.names():
        assert torch.equal(delta.delta(n), expected[n])
    for a, b in zip(images, reference_images(fresh_pipe(pipe, other), result, expected)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("channels,height,width,kernel", [(8, 5, 7, 3), (6, 1, 1, 3), (5, 2, 9, 5), (7, 4, 6, 3)])
def test_a_locon_down_projection_by_shifts_is_the_convolution(channels, height, width, kernel):
    """Sampling computes a LoCon's few-channel down convolution as one matrix product and shifted sums:
    the same values as conv2d with "same" zero padding (float64: only the order of the sum differs),
    including images smaller than the kernel and non-square ones."""
    import torch.nn.functional as F

    from imagic.deltas import _conv_down_by_shifts, _down_by_shifts

    g = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, height, width, generator=g, dtype=torch.float64)
    down = torch.randn(3, channels, kernel, kernel, generator=g, dtype=torch.float64)
    conv = torch.nn.Conv2d(channels, 4, kernel, padding=kernel // 2)
    assert _down_by_shifts(conv, x, grad=False) and not _down_by_shifts(conv, x, grad=True)
    torch.testing.assert_close(_conv_down_by_shifts(x, down), F.conv2d(x, down, padding=kernel // 2),
                               rtol=1e-12, atol=1e-12)
    strided = torch.nn.Conv2d(channels, 4, kernel, stride=2, padding=kernel // 2)
    assert not _down_by_shifts(strided, x, grad=False), "a strided convolution keeps conv2d"


def test_lora_layers_small_beside_their_activations_are_merged_for_the_call(pipe, embeddings):
    """Sampling merges a LoRA layer once where that costs less than its side branch over the call's steps
    (the merge reads the base weight, never writes it): during a 3-step call some layers, not all, hold a
    merged weight after the first step; afterwards none does, no hook is left, the base is bit for bit as it
    was, and the images are those of the weights merged everywhere, within one level of 255."""
    from torch.nn.utils import parametrize

    delta = lora_delta(pipe.unet)
    result = ImagicResult(*embeddings, delta=delta, settings=dict(width=SIZE, height=SIZE, method="lora"))
    base = bit_snapshot(pipe.unet.parameters())
    layers = [pipe.unet.get_submodule(n.rsplit(".", 1)[0]) for n in delta.names()]
    merged_during = []

    def progress(step, total, loss):
        merged_during.append(sum(parametrize.is_parametrized(m) for m in layers))

    images = pipe.sample(result, [0.3, 0.8], seed=4, steps=STEPS, progress=progress)
    assert 0 < merged_during[0] < len(layers), merged_during
    assert not any(parametrize.is_parametrized(m) for m in layers)
    assert not any(m._forward_hooks for m in pipe.unet.modules())
    assert_bit_equal(pipe.unet.parameters(), base, "base model")
    reference = reference_images(pipe, result, {n: delta.delta(n) for n in delta.names()})
    for a, b in zip(images, reference):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    one_step = []
    pipe.sample(result, [0.7], steps=1, progress=lambda *a: one_step.append(
        sum(parametrize.is_parametrized(m) for m in layers)))
    assert one_step == [0], "a one-step call has no later pass to merge for"
