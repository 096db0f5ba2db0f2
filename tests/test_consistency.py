"""One source for every default: the README's tables, the CLI, the Python API, the node widgets and the
workflows agree with imagic/defaults.py.

Nothing here runs a model: the README is parsed as text, the CLI parser is built (torch-free), the
workflows are read as JSON and the node files as Python source (they import ComfyUI, so they are not
imported).
"""
import argparse
import ast
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest

from imagic import cli
from imagic.defaults import DEFAULTS, ETA_SWEEP, PAPER_PRESET, WORKFLOW_PRESETS, lr_finetune_default

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# A number as the README writes it (500, 2e-3, 7.5, 0.7), not the digit of a word such as Conv2d.
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def table(text: str, header: str):
    """The rows (lists of cells) of the markdown table whose first cell is ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def numbers(cell: str):
    return [float(n) for n in NUMBER.findall(cell)]


def edit_actions():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices["edit"]._actions if a.option_strings and a.dest != "help"]


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_parser_defaults_are_imagic_defaults():
    actions = {a.dest: a for a in edit_actions()}
    shared = [k for k in DEFAULTS if k in actions and k != "eta"]
    assert len(shared) >= 9, shared
    parsed = cli.build_parser().parse_args(["edit", "i.png", "t", "--model", "m", "--out", "o.png"])
    for key in shared:
        # (the training options start unset in the parser, so that --preset sees them, and are filled after)
        assert (actions[key].default if key not in cli.PRESET_KEYS else getattr(parsed, key)) == DEFAULTS[key], key
    # Defaults that depend on another option are resolved from the same source.
    assert actions["eta"].default is None and actions["lr_finetune"].default is None
    args = cli.build_parser().parse_args(["edit", "i.png", "t", "--model", "m", "--out", "o.png"])
    assert cli.finetune_lr(args) == DEFAULTS["lr_finetune_lora"]
    args.method = "full"
    assert cli.finetune_lr(args) == DEFAULTS["lr_finetune_full"] == lr_finetune_default("full")


def test_readme_cli_table_lists_every_option_with_the_parsers_default():
    rows = table(section("Command line"), "option")
    actions = {opt: a for a in edit_actions() for opt in a.option_strings}
    listed = [opt for options, *_ in rows for opt in re.findall(r"`(--[\w-]+)`", options)]
    optional = [o for o, a in actions.items() if o.startswith("--") and not a.required]  # not --model, --out
    assert sorted(listed) == sorted(optional), "every optional option, once"
    checked = 0
    parsed = cli.build_parser().parse_args(["edit", "i.png", "t", "--model", "m", "--out", "o.png"])
    for options, default, _meaning in rows:
        names = re.findall(r"`(--[\w-]+)`", options)
        if " / " in options:  # alternatives (--eta / --etas): the default is the first one's
            names = names[:1]
        for name, value in zip(names, [v.strip() for v in default.split(",")] if default else []):
            action = actions[name]
            if action.dest in cli.PRESET_KEYS and action.dest != "lr_finetune":  # unset in the parser, filled after
                action = argparse.Namespace(default=getattr(parsed, action.dest))
            if name == "--eta":
                assert float(value) == DEFAULTS["eta"]
            elif name == "--lr-finetune":
                lora, full = re.fullmatch(r"(\S+) \(LoRA\) / (\S+) \(full\)", value).groups()
                assert (float(lora), float(full)) == (lr_finetune_default("lora"), lr_finetune_default("full"))
            elif action.default is None:
                continue  # said in words: "the model's native size", "cuda when available"
            elif isinstance(action.default, str):
                assert value == action.default, name
            else:
                assert float(value) == action.default, (name, value, action.default)
            checked += 1
    assert checked >= 11, checked


def test_readme_paper_preset_parses_to_the_paper_preset():
    preset = re.search(r"The paper's preset: `([^`]+)`", section("Command line")).group(1)
    args = cli.build_parser().parse_args(["edit", "i.png", "t", "--model", "m", "--out", "o.png",
                                          *shlex.split(preset)])
    assert {k: getattr(args, k) for k in PAPER_PRESET} == PAPER_PRESET


# ------------------------------------------------------------------------------- "Defaults, and why"
def test_readme_defaults_table_is_imagic_defaults_and_the_paper_preset():
    rows = {r[0]: r[1:] for r in table(section("Defaults, and why"), "stage")}
    D, P = DEFAULTS, PAPER_PRESET
    default, paper = rows["1. optimize embedding"]
    assert numbers(default) == [D["embedding_steps"], D["lr_embedding"]]
    assert numbers(paper) == [P["embedding_steps"], P["lr_embedding"]]
    default, paper = rows["2. fine-tune"]
    assert default.startswith("LoRA rank") and D["method"] == "lora"
    assert numbers(default) == [D["rank"], D["finetune_steps"], D["lr_finetune_lora"], D["lr_finetune_full"]]
    assert paper.startswith(P["method"]) and numbers(paper) == [P["finetune_steps"], P["lr_finetune"]]
    default, _ = rows["sample"]
    assert numbers(default) == [D["sample_steps"], D["guidance"], D["eta"]]


# ---------------------------------------------------------------------------------------- Python API
def test_readme_python_example_uses_the_defaults_of_the_api_it_calls():
    from imagic.pipeline import ImagicPipeline

    code = re.search(r"```python\n(.*?)```", section("Python API"), re.S).group(1)
    calls = {node.func.attr: node for node in ast.walk(ast.parse(code))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    for method in ("train", "sample"):
        signature = inspect.signature(getattr(ImagicPipeline, method))
        for kw in calls[method].keywords:
            if kw.arg == "etas":
                continue
            value = ast.literal_eval(kw.value)
            assert value == signature.parameters[kw.arg].default, (method, kw.arg)
            if kw.arg in DEFAULTS:
                assert value == DEFAULTS[kw.arg], (method, kw.arg)
    assert {kw.arg for kw in calls["train"].keywords} >= {"embedding_steps", "finetune_steps"}


# ---------------------------------------------------------------------------------- nodes, workflows
# Widget values in the order the nodes declare their inputs (nodes/nodes_train.py, nodes_conditioning.py);
# a seed widget is followed by its control_after_generate value.
WIDGETS = {
    "ImagicOptimizeEmbedding": ("steps", "learning_rate", "seed", "control", "gradient_checkpointing"),
    "ImagicFinetuneUNet": ("steps", "learning_rate", "seed", "control", "method", "rank", "gradient_checkpointing"),
    "ImagicInterpolateConditioning": ("eta",),
    "ImagicEtaSweep": ("etas",),
}


def expected_widgets(node_type: str, values: dict, preset: dict | None = None) -> dict:
    d = dict(DEFAULTS, **(preset or {}))
    if node_type == "ImagicOptimizeEmbedding":
        return dict(steps=d["embedding_steps"], learning_rate=DEFAULTS["lr_embedding"], seed=DEFAULTS["seed"],
                    gradient_checkpointing=True)
    if node_type == "ImagicFinetuneUNet":
        # A workflow may choose full; its learning rate must then be full's.
        return dict(steps=d["finetune_steps"], learning_rate=lr_finetune_default(values["method"]),
                    seed=DEFAULTS["seed"], method=DEFAULTS["method"], rank=DEFAULTS["rank"], gradient_checkpointing=True)
    if node_type == "ImagicInterpolateConditioning":
        return dict(eta=DEFAULTS["eta"])
    return dict(etas=ETA_SWEEP)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_imagic_widgets_are_the_defaults(path):
    nodes = json.loads(path.read_text())["nodes"]
    imagic = [n for n in nodes if n["type"] in WIDGETS]
    assert {"ImagicOptimizeEmbedding", "ImagicFinetuneUNet"} <= {n["type"] for n in imagic}, path.name
    for node in imagic:
        names = WIDGETS[node["type"]]
        assert len(node["widgets_values"]) == len(names), (node["type"], node["widgets_values"])
        values = dict(zip(names, node["widgets_values"]))
        if "etas" in values:
            values["etas"] = tuple(float(e) for e in values["etas"].split(","))
        for name, expected in expected_widgets(node["type"], values, WORKFLOW_PRESETS.get(path.name)).items():
            assert values[name] == pytest.approx(expected), (path.name, node["id"], node["type"], name)


@pytest.mark.parametrize("name", sorted(WORKFLOW_PRESETS))
def test_flow_workflows_load_and_edit_at_their_presets_size_and_format(name):
    """The photo is scaled to the preset's size, the empty latent matches it, and the model loads in fp8."""
    preset = WORKFLOW_PRESETS[name]
    nodes = {n["type"]: n for n in json.loads((ROOT / "workflows" / name).read_text())["nodes"]}
    assert nodes["ImageScale"]["widgets_values"][1:3] == [preset["size"], preset["size"]]
    assert nodes["EmptySD3LatentImage"]["widgets_values"][:2] == [preset["size"], preset["size"]]
    assert nodes["UNETLoader"]["widgets_values"][1] == "fp8_e4m3fn"
    note = next(n for n in nodes.values() if n["type"] == "Note")["widgets_values"][0]
    assert f"{preset['embedding_steps']} + {preset['finetune_steps']} steps" in note and f"{preset['size']}x{preset['size']}" in note


