"""The `imagic` command end to end on a tiny model folder written by the test."""
import argparse
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

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
    ("--eta", "abc", "argument --eta: must be a number, got 'abc'"),
    ("--eta", "nan", "argument --eta: must be a finite number, got 'nan'"),
    ("--etas", "0.5,x", "argument --etas: every eta must be a number, got 'x'"),
    ("--embedding-steps", "-3", "argument --embedding-steps: must be 0 (skip the stage) or more, got -3"),
    ("--finetune-steps", "2.5", "argument --finetune-steps: must be a whole number, got '2.5'"),
    ("--seed", "-1", "argument --seed: a seed is a whole number from 0 to 2**64 - 1, got -1"),
    ("--seed", str(2 ** 64), "argument --seed: a seed is a whole number from 0 to 2**64 - 1"),
    ("--rank", "0", "argument --rank: must be 1 or more, got 0"),
    ("--sample-steps", "-2", "argument --sample-steps: must be 1 or more, got -2"),
    ("--lr-finetune", "0", "argument --lr-finetune: a learning rate must be greater than 0"),
    ("--method", "lokr", "argument --method: invalid choice: 'lokr'"),
])
def test_bad_values_get_their_own_message_with_the_documented_prefix_and_no_usage_dump(
        flag, value, expected, tiny_sd_dir, photo, tmp_path, capsys):
    out = tmp_path / "out.png"
    with pytest.raises(SystemExit) as exc:
        cli.main(["edit", str(photo), "a dog", "--model", str(tiny_sd_dir), "--out", str(out), flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"imagic: error: {expected}"), err
    assert "usage:" not in err and len(err.splitlines()) <= 2, err
    assert not out.exists()
    if flag != "--seed":
        assert "seed" not in err, "the steps' and the seed's messages are different"


def _edit_actions():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices["edit"]._actions if a.option_strings and a.dest != "help"]


def test_help_shows_every_default_and_the_values_are_the_parsers():
    from imagic.defaults import format_rate, lr_finetune_default

    parsed = cli.build_parser().parse_args(["edit", "i.png", "t", "--model", "m", "--out", "o.png"])
    for action in (a for a in _edit_actions() if not a.required):
        match = re.search(r"\(default: ([^)]*)\)", action.help or "")
        assert match, f"{action.option_strings[0]}: no default in its help: {action.help!r}"
        shown = match.group(1)
        if action.dest in cli.PRESET_KEYS and action.dest != "lr_finetune":
            action.default = getattr(parsed, action.dest)  # (unset in the parser so that --preset sees it; filled after)
            assert action.default is not None, action.dest
        if action.default is None:
            continue  # said in words (the model's native size, not saved, ...); --eta and --lr-finetune below
        if isinstance(action.default, str):
            assert shown == action.default, action.option_strings
        else:
            assert float(shown) == pytest.approx(action.default), (action.option_strings, shown, action.default)
    helps = {a.dest: a.help for a in _edit_actions()}
    assert "(default: 0.7)" in helps["eta"] and cli.DEFAULTS["eta"] == 0.7
    for method in ("lora", "full"):
        assert f"{format_rate(lr_finetune_default(method))} with --method {method}" in helps["lr_finetune"]


def _edit_args(*extra):
    args = cli.build_parser().parse_args(["edit", "i.png", "t", "--model", "m", "--out", "o.png", *extra])
    return {k: getattr(args, k) for k in cli.PRESET_KEYS}, cli.finetune_lr(args)


def test_presets_set_the_training_options_and_options_given_win():
    from imagic.defaults import DEFAULTS, FAST_PRESET, PAPER_PRESET

    plain, lr = _edit_args()
    assert plain == dict(embedding_steps=DEFAULTS["embedding_steps"], lr_embedding=DEFAULTS["lr_embedding"],
                         finetune_steps=DEFAULTS["finetune_steps"], lr_finetune=None, method="lora")
    assert lr == DEFAULTS["lr_finetune_lora"]
    fast, lr = _edit_args("--preset", "fast")
    assert {k: fast[k] for k in FAST_PRESET} == FAST_PRESET and fast["method"] == "lora"
    assert fast["embedding_steps"] + fast["finetune_steps"] == (DEFAULTS["embedding_steps"] + DEFAULTS["finetune_steps"]) / 4
    assert _edit_args("--preset", "fast", "--finetune-steps", "300")[0]["finetune_steps"] == 300
    assert lr == FAST_PRESET["lr_finetune"] == 4 * DEFAULTS["lr_finetune_lora"], "a quarter of the steps at 4x the rate"
    # The fast rate is LoRA's: with --method full the full default applies, not 800x the paper's.
    assert _edit_args("--preset", "fast", "--method", "full")[1] == DEFAULTS["lr_finetune_full"]
    paper, lr = _edit_args("--preset", "paper")
    assert {k: paper[k] for k in PAPER_PRESET} == PAPER_PRESET and lr == 5e-7
    # The paper's rate is its full fine-tune's: with --method lora the LoRA default applies, not 200x below it.
    assert _edit_args("--preset", "paper", "--method", "lora")[1] == DEFAULTS["lr_finetune_lora"]
    with pytest.raises(SystemExit):
        _edit_args("--preset", "fastest")


