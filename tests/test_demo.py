"""`imagic demo` on the shipped toy model writes its eta-sweep contact sheet."""
import numpy as np
from PIL import Image

from imagic import cli
from imagic.demo import ETAS


def test_demo_writes_a_contact_sheet_with_the_input_and_one_column_per_eta(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    sheet = np.asarray(Image.open(out).convert("RGB"))
    # contact_sheet: 8 px padding, columns of equal width (input + one per eta), images enlarged to >= 160 px.
    columns = len(ETAS) + 1
    cell = (sheet.shape[1] - 8) // columns - 8
    assert cell >= 160 and sheet.shape[1] == columns * (cell + 8) + 8
    tiles = [sheet[32:32 + cell, 8 + i * (cell + 8): 8 + i * (cell + 8) + cell].astype(float) for i in range(columns)]
    assert all(t.std() > 1 for t in tiles), "every column holds an image, not a blank"
    # eta 0 reconstructs the photo closer than eta 1 (the target text alone) does.
    assert np.abs(tiles[1] - tiles[0]).mean() < np.abs(tiles[-1] - tiles[0]).mean()


def test_shipped_example_photo_is_the_generators_held_out_image():
    """example.png is data.make_example(EXAMPLE_SEED) from the test split, byte for byte, so the demo
    edits an image the toy model never trained on, and a change to the generator cannot leave it stale."""
    from imagic.demo import EXAMPLE_SEED, TARGET_TEXT, example_image
    from imagic.toy import data

    ex = data.make_example(EXAMPLE_SEED)
    assert data.split_of(EXAMPLE_SEED) == "test"
    assert np.array_equal(np.asarray(example_image()), ex.image)
    target = data.parse_caption(TARGET_TEXT)
    changed = [k for k in data.ATTRIBUTE_NAMES if target[k] != ex.attrs[k]]
    assert changed == ["size"], (ex.caption, TARGET_TEXT)