def node_literal_defaults(path: Path) -> dict:
    """``name -> default`` for every ``io.X.Input("name", default=<literal>)`` in a node file."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Input"
                and node.args and isinstance(node.args[0], ast.Constant)):
            for kw in node.keywords:
                if kw.arg == "default" and isinstance(kw.value, ast.Constant):
                    found.setdefault(node.args[0].value, set()).add(kw.value.value)
    return found


def test_node_widgets_written_as_literals_are_the_defaults():
    """Most widgets read imagic/defaults.py; the ones written as literals must say the same."""
    literals = node_literal_defaults(ROOT / "nodes" / "nodes_train.py")
    literals.update(node_literal_defaults(ROOT / "nodes" / "nodes_conditioning.py"))
    for name, key in (("seed", "seed"), ("method", "method"), ("rank", "rank"), ("eta", "eta")):
        for value in literals.get(name, ()):
            assert value == DEFAULTS[key], (name, value)
    assert literals.get("seed") == {DEFAULTS["seed"]} and literals.get("method") == {DEFAULTS["method"]}
    tree = ast.parse((ROOT / "nodes" / "nodes_conditioning.py").read_text())
    etas = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", None) == "DEFAULT_ETAS")
    # The Eta Sweep's default is written from ETA_SWEEP itself (nodes/ imports ComfyUI: read, not imported).
    assert isinstance(etas, ast.Call) and getattr(etas.func, "id", None) == "eta_sweep_text", ast.dump(etas)
    from imagic.defaults import eta_sweep_text
    assert tuple(float(e) for e in eta_sweep_text(", ").split(",")) == ETA_SWEEP


def test_readme_node_table_states_the_defaults_wherever_it_gives_one():
    for value in re.findall(r"`eta` \([^)]*default ([\d.]+)\)", README):
        assert float(value) == DEFAULTS["eta"]
    for value in re.findall(r"`etas` \(\"([^\"]+)\"\)", README):
        assert tuple(float(e) for e in value.split(",")) == ETA_SWEEP


def test_readme_family_table_is_the_packs_verdict_table():
    """The README's "Every image family" table is nodes/host/families.py, row for row (the nodes warn or
    refuse from that file, so what users read is what the nodes do). Loaded by path: nodes/ imports ComfyUI."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("families", ROOT / "nodes" / "host" / "families.py")
    families = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(families)
    rows = {r[0].strip("`"): r[1:] for r in table(section("In ComfyUI"), "host class")}
    assert set(rows) == set(families.FAMILIES), set(rows) ^ set(families.FAMILIES)
    for cls, (family, verdict, note) in families.FAMILIES.items():
        assert rows[cls] == [family, verdict, note], cls
