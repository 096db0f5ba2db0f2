"""ComfyUI UI-format workflows (what users drag onto the page) for tests: convert and validate.

The host has no converter from the UI (LiteGraph) format to the API format: only the web
frontend does it. This module does the same job from the host's own node definitions
(``nodes.NODE_CLASS_MAPPINGS``; V1 classes and V3 ``io.ComfyNode`` classes alike, both expose
``INPUT_TYPES``/``RETURN_TYPES``), following the frontend's rules:

- frontend-only nodes (Note, MarkdownNote, Reroute, PrimitiveNode) are not in the prompt;
  a link through Reroutes is followed back to the real source, a PrimitiveNode's value
  replaces the widget it feeds;
- muted nodes (mode 2) are left out, and so are inputs linked from a left-out node;
- bypassed nodes (mode 4) are left out and each of their outputs passes through the input of
  the same type (the input in the same slot first, else the first input of that type);
- ``widgets_values`` is positional over the widget inputs in the class's input order
  (required, then optional). A widget with ``control_after_generate`` (seeds) is followed by
  its control value ("fixed", "randomize", ...), and a node with an upload widget
  (LoadImage's ``image_upload``) has the upload button's value ("image") after its widgets.

``validate`` lists what would stop a workflow from loading or running; ``to_api`` converts.
Nothing here imports the host: pass ``nodes.NODE_CLASS_MAPPINGS`` in.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Mapping

FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# The frontend's legacy rule: these INT inputs get a control widget even without the flag.
LEGACY_SEED_NAMES = ("seed", "noise_seed")
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "file_upload")
MODE_ALWAYS, MODE_MUTED, MODE_BYPASSED = 0, 2, 4
TITLE_HEIGHT = 30  # LiteGraph draws the title bar above ``pos``


class WorkflowError(ValueError):
    pass


def _s(t) -> str:
    """A type as a plain string (V1 ``IO`` members are str enums; V1 combos are lists)."""
    if isinstance(t, (list, tuple)):
        return "COMBO"
    if isinstance(t, Enum):
        return str(t.value)
    return str(t)


@dataclass
class InputDef:
    name: str
    type: str
    options: dict
    required: bool
    combo: list | None = None      # the options of a COMBO input

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def has_control(self) -> bool:
        flag = self.options.get("control_after_generate")
        if flag is not None:
            return bool(flag)
        return self.type == "INT" and self.name in LEGACY_SEED_NAMES

    @property
    def upload(self) -> str | None:
        return next((f for f in UPLOAD_FLAGS if self.options.get(f)), None)


@dataclass
class NodeDef:
    type: str
    inputs: list[InputDef]
    outputs: list[tuple[str, str]]          # (name as the frontend shows it, type)
    output_is_list: list[bool] = field(default_factory=list)

    def input(self, name) -> InputDef | None:
        return next((i for i in self.inputs if i.name == name), None)

    @property
    def widgets(self) -> list[InputDef]:
        return [i for i in self.inputs if i.is_widget]

    @property
    def sockets(self) -> list[InputDef]:
        return [i for i in self.inputs if not i.is_widget]

    def widget_slots(self) -> list[tuple[str, InputDef | None]]:
        """What each position of ``widgets_values`` holds: ("value", input), ("control", input),
        or ("upload", None) for the upload button the frontend adds after the widgets."""
        slots: list[tuple[str, InputDef | None]] = []
        for w in self.widgets:
            slots.append(("value", w))
            if w.has_control:
                slots.append(("control", w))
        if any(w.upload for w in self.widgets):
            slots.append(("upload", None))
        return slots


def node_def(type_name: str, cls) -> NodeDef:
    """The frontend's view of a node class (V1 or V3) from its INPUT_TYPES and RETURN_TYPES."""
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, value in (spec.get(section) or {}).items():
            t = value[0] if isinstance(value, (list, tuple)) and value else value
            opts = dict(value[1]) if isinstance(value, (list, tuple)) and len(value) > 1 and isinstance(value[1], dict) else {}
            combo = None
            if isinstance(t, (list, tuple)):
                combo = list(t)
            elif _s(t) == "COMBO":
                combo = list(opts.get("options") or [])
            inputs.append(InputDef(name, _s(t), opts, section == "required", combo))
    types = [_s(t) for t in (getattr(cls, "RETURN_TYPES", None) or ())]
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    is_list = list(getattr(cls, "OUTPUT_IS_LIST", None) or [False] * len(types))
    return NodeDef(type_name, inputs, list(zip(names, types)), is_list)


