"""The `imagic` command end to end on a tiny model folder written by the test."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imagic import cli

FAST = ["--embedding-steps", "3", "--finetune-steps", "3", "--sample-steps", "3", "--size", "16",
        "--lr-finetune", "1e-2"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_edit_with_etas_writes_each_image_and_a_contact_sheet_and_reloads_without_training(
        tiny_sd_dir, photo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "edit.png"
    result = tmp_path / "result.safetensors"
    code, stdout, err = run(capsys, "edit", photo, "a photo of a sitting dog", "--model", tiny_sd_dir, "--out", out,
                            "--etas", "0,0.7,1", "--save-result", result, *FAST)
    assert code == 0, err
    # 40x24 photo, long side 16, sides multiples of 4 (VAE factor 2 x one UNet downsample): 16x8 (aspect kept).
    etas = [tmp_path / f"edit_eta{e}.png" for e in ("0.00", "0.70", "1.00")]
    for p in etas:
        assert Image.open(p).size == (16, 8)
    sheet = Image.open(out)
    assert sheet.size[0] > sheet.size[1] * 3, "one column per eta plus the input"
    assert result.is_file()

    # --load-result must not train: make any training step fail loudly.
    import imagic.train

    def no_training(*a, **k):
        raise AssertionError("training ran although a result was loaded")

    monkeypatch.setattr(imagic.train, "run_training", no_training)
    out2 = tmp_path / "again.png"
    code, _, err = run(capsys, "edit", photo, "a photo of a sitting dog", "--model", tiny_sd_dir, "--out", out2,
                       "--etas", "0,0.7,1", "--load-result", result, *FAST)
    assert code == 0, err
    assert "training skipped" in err
    for e in ("0.00", "0.70", "1.00"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"again_eta{e}.png")),
                              np.asarray(Image.open(tmp_path / f"edit_eta{e}.png")))


def test_single_eta_writes_one_image_at_the_working_size(tiny_sd_dir, photo, tmp_path, capsys):
    out = tmp_path / "one.png"
    code, stdout, err = run(capsys, "edit", photo, "a red car", "--model", tiny_sd_dir, "--out", out, "--eta", "0.8",
                            *FAST[:-4], "--size", "32")
    assert code == 0, err
    assert Image.open(out).size == (32, 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png"]


@pytest.mark.parametrize("case,expected", [
    ("missing", "image not found"),
    ("not_image", "is not an image"),
    ("empty_text", "target text is empty"),
    ("not_model", "not a diffusers Stable Diffusion folder"),
    ("bad_result", "not a readable safetensors file"),
])
def test_bad_input_gets_a_clear_message_and_no_output(case, expected, tiny_sd_dir, photo, tmp_path, capsys):
    image, text, model = photo, "a dog", tiny_sd_dir
    extra = []
    if case == "missing":
        image = tmp_path / "nope.png"
    elif case == "not_image":
        image = tmp_path / "text.png"
        image.write_text("hello")
    elif case == "empty_text":
        text = "   "
    elif case == "not_model":
        model = tmp_path / "empty_folder"
        model.mkdir()
    elif case == "bad_result":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"garbage")
        extra = ["--load-result", bad]
    out = tmp_path / "out.png"
    code, _, err = run(capsys, "edit", image, text, "--model", model, "--out", out, *FAST, *extra)
    assert code == 2
    assert expected in err
    assert not out.exists() and not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("flag,value,expected", [
    ("--eta", "abc", "must be a number"),
    ("--etas", "0.5,x", "every eta must be a number"),
    ("--embedding-steps", "-3", "0 (skip the stage) or more"),
    ("--finetune-steps", "2.5", "whole number"),
])
def test_bad_numbers_are_refused_before_anything_runs(flag, value, expected, tiny_sd_dir, photo, tmp_path, capsys):
    out = tmp_path / "out.png"
    with pytest.raises(SystemExit) as exc:
        cli.main(["edit", str(photo), "a dog", "--model", str(tiny_sd_dir), "--out", str(out), flag, value])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_console_entry_point_reports_errors_with_a_non_zero_exit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "imagic", "edit", str(tmp_path / "x.png"), "a dog", "--model",
                           str(tmp_path), "--out", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "imagic: error: image not found" in proc.stderr