def _run_cli_in_fresh_python(*argv):
    """The CLI in a new interpreter; reports its exit code, whether torch/diffusers were imported, and its time."""
    code = textwrap.dedent("""
        import json, sys, time
        start = time.perf_counter()
        from imagic import cli
        try:
            rc = cli.main(sys.argv[1:])
        except SystemExit as e:
            rc = e.code
        seconds = time.perf_counter() - start
        heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        print(json.dumps({"rc": rc, "heavy": heavy, "seconds": seconds}), file=sys.__stdout__)
    """)
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, proc


@pytest.mark.parametrize("case", ["help", "edit_help", "bad_eta", "missing_model", "model_not_a_folder",
                                  "bad_out", "no_command"])
def test_help_and_refusals_answer_without_importing_torch(case, photo, tmp_path):
    """`imagic --help`, `imagic edit --help` and every refusal that needs no model stay torch-free, so
    they answer at once (torch alone takes seconds to import, much longer on a loaded machine)."""
    edit = ["edit", photo, "a dog", "--out", tmp_path / "o.png"]
    argv, rc, expected = {
        "help": (["--help"], 0, "imagic edit --help"),
        "edit_help": (["edit", "--help"], 0, "(default: 500)"),
        "bad_eta": (edit + ["--model", tmp_path, "--eta", "abc"], 2, "imagic: error: argument --eta: must be a number"),
        "missing_model": (edit + ["--model", "./no-such-model"], 2, "imagic: error: model folder not found: ./no-such-model"),
        "model_not_a_folder": (edit + ["--model", tmp_path], 2, "is not a diffusers Stable Diffusion folder"),
        "bad_out": (["edit", photo, "a dog", "--model", tmp_path, "--out", tmp_path / "o.gif"], 2,
                    "imagic: error: --out must end in .png, .jpg or .webp"),
        "no_command": ([], 2, "imagic: error: the following arguments are required"),
    }[case]
    report, proc = _run_cli_in_fresh_python(*argv)
    assert report["rc"] == rc, proc.stderr
    assert expected in (proc.stdout + proc.stderr), (proc.stdout, proc.stderr)
    assert report["heavy"] == [], f"imported {report['heavy']} for {case}"
    assert "usage:" not in proc.stderr


def test_full_fine_tune_gets_its_own_learning_rate_and_a_lora_sized_one_is_warned_once(
        tiny_sd_dir, photo, tmp_path, capsys):
    from imagic import load_result
    from imagic.defaults import lr_finetune_default

    fast = ["--embedding-steps", "1", "--finetune-steps", "1", "--sample-steps", "1", "--size", "16"]
    base = ["edit", photo, "a dog", "--model", tiny_sd_dir, "--method", "full", *fast]
    code, _, err = run(capsys, *base, "--out", tmp_path / "a.png", "--save-result", tmp_path / "a.safetensors")
    assert code == 0, err
    assert load_result(tmp_path / "a.safetensors").settings["lr_finetune"] == lr_finetune_default("full") == 5e-7
    assert "warning" not in err

    code, _, err = run(capsys, *base, "--lr-finetune", "1e-4", "--out", tmp_path / "b.png")
    assert code == 0, err
    assert err.count("imagic: warning: full fine-tuning at learning rate 1e-4 is 200x the paper's 5e-7") == 1, err
    assert "ImagicWarning" not in err  # the core's own warning is not repeated


def test_finetune_lr_warning_flags_the_other_methods_rate_only():
    from imagic.defaults import finetune_lr_warning

    assert "200x the paper's 5e-7" in finetune_lr_warning("full", 1e-4)
    assert "LoRA-sized" in finetune_lr_warning("full", 1e-3)
    assert finetune_lr_warning("full", 5e-7) is None and finetune_lr_warning("full", 1e-5) is None
    assert finetune_lr_warning("lora", 1e-4) is None and finetune_lr_warning("lora", 1e-3) is None
    assert "200x below its default 1e-4" in finetune_lr_warning("lora", 5e-7)


def test_the_core_finetune_warns_when_full_gets_a_lora_sized_rate(pipe, photo):
    from imagic import ImagicWarning

    with pytest.warns(ImagicWarning, match="full fine-tuning at learning rate 1e-3"):
        pipe.train(photo, "a dog", embedding_steps=0, finetune_steps=1, method="full", lr_finetune=1e-3, size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImagicWarning)
        pipe.train(photo, "a dog", embedding_steps=0, finetune_steps=1, method="full", size=16)  # 5e-7: silent


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_users_ordinary_permissions_and_are_written_whole_or_not_at_all(umask, tmp_path):
    from PIL import Image as PILImage

    from imagic.output import atomic_write, save_image

    old = os.umask(umask)
    try:
        path = save_image(PILImage.new("RGB", (4, 4), "red"), tmp_path / "x.png")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

        def fails(tmp):
            Path(tmp).write_bytes(b"half")
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            atomic_write(tmp_path / "y.png", fails)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    finally:
        os.umask(old)


def test_console_entry_point_reports_errors_with_a_non_zero_exit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "imagic", "edit", str(tmp_path / "x.png"), "a dog", "--model",
                           str(tmp_path), "--out", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "imagic: error: image not found" in proc.stderr