class Definitions:
    """Node definitions looked up lazily from a NODE_CLASS_MAPPINGS-like mapping."""

    def __init__(self, mappings: Mapping[str, Any]):
        self.mappings = mappings
        self._cache: dict[str, NodeDef] = {}

    def __contains__(self, type_name) -> bool:
        return type_name in self.mappings

    def __getitem__(self, type_name) -> NodeDef:
        if type_name not in self._cache:
            self._cache[type_name] = node_def(type_name, self.mappings[type_name])
        return self._cache[type_name]


def _defs(mappings) -> Definitions:
    return mappings if isinstance(mappings, Definitions) else Definitions(mappings)


def load(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# graph helpers


class Graph:
    def __init__(self, wf: dict):
        self.wf = wf
        self.nodes: dict[int, dict] = {}
        for n in wf.get("nodes", []):
            self.nodes[n["id"]] = n
        self.links: dict[int, list] = {}
        for link in wf.get("links", []):
            if isinstance(link, dict):  # (a newer serialisation writes links as objects)
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                        link["target_slot"], link["type"]]
            self.links[link[0]] = link

    def mode(self, node) -> int:
        return int(node.get("mode", 0) or 0)

    def input_link(self, node, slot):
        inputs = node.get("inputs") or []
        if slot >= len(inputs) or inputs[slot].get("link") is None:
            return None
        return self.links.get(inputs[slot]["link"])

    def input_slot(self, node, name):
        for i, inp in enumerate(node.get("inputs") or []):
            if inp.get("name") == name:
                return i
        return None

    def resolve(self, link, want_type):
        """Follow a link back through Reroutes and bypassed nodes to (node, slot), or None.

        Returns ("primitive", node) for a PrimitiveNode source.
        """
        seen = set()
        while link is not None:
            if link[0] in seen:
                return None
            seen.add(link[0])
            src = self.nodes.get(link[1])
            if src is None:
                return None
            t = src["type"]
            if t == "Reroute":
                link = self.input_link(src, 0)
                continue
            if t == "PrimitiveNode":
                return ("primitive", src)
            if t in FRONTEND_ONLY:
                return None
            if self.mode(src) == MODE_BYPASSED:
                link = self._bypass_input(src, link[2], want_type)
                continue
            if self.mode(src) == MODE_MUTED:
                return None
            return (src, link[2])
        return None

    def _bypass_input(self, node, out_slot, want_type):
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        t = want_type
        if out_slot < len(outputs) and outputs[out_slot].get("type") not in (None, "*"):
            t = outputs[out_slot]["type"]
        if out_slot < len(inputs) and inputs[out_slot].get("type") == t and inputs[out_slot].get("link") is not None:
            return self.links.get(inputs[out_slot]["link"])
        for inp in inputs:
            if inp.get("type") == t and inp.get("link") is not None:
                return self.links.get(inp["link"])
        return None


def _widget_values(node, nd: NodeDef, problems: list | None = None) -> dict[str, Any]:
    """{input name: value} from a node's positional ``widgets_values``."""
    values = node.get("widgets_values")
    if values is None:
        values = []
    if isinstance(values, dict):  # some nodes serialise a dict of name -> value
        return {w.name: values[w.name] for w in nd.widgets if w.name in values}
    slots = nd.widget_slots()
    out = {}
    for i, (kind, w) in enumerate(slots):
        if i >= len(values):
            break
        v = values[i]
        if kind == "value":
            out[w.name] = v
        elif kind == "control" and problems is not None and v not in CONTROL_VALUES and v is not None:
            problems.append(f"node {node['id']} ({nd.type}): control_after_generate value of {w.name!r} "
                            f"is {v!r}, not one of {CONTROL_VALUES}")
        elif kind == "upload" and problems is not None and v not in ("image", None, ""):
            problems.append(f"node {node['id']} ({nd.type}): upload widget value {v!r} (expected 'image')")
    if problems is not None:
        if len(values) < len(slots) and not (len(values) == len(slots) - 1 and slots[-1][0] == "upload"):
            problems.append(f"node {node['id']} ({nd.type}): widgets_values has {len(values)} values, "
                            f"the widgets need {len(slots)} ({', '.join(_slot_names(slots))})")
        elif len(values) > len(slots):
            problems.append(f"node {node['id']} ({nd.type}): widgets_values has {len(values)} values, "
                            f"more than the {len(slots)} widgets ({', '.join(_slot_names(slots))})")
    return out


