"""The flow baselines (imagic/baselines.py) and the harder cases' textured backgrounds (imagic/toy/data.py)."""
import numpy as np
import pytest

from imagic.baselines import flowedit, rf_inversion
from imagic.errors import ImagicError
from imagic.toy import data


@pytest.fixture(scope="module")
def flow_pipe(tiny_flow_dir):
    from imagic.pipeline import ImagicPipeline

    return ImagicPipeline.from_pretrained(tiny_flow_dir, device="cpu")


def _pixels(im):
    return np.asarray(im, np.int16)


def _rebuilt(pipe, photo):
    """The photo through the tiny model's (random) VAE: what an edit that changes nothing decodes to."""
    return pipe.decode(pipe.encode_image(pipe.load_image(photo)))[0]


def test_flowedit_with_the_same_text_keeps_the_photo(flow_pipe, photo):
    # Same text: z_tar = z_src at the first step, so the velocity difference is 0 at every step and z stays
    # the photo. A sign or offset error in the update would move it.
    img = _rebuilt(flow_pipe, photo)
    out = flowedit(flow_pipe, photo, "a cat", "a cat", [0.0, 1.0], steps=4, guidance_source=2.0, guidance_target=2.0)
    assert np.abs(_pixels(out[1]) - _pixels(img)).max() <= 1
    assert np.abs(_pixels(out[0]) - _pixels(img)).max() <= 1
    other = flowedit(flow_pipe, photo, "a cat", "a dog", [1.0], steps=4, guidance_source=2.0, guidance_target=6.0)
    assert np.abs(_pixels(other[0]) - _pixels(img)).max() > 1


def test_rf_inversion_fully_controlled_lands_on_the_photo(flow_pipe, photo):
    # eta_control = 1 for every step (strength 0): the reverse ODE follows (y0 - X) / sigma alone, whose last
    # step (to sigma 0) lands exactly on y0 whatever the inversion gave.
    img = _rebuilt(flow_pipe, photo)
    out = rf_inversion(flow_pipe, photo, "a dog", [0.0, 1.0], steps=4, guidance=2.0, eta_control=1.0)
    assert np.abs(_pixels(out[0]) - _pixels(img)).max() <= 1
    assert np.abs(_pixels(out[1]) - _pixels(img)).max() > 1  # uncontrolled: the model's own drawing


def test_flow_baselines_refuse_a_ddpm_model_and_bad_strengths(pipe, flow_pipe, photo):
    with pytest.raises(ImagicError, match="rectified-flow"):
        flowedit(pipe, photo, "a", "b", [0.5], steps=2, guidance_source=1, guidance_target=1)
    with pytest.raises(ImagicError, match="strengths must be in"):
        rf_inversion(flow_pipe, photo, "b", [1.5], steps=2, guidance=1)


def test_texture_changes_the_background_only():
    ex = data.make_example(2_000_003)
    tex = data.sample_texture(np.random.default_rng(0), "stripes")
    plain, textured = data.render(ex.attrs, ex.details), data.render(ex.attrs, ex.details, texture=tex)
    assert np.array_equal(plain, ex.image)  # no texture: the generator's bytes, as the models were trained on
    inside = data.object_coverage(ex.attrs, ex.details) == 1
    assert np.array_equal(plain[inside], textured[inside])
    bg = data.background_mask(ex.details, ex.attrs)
    assert np.abs(plain[bg].astype(int) - textured[bg].astype(int)).mean() > 5
    with pytest.raises(ValueError, match="texture kind"):
        data.sample_texture(np.random.default_rng(0), "plaid")
