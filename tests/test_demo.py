"""`imagic demo` on the shipped toy model: its default result is the target edit and keeps the background."""
import os
import stat

import numpy as np
from PIL import Image

from imagic import cli, demo
from imagic.defaults import DEFAULTS
from imagic.output import current_umask, tile
from imagic.toy import data


def test_demo_default_eta_is_the_target_edit_on_the_photos_background(tmp_path, capsys, monkeypatch):
    runs = []
    make_demo = demo.make_demo
    monkeypatch.setattr(demo, "make_demo", lambda *a, **k: runs.append(make_demo(*a, **k)) or runs[-1])
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    (run,) = runs

    example = data.make_example(demo.EXAMPLE_SEED)
    target = data.parse_caption(demo.TARGET_TEXT)
    # What the sheet on disk shows, read back from the file: the input exactly, then each eta's image exactly.
    sheet = Image.open(out).convert("RGB")
    tiles = [tile(sheet, box, (data.IMAGE_SIZE, data.IMAGE_SIZE)) for box in run.boxes]
    assert len(tiles) == 1 + len(demo.ETAS)
    assert np.array_equal(np.asarray(tiles[0]), example.image)
    for shown, made in zip(tiles, run.images):
        assert np.array_equal(np.asarray(shown), np.asarray(made))

    # The framed column is the default eta, and the classifier reads the target text in it, on all four
    # attributes, while the photo itself reads as its own caption (so an edit was made).
    assert demo.ETAS[run.chosen - 1] == DEFAULTS["eta"]
    from imagic.toy.classifier import predict_attributes

    read_input, read_chosen, read_eta0 = predict_attributes([tiles[0], tiles[run.chosen], tiles[1]])
    assert {k: read_input[k] for k in target} == example.attrs != target
    assert {k: read_chosen[k] for k in target} == target
    # eta 0 rebuilds the photo: the classifier reads the photo's attributes, not the target's.
    assert {k: read_eta0[k] for k in target} == example.attrs
    # The background stays the photo's: far closer than another photo's (0.12) or its own gradient reversed (0.10).
    distance = demo.background_distance(tiles[run.chosen], example, target)
    assert distance < demo.BACKGROUND_LIMIT, distance

    # The run says where the sheet went (absolute), how long it took, and the readings the sheet shows.
    assert f"wrote {out.resolve()} in " in stdout
    chosen_line = next(line for line in stdout.splitlines() if "<- the default" in line)
    assert chosen_line.split()[:2] == ["eta", f"{DEFAULTS['eta']:.1f}"] and "the target" in chosen_line
    assert f"background {distance:.3f}" in chosen_line
    # The gradient reading on the sheet and in the summary is the tile's own (a flat grey would read near 0).
    kept = demo.background_structure(tiles[run.chosen], example, target)
    assert kept == run.structure[run.chosen] and f"gradient kept {kept:.2f}" in chosen_line
    assert "look at the framed column" in stdout and "not the clean edit" not in stdout
    # An ordinary file: 0666 less the umask, not the temporary file's 0600.
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~current_umask()


def test_shipped_example_photo_is_the_generators_held_out_image():
    """example.png is data.make_example(EXAMPLE_SEED) from the test split, byte for byte, so the demo
    edits an image the toy model never trained on, and a change to the generator cannot leave it stale."""
    ex = data.make_example(demo.EXAMPLE_SEED)
    assert data.split_of(demo.EXAMPLE_SEED) == "test"
    assert np.array_equal(np.asarray(demo.example_image()), ex.image)
    target = data.parse_caption(demo.TARGET_TEXT)
    changed = [k for k in data.ATTRIBUTE_NAMES if target[k] != ex.attrs[k]]
    assert changed == ["size"], (ex.caption, demo.TARGET_TEXT)


def test_background_distance_separates_the_photos_background_from_another_one():
    """The measure the demo test relies on: 0 for the ideal edit (the target drawn on the photo's own
    details), above the limit for the same target on the gradient reversed."""
    import dataclasses

    ex = data.make_example(demo.EXAMPLE_SEED)
    target = data.parse_caption(demo.TARGET_TEXT)
    assert demo.background_distance(data.render(target, ex.details), ex, target) == 0.0
    reversed_bg = dataclasses.replace(ex.details, bg_angle=ex.details.bg_angle + np.pi)
    assert demo.background_distance(data.render(target, reversed_bg), ex, target) > 1.5 * demo.BACKGROUND_LIMIT


def test_background_structure_reads_a_flat_fill_as_lost_where_the_distance_does_not():
    """A flat fill of the photo's mean background colour is only 0.05 away on the distance (the demo's limit;
    another photo is 0.12) but keeps none of the gradient; the ideal edit keeps all of it, the reversed
    gradient less than none."""
    import dataclasses

    ex = data.make_example(demo.EXAMPLE_SEED)
    target = data.parse_caption(demo.TARGET_TEXT)
    ideal = data.render(target, ex.details)
    assert demo.background_structure(ideal, ex, target) == 1.0
    mask = data.background_mask(ex.details, ex.attrs, target)
    flat = ideal.copy()
    flat[mask] = ex.image[mask].mean(0).round().astype(np.uint8)
    assert abs(demo.background_structure(flat, ex, target)) < 0.01
    assert demo.background_distance(flat, ex, target) < 2 * demo.BACKGROUND_LIMIT
    reversed_bg = dataclasses.replace(ex.details, bg_angle=ex.details.bg_angle + np.pi)
    assert demo.background_structure(data.render(target, reversed_bg), ex, target) < 0