def _slot_names(slots):
    return [(w.name if kind == "value" else f"{w.name}:control" if kind == "control" else "upload")
            for kind, w in slots]


# ---------------------------------------------------------------------------------------------
# conversion


def to_api(wf: dict, mappings) -> dict:
    """The API-format prompt the frontend would queue for this UI workflow.

    Raises WorkflowError for a node type the host does not know (frontend-only types excepted).
    """
    defs = _defs(mappings)
    g = Graph(wf)
    prompt: dict[str, dict] = {}
    for nid, node in g.nodes.items():
        t = node["type"]
        if t in FRONTEND_ONLY or g.mode(node) in (MODE_MUTED, MODE_BYPASSED):
            continue
        if t not in defs:
            raise WorkflowError(f"node {nid}: unknown node type {t!r} (not in NODE_CLASS_MAPPINGS)")
        nd = defs[t]
        inputs: dict[str, Any] = dict(_widget_values(node, nd))
        for slot, inp in enumerate(node.get("inputs") or []):
            link = g.input_link(node, slot)
            if link is None:
                continue
            name = inp.get("name")
            idef = nd.input(name)
            if idef is None and isinstance(inp.get("widget"), dict):
                idef = nd.input(inp["widget"].get("name"))
            if idef is None:
                continue
            src = g.resolve(link, inp.get("type"))
            if src is None:  # from a muted node, or a bypass with no input of that type
                continue
            if src[0] == "primitive":
                pv = src[1].get("widgets_values") or []
                if pv:
                    inputs[idef.name] = pv[0]
                continue
            inputs[idef.name] = [str(src[0]["id"]), int(src[1])]
        entry = {"class_type": t, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(nid)] = entry
    # Inputs linked to nodes that were left out (muted, or unresolvable) are dropped.
    for entry in prompt.values():
        for k in list(entry["inputs"]):
            v = entry["inputs"][k]
            if _is_link(v) and v[0] not in prompt:
                del entry["inputs"][k]
    return prompt


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


# ---------------------------------------------------------------------------------------------
# validation


def _types_match(link_type: str, want: str) -> bool:
    if link_type == "*" or want == "*":
        return True
    a = {x.strip() for x in str(link_type).split(",")}
    b = {x.strip() for x in str(want).split(",")}
    return bool(a & b)


def check_value(idef: InputDef, value, files: Iterable[str] = ()) -> str | None:
    """Why ``value`` does not fit the widget input, or None."""
    t, o = idef.type, idef.options
    if t == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not an INT"
    elif t == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a FLOAT"
    elif t == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not a BOOLEAN"
    elif t == "STRING":
        if not isinstance(value, str):
            return f"{value!r} is not a STRING"
    elif t == "COMBO":
        options = idef.combo or []
        if value not in options and value not in set(files):
            shown = options[:8] + (["..."] if len(options) > 8 else [])
            return f"{value!r} is not one of the options {shown} nor a file the test provides"
        return None
    if t in ("INT", "FLOAT"):
        if o.get("min") is not None and value < o["min"]:
            return f"{value} is below min {o['min']}"
        if o.get("max") is not None and value > o["max"]:
            return f"{value} is above max {o['max']}"
    return None


