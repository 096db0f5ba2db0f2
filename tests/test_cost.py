"""imagic.cost: the estimates the nodes show before the first step, against the committed counts.

The coefficients are committed numbers from benchmarks/cost_model.py; these tests check that they
reproduce that run's table (benchmarks/results/cost_model.json), that the estimate behaves as memory and
FLOPs must (more pixels cost more, checkpointing saves memory, quantized files are smaller), that bad
input is refused with a message that says what to do, and that the README's figures are the estimate's.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imagic import cost
from imagic.defaults import WORKFLOW_PRESETS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = json.loads((ROOT / "benchmarks" / "results" / "cost_model.json").read_text())
FAMILIES = tuple(cost.FAMILIES)
GB = cost.GB


def test_every_family_of_the_issue_has_coefficients():
    assert set(FAMILIES) == {"SDXL", "Flux", "Flux2", "QwenImage", "ZImage", "Krea2"}
    assert set(RESULTS["counts"]["families"]) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_coefficients_reproduce_the_committed_counts(family):
    """Every count of the committed run, at the fitted sizes exactly (to the 6 digits kept) and at the size the
    fit did not see (640 px) within 2 % for FLOPs and 8 % for memory (Krea 2's stage-2 peak is 7 % off there)."""
    fam = RESULTS["counts"]["families"][family]
    assert cost.FAMILIES[family]["params"] == fam["params"]
    fit_sizes = RESULTS["settings"]["sizes"]
    checked = 0
    for row in fam["counts"]:
        e = cost.estimate(family, row["px"], row["px"], stage=row["stage"], checkpointing=row["checkpointing"])
        fitted = row["px"] in fit_sizes
        assert e["flops_per_step"] == pytest.approx(row["flops"], rel=1e-4 if fitted else 2e-2), row
        assert e["step_bytes"] == pytest.approx(row["step_bytes"], rel=1e-4 if fitted else 8e-2, abs=2e6), row
        checked += 1
    assert checked >= 12


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage,ckpt", [("embedding", False), ("finetune", False), ("finetune", True)])
def test_more_pixels_cost_more(family, stage, ckpt):
    es = [cost.estimate(family, px, px, stage=stage, checkpointing=ckpt) for px in (512, 768, 1024, 1536)]
    for small, large in zip(es, es[1:]):
        assert large["flops_per_step"] > small["flops_per_step"]
        assert large["memory_bytes"] > small["memory_bytes"]
    # Attention grows with the square of the tokens: each further megapixel costs more FLOPs than the one before.
    m = [e["megapixels"] for e in es]
    f = [e["flops_per_step"] for e in es]
    assert (f[2] - f[1]) / (m[2] - m[1]) > (f[1] - f[0]) / (m[1] - m[0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", ("embedding", "finetune"))
def test_checkpointing_lowers_memory_and_costs_flops(family, stage):
    plain = cost.estimate(family, 1024, 1024, stage=stage, checkpointing=False)
    ckpt = cost.estimate(family, 1024, 1024, stage=stage, checkpointing=True)
    assert ckpt["memory_bytes"] < plain["memory_bytes"]
    assert ckpt["flops_per_step"] > plain["flops_per_step"]  # the forward pass is run again
    assert cost.estimate(family, 1024, 1024, stage=stage)["checkpointing"]  # both nodes' default


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_formats_order_and_the_dequantized_copies_of_before(family):
    w = {f: cost.weight_bytes_of(family, f) for f in ("bf16", "fp8", "Q8_0", "Q4_K")}
    assert w["bf16"] > w["Q8_0"] > w["fp8"] * 0.99 and w["fp8"] > w["Q4_K"]
    assert w["bf16"] == pytest.approx(2 * cost.FAMILIES[family]["params"], rel=1e-9)
    before = cost.estimate(family, 1024, 1024, stage="embedding", checkpointing=False, weight_format="fp8",
                           keeps_dequantized=True)
    now = cost.estimate(family, 1024, 1024, stage="embedding", checkpointing=False, weight_format="fp8")
    bf16 = cost.estimate(family, 1024, 1024, stage="embedding", checkpointing=False, weight_format="bf16")
    assert now["memory_bytes"] < bf16["memory_bytes"] < before["memory_bytes"] and now["dequantized_bytes"] == 0
    assert before["dequantized_bytes"] == 2 * cost.FAMILIES[family]["quantizable_params"]
    ckpt = cost.estimate(family, 1024, 1024, stage="finetune", checkpointing=True, weight_format="Q4_K",
                         keeps_dequantized=True)
    assert ckpt["dequantized_bytes"] == 2 * cost.FAMILIES[family]["largest_block_params"]


def test_the_default_edit_is_500_plus_500_steps_and_time_scales_with_the_gpu():
    from imagic.defaults import DEFAULTS

    e = cost.edit_estimate("Flux", 1024, 1024)
    s1, s2 = e["stages"]
    assert DEFAULTS["embedding_steps"] == DEFAULTS["finetune_steps"] == 500
    assert e["flops"] == pytest.approx(500 * s1["flops_per_step"] + 500 * s2["flops_per_step"])
    assert s2["checkpointing"] and s1["checkpointing"]  # both nodes' default
    assert e["seconds"]["RTX 3090"] > e["seconds"]["RTX 4090"] > e["seconds"]["H100 SXM"]
    half = cost.edit_estimate("Flux", 1024, 1024, embedding_steps=250, finetune_steps=250)
    assert half["seconds"]["RTX 4090"] == pytest.approx(e["seconds"]["RTX 4090"] / 2)


def test_fits_says_yes_or_no_with_the_way_out():
    e = cost.estimate("Flux", 1024, 1024, stage="finetune", checkpointing=False)
    ok, text = cost.fits(e, 200 * GB)
    assert ok and "Flux.1 dev" in text and "estimate" in text
    ok, text = cost.fits(e, 8 * GB)
    assert not ok and "checkpointing" in text and "fp8 or GGUF" in text and "smaller image" in text
    assert cost.summary("ZImage", 1024, 1024, free_bytes=24 * GB, gpu="RTX 4090").count("\n") == 2
    assert "(bf16)" in text and "as loaded" not in text
    # The weights as loaded (a node passes the model's size, not its format): labelled so, and the fp8 hint
    # only where they take 16 bits each.
    for size, hinted in ((cost.weight_bytes_of("Flux", "bf16"), True), (cost.weight_bytes_of("Flux", "fp8"), False)):
        loaded = cost.estimate("Flux", 1024, 1024, stage="finetune", checkpointing=False, weight_format=None,
                               weight_bytes=size)
        ok, text = cost.fits(loaded, 8 * GB)
        assert not ok and "(as loaded)" in text and "(bf16)" not in text
        assert ("fp8 or GGUF" in text) == hinted
    assert cost.fits(e, 8 * GB, hints=False)[1].endswith("it may not fit.")
    with pytest.raises(cost.CostError, match="need a size"):
        cost.estimate("Flux", 1024, 1024, weight_format=None)


def test_host_class_names_map_to_keys():
    assert cost.family_key("FluxSchnell") == "Flux"
    assert cost.family_key("Flux2") == "Flux2"
    assert cost.family_key("SSD1B") == "SDXL"  # an upper bound
    assert cost.estimate("FluxInpaint", 512, 512)["flops_per_step"] == cost.estimate("Flux", 512, 512)["flops_per_step"]
    with pytest.raises(cost.CostError, match="Lumina2"):
        cost.family_key("Lumina2")


@pytest.mark.parametrize("kwargs,match", [
    (dict(family="Flux3"), r"unknown family 'Flux3': use one of SDXL, Flux, Flux2, QwenImage, ZImage, Krea2"),
    (dict(weight_format="Q3_K"), r"unknown weight format 'Q3_K'.*bf16, fp16, fp8, Q8_0"),
    (dict(stage="sample"), r"stage must be one of"),
    (dict(method="full"), r"only method 'lora'"),
    (dict(width=0), r"width must be a whole number of pixels, 64 or more"),
    (dict(height=512.5), r"height must be"),
])
def test_bad_input_is_refused_with_what_to_do(kwargs, match):
    args = dict(family="Flux", width=512, height=512)
    args.update(kwargs)
    with pytest.raises(cost.CostError, match=match):
        cost.estimate(args.pop("family"), args.pop("width"), args.pop("height"), **args)
    with pytest.raises(cost.CostError, match="unknown GPU class"):
        cost.seconds_for(1e15, "RTX 9090")


def test_importing_it_loads_neither_torch_nor_comfy():
    code = "import sys; import imagic.cost; print('torch' in sys.modules, 'comfy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_check_against_the_cpu_is_in_the_results():
    """The committed run has the real-execution check at two sizes, and the fake count equals the real count."""
    check = RESULTS["check"]
    assert len({c["px"] for c in check}) == 2
    for c in check:
        assert c["fake"]["flops"] == c["real"]["flops"]


def test_readme_headline_numbers_are_the_estimates():
    """The README's 'Will it fit, how long' table: each family at 1024 px, as imagic.cost gives it today."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Will it fit, how long")
    text = readme[start:readme.index("\n#", start + 5)]
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| family")]
    rows = [r for r in rows if not set(r) <= set("|-: ")]
    assert len(rows) == len(FAMILIES)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        key = next(k for k, n in cost.NAMES.items() if cells[0] == n)
        want = [f"{cost.edit_estimate(key, 1024, 1024, weight_format=f)['memory_bytes'] / GB:.0f}"
                for f in ("bf16", "fp8", "Q4_K")]
        want += [f"{cost.edit_estimate(key, 1024, 1024, weight_format='fp8')['seconds'][g] / 60:.0f}"
                 for g in ("RTX 4090", "RTX 3090", "H100 SXM")]
        assert [re.sub(r"\*", "", c) for c in cells[1:7]] == want, row


@pytest.mark.parametrize("workflow", sorted(WORKFLOW_PRESETS))
def test_the_flow_workflows_presets_are_a_few_minutes_on_a_24_gb_card(workflow):
    """The Flux and Z-Image workflows ship steps and a size estimated at <= 5 min on an RTX 4090 with an fp8 file,
    with room for the estimate being 1.3x low (the CPU check's largest time ratio), and fitting its 24 GB."""
    p = WORKFLOW_PRESETS[workflow]
    e = cost.edit_estimate(p["family"], p["size"], p["size"], embedding_steps=p["embedding_steps"],
                           finetune_steps=p["finetune_steps"], weight_format=p["weight_format"])
    assert e["seconds"]["RTX 4090"] * 1.3 <= 300, e["seconds"]["RTX 4090"]
    assert e["memory_bytes"] <= cost.GPUS["RTX 4090"]["memory_bytes"]