def validate(wf: dict, mappings, files: Iterable[str] = ()) -> list[str]:
    """Problems that would stop this UI workflow from loading or running (empty list: fine).

    - the file's shape: nodes, links, last_node_id/last_link_id, unique ids;
    - every node type exists in ``mappings`` (frontend-only types excepted);
    - every link agrees with both ends' ``inputs``/``outputs`` entries, and its type equals the
      source output type and the destination input type (or "*");
    - every widget value fits its input: a COMBO value is one of the options or one of
      ``files`` (model and image file names the user supplies), INT/FLOAT within min/max,
      BOOLEAN a bool, STRING a str; control_after_generate values are known;
    - every required input is connected or has a widget value, on every node (muted ones too:
      users unmute them), and after conversion every required input of the active part is
      still there.
    """
    defs = _defs(mappings)
    files = set(files)
    problems: list[str] = []
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        if key not in wf:
            problems.append(f"workflow has no {key!r}")
    if problems:
        return problems
    if "id" in wf and not isinstance(wf["id"], str):
        # Frontend 1.27's drop handler throws on a non-string id, so such a file does not load there.
        problems.append(f"workflow id {wf['id']!r} is not a string")
    g = Graph(wf)
    ids = [n["id"] for n in wf["nodes"]]
    if len(ids) != len(set(ids)):
        problems.append(f"duplicate node ids: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    if ids and max(ids) > wf["last_node_id"]:
        problems.append(f"last_node_id {wf['last_node_id']} < largest node id {max(ids)}")
    if g.links and max(g.links) > wf["last_link_id"]:
        problems.append(f"last_link_id {wf['last_link_id']} < largest link id {max(g.links)}")
    if len(g.links) != len(wf["links"]):
        problems.append("duplicate link ids")

    # links against both ends
    for lid, link in g.links.items():
        _, src_id, src_slot, dst_id, dst_slot, ltype = link
        src, dst = g.nodes.get(src_id), g.nodes.get(dst_id)
        if src is None or dst is None:
            problems.append(f"link {lid}: node {src_id if src is None else dst_id} does not exist")
            continue
        outs, ins = src.get("outputs") or [], dst.get("inputs") or []
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            problems.append(f"link {lid}: not listed in node {src_id}'s outputs[{src_slot}].links")
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
            problems.append(f"link {lid}: node {dst_id}'s inputs[{dst_slot}].link is not {lid}")
            continue
        if src_slot < len(outs) and outs[src_slot].get("type") not in (None, "*") and \
                not _types_match(ltype, outs[src_slot]["type"]):
            problems.append(f"link {lid}: type {ltype} but node {src_id}'s output is {outs[src_slot]['type']}")
        if not _types_match(ltype, ins[dst_slot].get("type", "*")):
            problems.append(f"link {lid}: type {ltype} but node {dst_id}'s input "
                            f"{ins[dst_slot].get('name')!r} is {ins[dst_slot].get('type')}")
        if src["type"] not in FRONTEND_ONLY and src["type"] in defs:
            sd = defs[src["type"]]
            if src_slot >= len(sd.outputs):
                problems.append(f"link {lid}: {src['type']} has no output {src_slot}")
            elif not _types_match(ltype, sd.outputs[src_slot][1]):
                problems.append(f"link {lid}: type {ltype} but {src['type']} output {src_slot} "
                                f"({sd.outputs[src_slot][0]}) is {sd.outputs[src_slot][1]}")
        if dst["type"] not in FRONTEND_ONLY and dst["type"] in defs:
            name = ins[dst_slot].get("name")
            w = ins[dst_slot].get("widget")
            idef = defs[dst["type"]].input(w.get("name") if isinstance(w, dict) else name) or defs[dst["type"]].input(name)
            if idef is None:
                problems.append(f"link {lid}: {dst['type']} has no input {name!r}")
            elif not _types_match(ltype, idef.type):
                problems.append(f"link {lid}: type {ltype} but {dst['type']} input {name!r} is {idef.type}")
        for out_list in outs:
            for other in out_list.get("links") or []:
                if other not in g.links:
                    problems.append(f"node {src_id}: output lists link {other} that does not exist")

    # nodes
    for nid, node in g.nodes.items():
        t = node.get("type")
        if t in FRONTEND_ONLY:
            continue
        if t not in defs:
            problems.append(f"node {nid}: unknown node type {t!r} (not in NODE_CLASS_MAPPINGS)")
            continue
        nd = defs[t]
        where = f"node {nid} ({t})"
        if node.get("mode", 0) not in (MODE_ALWAYS, MODE_MUTED, MODE_BYPASSED):
            problems.append(f"{where}: unknown mode {node.get('mode')!r}")
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None and inp["link"] not in g.links:
                problems.append(f"{where}: input {inp.get('name')!r} names link {inp['link']} that does not exist")
            w = inp.get("widget")
            # Frontend 1.49 also serializes a socket for its own upload button (LoadImage's "upload",
            # type IMAGEUPLOAD); the backend never sees it, so it is fine as long as nothing links to it.
            frontend_widget = (isinstance(w, dict) and inp.get("link") is None
                               and str(inp.get("type", "")).endswith("UPLOAD"))
            if nd.input(inp.get("name")) is None and not frontend_widget and not (
                    isinstance(w, dict) and nd.input(w.get("name"))):
                problems.append(f"{where}: has an input {inp.get('name')!r} that {t} does not define")
        for j, out in enumerate(node.get("outputs") or []):
            # ComfyUI 0.33's SaveImage/PreviewImage pass their images on (an IMAGE output); files saved
            # there keep that slot, which older hosts lack. Unlinked, their frontends load it cleanly.
            if j >= len(nd.outputs):
                if out.get("links"):
                    problems.append(f"{where}: output {j} ({out.get('name')}) does not exist on {t}")
            elif not _types_match(out.get("type", "*"), nd.outputs[j][1]):
                problems.append(f"{where}: output {j} type {out.get('type')} but {t} returns {nd.outputs[j][1]}")
        values = _widget_values(node, nd, problems)
        for w in nd.widgets:
            if w.name in values:
                why = check_value(w, values[w.name], files)
                if why:
                    problems.append(f"{where}: widget {w.name!r}: {why}")
        for idef in nd.inputs:
            if not idef.required:
                continue
            slot = g.input_slot(node, idef.name)
            linked = slot is not None and (node["inputs"][slot].get("link") is not None)
            if idef.is_widget:
                if not linked and idef.name not in values:
                    problems.append(f"{where}: required widget {idef.name!r} has no value")
            elif not linked:
                problems.append(f"{where}: required input {idef.name!r} is not connected")

    if any(p.startswith("node") and "unknown node type" in p for p in problems):
        return problems
    # the active part, as it will be queued
    try:
        prompt = to_api(wf, defs)
    except WorkflowError as e:
        return problems + [str(e)]
    for nid, entry in prompt.items():
        nd = defs[entry["class_type"]]
        for idef in nd.inputs:
            if idef.required and idef.name not in entry["inputs"]:
                problems.append(f"node {nid} ({entry['class_type']}): required input {idef.name!r} is missing "
                                "once muted/bypassed nodes are left out")
    if not any(getattr(defs.mappings[e["class_type"]], "OUTPUT_NODE", False) or _is_v3_output(defs.mappings[e["class_type"]])
               for e in prompt.values()):
        problems.append("the active part has no output node (SaveImage, PreviewImage, ...)")
    return problems


def _is_v3_output(cls) -> bool:
    try:
        schema = cls.GET_SCHEMA()
    except Exception:
        return False
    return bool(getattr(schema, "is_output_node", False))


def layout_problems(wf: dict) -> list[str]:
    """Overlapping nodes (title bar included) and nodes outside every group that claims them."""
    boxes = []
    for n in wf.get("nodes", []):
        x, y = n["pos"][:2] if isinstance(n["pos"], list) else (n["pos"]["0"], n["pos"]["1"])
        w, h = n["size"][:2] if isinstance(n["size"], list) else (n["size"]["0"], n["size"]["1"])
        boxes.append((n["id"], n["type"], x, y - TITLE_HEIGHT, x + w, y + h))
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a[2] < b[4] and b[2] < a[4] and a[3] < b[5] and b[3] < a[5]:
                out.append(f"node {a[0]} ({a[1]}) overlaps node {b[0]} ({b[1]})")
    return out


def nodes_in_group(wf: dict, title_prefix: str) -> list[int]:
    """Ids of the nodes whose top-left corner lies in the group whose title starts with ``title_prefix``."""
    groups = [gr for gr in wf.get("groups", []) if gr.get("title", "").startswith(title_prefix)]
    if len(groups) != 1:
        raise WorkflowError(f"{len(groups)} groups titled {title_prefix!r}...")
    gx, gy, gw, gh = groups[0]["bounding"]
    return [n["id"] for n in wf["nodes"] if gx <= n["pos"][0] <= gx + gw and gy <= n["pos"][1] <= gy + gh]


def with_modes(wf: dict, modes: Mapping[int, int]) -> dict:
    """A copy of the workflow with some nodes' modes changed (what Ctrl+M / Ctrl+B do)."""
    wf = copy.deepcopy(wf)
    for n in wf["nodes"]:
        if n["id"] in modes:
            n["mode"] = modes[n["id"]]
    return wf


def workflow_files(folder) -> list[Path]:
    return sorted(Path(folder).glob("*.json"))
