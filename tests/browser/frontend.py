"""Drive ComfyUI's own web frontend (comfyui-frontend-package) with Playwright + Debian chromium.

Everything goes through the frontend's own code paths:

- loading: a ``drop`` event carrying the workflow as a ``File`` is dispatched on the graph
  canvas, exactly what dragging a .json file from the desktop does; the frontend's document
  drop handler calls ``app.handleFile`` -> ``app.loadGraphData`` (schema validation with
  link repair, missing node types, missing models dialog, ``graph.configure``);
- what the frontend reports while loading: the list of missing node types that
  ``loadGraphData`` passes to extensions' ``afterConfigureGraph`` hook (caught by a small
  extension registered with ``app.registerExtension``), the dialogs (missing nodes/models,
  load errors) and toasts ("Workflow Validation", "Workflow Links Fixed", schema alerts);
- checks on the configured graph (``app.graph``): every link joins existing nodes and slots
  whose types ``LiteGraph.isValidConnection`` accepts, every combo value is one of the widget's
  options, every number lies within its widget's min/max, and ``node.serialize()`` gives back
  the same ``widgets_values`` the file had (a positional mismatch shows up there);
- conversion: ``app.graphToPrompt()`` (the same function the Run button uses);
- running: the Run button; results read from the backend's /history (what the Run button queued).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1600, "height": 900}


def read_workflow(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def launch(playwright, executable_path: str):
    return playwright.chromium.launch(executable_path=executable_path, headless=True, args=CHROMIUM_ARGS)


# Registered once per page: records what loadGraphData hands to afterConfigureGraph.
_INSTALL_JS = """
() => {
  if (window.__imagicLoads) return;
  window.__imagicLoads = [];
  window.app.registerExtension({
    name: "Imagic.BrowserTest",
    afterConfigureGraph(missingNodeTypes) {
      window.__imagicLoads.push({
        missing: (missingNodeTypes || []).map(m => typeof m === "string" ? m : (m.type + " (" + (m.hint || "") + ")")),
        nodes: window.app.graph.nodes.length,
      });
    },
  });
}
"""

# Drop a workflow file on the canvas (the user's drag and drop).
_DROP_JS = """
async ([text, name]) => {
  const file = new File([text], name, { type: "application/json" });
  const dt = new DataTransfer();
  dt.items.add(file);
  const canvas = document.querySelector("#graph-canvas") || document.querySelector("canvas");
  const r = canvas.getBoundingClientRect();
  const opts = { bubbles: true, cancelable: true, dataTransfer: dt,
                 clientX: r.left + r.width / 2, clientY: r.top + r.height / 2 };
  canvas.dispatchEvent(new DragEvent("dragenter", opts));
  canvas.dispatchEvent(new DragEvent("dragover", opts));
  canvas.dispatchEvent(new DragEvent("drop", opts));
  return true;
}
"""

# Checks on the configured graph; `wf` is the file as loaded.
_CHECK_JS = """
(wf) => {
  const g = window.app.graph;
  const LG = window.LiteGraph;
  const problems = { links: [], widgets: [], serialized: [], node_errors: [] };
  const links = g.links instanceof Map ? [...g.links.values()] : Object.values(g.links || {});
  const title = n => n ? `#${n.id} ${n.type}` : "?";
  for (const l of links) {
    if (!l) continue;
    const o = g.getNodeById(l.origin_id), t = g.getNodeById(l.target_id);
    if (!o || !t) { problems.links.push(`link ${l.id}: missing node (${l.origin_id} -> ${l.target_id})`); continue; }
    const out = o.outputs?.[l.origin_slot], inp = t.inputs?.[l.target_slot];
    if (!out) { problems.links.push(`link ${l.id}: ${title(o)} has no output slot ${l.origin_slot}`); continue; }
    if (!inp) { problems.links.push(`link ${l.id}: ${title(t)} has no input slot ${l.target_slot}`); continue; }
    if (!(out.links || []).includes(l.id)) problems.links.push(`link ${l.id}: not in ${title(o)}.outputs[${l.origin_slot}].links`);
    if (inp.link !== l.id) problems.links.push(`link ${l.id}: ${title(t)}.inputs[${l.target_slot}] (${inp.name}) holds link ${inp.link}`);
    if (!LG.isValidConnection(out.type, inp.type))
      problems.links.push(`link ${l.id}: ${title(o)}.${out.name} (${out.type}) -> ${title(t)}.${inp.name} (${inp.type}): types do not connect`);
  }
  const fileLinks = (wf.links || []).length;
  if (links.filter(Boolean).length !== fileLinks)
    problems.links.push(`the file has ${fileLinks} links, the loaded graph ${links.filter(Boolean).length}`);
  const fileNodes = new Map((wf.nodes || []).map(n => [n.id, n]));
  for (const n of g.nodes) {
    for (const inp of n.inputs || []) {
      if (inp.link != null && !links.some(l => l && l.id === inp.link))
        problems.links.push(`${title(n)}.${inp.name}: dangling link ${inp.link}`);
    }
    if (n.has_errors) problems.node_errors.push(`${title(n)}: has_errors`);
    const muted = n.mode === 2 || n.mode === 4;
    for (const w of n.widgets || []) {
      if (w.type === "button" || w.name === "upload") continue;
      let v = w.value;
      const where = `${title(n)}${muted ? " (muted/bypassed)" : ""} widget ${w.name}=${JSON.stringify(v)}`;
      if (w.type === "combo") {
        let vals = w.options?.values;
        if (typeof vals === "function") vals = vals(w, n);
        if (Array.isArray(vals) && !vals.includes(v)) problems.widgets.push(`${where}: not one of its ${vals.length} options`);
      } else if (w.type === "number" || typeof v === "number") {
        if (typeof v !== "number" || Number.isNaN(v)) problems.widgets.push(`${where}: not a number`);
        else {
          const o = w.options || {};
          if (o.min != null && v < o.min) problems.widgets.push(`${where}: below min ${o.min}`);
          if (o.max != null && v > o.max) problems.widgets.push(`${where}: above max ${o.max}`);
        }
      } else if (v === undefined || v === null) {
        problems.widgets.push(`${where}: no value`);
      }
    }
    const f = fileNodes.get(n.id);
    if (f && Array.isArray(f.widgets_values)) {
      const s = n.serialize().widgets_values || [];
      if (JSON.stringify(s) !== JSON.stringify(f.widgets_values))
        problems.serialized.push(`${title(n)}: file widgets_values ${JSON.stringify(f.widgets_values)} != loaded ${JSON.stringify(s)}`);
    }
  }
  return { nodes: g.nodes.length, file_nodes: (wf.nodes || []).length, n_links: links.filter(Boolean).length, ...problems };
}
"""

# Dialogs and toasts that are on screen.
_UI_MESSAGES_JS = """
() => {
  const vis = e => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);
  const text = e => (e.innerText || "").replace(/\\s+/g, " ").trim();
  return {
    dialogs: [...document.querySelectorAll(".p-dialog")].filter(vis).map(text),
    toasts: [...document.querySelectorAll(".p-toast-message")].filter(vis).map(text),
  };
}
"""

_CLOSE_UI_JS = """
() => {
  for (const b of document.querySelectorAll(".p-toast-close-button, .p-dialog-close-button")) b.click();
}
"""


@dataclass
class LoadReport:
    name: str
    missing_node_types: list = field(default_factory=list)
    dialogs: list = field(default_factory=list)
    toasts: list = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    load_s: float = 0.0
    drop_problems: list = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = list(self.drop_problems)
        out += [f"missing node type: {m}" for m in self.missing_node_types]
        out += [f"dialog: {d[:500]}" for d in self.dialogs]
        out += [f"toast: {t[:500]}" for t in self.toasts]
        for k in ("links", "widgets", "serialized", "node_errors"):
            out += [f"{k}: {p}" for p in self.checks.get(k, [])]
        if self.checks and self.checks.get("nodes") != self.checks.get("file_nodes"):
            out.append(f"nodes: the file has {self.checks.get('file_nodes')}, the graph {self.checks.get('nodes')}")
        return out


class Frontend:
    """One page of the ComfyUI frontend."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url
        self.console: list[str] = []
        self.failed_requests: list[str] = []
        self.page_errors: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        # (page errors before the first load, e.g. while the app starts, are the frontend's own)
        page.on("response", lambda r: self.failed_requests.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    def open(self, timeout_ms: int = 180_000) -> float:
        t0 = time.perf_counter()
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=timeout_ms)
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.app.vueAppReady",
                                    timeout=timeout_ms)
        self.page.evaluate(_INSTALL_JS)
        return time.perf_counter() - t0

    def close_messages(self) -> None:
        self.page.evaluate(_CLOSE_UI_JS)
        self.page.wait_for_timeout(300)

    def ui_messages(self) -> dict:
        return self.page.evaluate(_UI_MESSAGES_JS)

    def load(self, workflow: dict, name: str, timeout_ms: int = 60_000, settle_ms: int = 800) -> LoadReport:
        """Drop ``workflow`` on the canvas as ``<name>.json``; what the frontend reported.

        When the drop does not get as far as configuring the graph (a page error, or nothing
        within the timeout), that is reported as a problem and the workflow is then loaded
        with ``app.loadGraphData`` (the function the drop handler ends in), so that the rest
        of the checks still run.
        """
        self.close_messages()
        before = self.page.evaluate("() => window.__imagicLoads.length")
        errors_before = len(self.page_errors)
        drop_problems: list[str] = []
        t0 = time.perf_counter()
        self.page.evaluate(_DROP_JS, [json.dumps(workflow), f"{name}.json"])
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            if self.page.evaluate(f"() => window.__imagicLoads.length > {before}"):
                break
            if len(self.page_errors) > errors_before or time.monotonic() > deadline:
                self.page.wait_for_timeout(300)
                errs = self.page_errors[errors_before:] or [f"nothing loaded within {timeout_ms} ms"]
                drop_problems = [f"drag and drop of {name}.json did not load it: {e}" for e in errs]
                self.page.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true, null); }", workflow)
                break
            self.page.wait_for_timeout(50)
        load_s = time.perf_counter() - t0
        self.page.wait_for_timeout(settle_ms)   # dialogs and toasts are shown after the hook
        rec = self.page.evaluate(f"() => window.__imagicLoads[{before}] || null") or {"missing": []}
        ui = self.ui_messages()
        checks = self.page.evaluate(_CHECK_JS, workflow)
        return LoadReport(name=name, missing_node_types=rec["missing"], dialogs=ui["dialogs"],
                          toasts=ui["toasts"], checks=checks, load_s=load_s, drop_problems=drop_problems)

    def graph_to_prompt(self) -> dict:
        """``app.graphToPrompt()``: {"output": API prompt, "workflow": UI workflow}."""
        return self.page.evaluate("async () => JSON.parse(JSON.stringify(await window.app.graphToPrompt()))")

    def nodes_of_type(self, node_type: str) -> list[int]:
        return self.page.evaluate("(t) => window.app.graph.nodes.filter(n => n.type === t).map(n => n.id)", node_type)

    def set_widget(self, node_id: int, name: str, value) -> None:
        """Set a widget as the UI does (value, then its callback), through the graph API."""
        ok = self.page.evaluate("""([id, name, value]) => {
            const n = window.app.graph.getNodeById(id);
            const w = n && (n.widgets || []).find(w => w.name === name);
            if (!w) return false;
            w.value = value;
            w.callback?.(value, window.app.canvas, n);
            n.setDirtyCanvas?.(true, true);
            return true;
        }""", [node_id, name, value])
        if not ok:
            raise KeyError(f"node {node_id} has no widget {name!r}")

    def set_widgets_by_type(self, node_type: str, **values) -> list[int]:
        ids = self.nodes_of_type(node_type)
        for i in ids:
            for k, v in values.items():
                self.set_widget(i, k, v)
        return ids

    def refresh_combos(self) -> None:
        """The frontend's 'Refresh node definitions' (R key): new files appear in combos."""
        self.page.evaluate("async () => { await window.app.refreshComboInNodes(); }")

    def graph_bounds(self) -> list[float]:
        """[x, y, w, h] of all nodes (title bars included) and groups, in graph units."""
        return self.page.evaluate("""() => {
            let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
            const add = b => { if (!b) return; x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
                               x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]); };
            for (const n of window.app.graph.nodes) add(n.boundingRect);
            for (const g of window.app.graph.groups || []) add(g.boundingRect || g._bounding);
            return isFinite(x0) ? [x0, y0, x1 - x0, y1 - y0] : [0, 0, 0, 0];
        }""")

    def fit_view(self, zoom: float = 0.96) -> None:
        """Fit the whole graph in the canvas (the canvas' own DragAndScale.fitToBounds, as the
        'Fit view' button, but over groups too and with a margin)."""
        self.page.evaluate("""([b, zoom]) => {
            const c = window.app.canvas;
            c.deselectAll?.();
            c.ds.fitToBounds(b, { zoom });
            c.setDirty(true, true);
        }""", [self.graph_bounds(), zoom])
        self.page.wait_for_timeout(400)

    def focus_mode(self) -> None:
        """The frontend's focus mode (menus and side bar hidden), plus the canvas' corner
        buttons hidden, for pictures of the graph."""
        self.page.evaluate("async () => { await window.app.extensionManager.command.execute('Workspace.ToggleFocusMode'); }")
        self.page.add_style_tag(content=".comfy-menu-hamburger, .graph-canvas-panel .p-buttongroup "
                                        "{ visibility: hidden !important; }")
        self.page.wait_for_timeout(400)

    def graph_clip(self, margin: float = 16) -> dict:
        """The page rectangle (CSS pixels) that shows the whole graph, for page.screenshot(clip=)."""
        b = self.graph_bounds()
        r = self.page.evaluate("""([b, m]) => {
            const c = window.app.canvas, ds = c.ds;
            const rect = c.canvas.getBoundingClientRect();
            const x = rect.left + (b[0] + ds.offset[0]) * ds.scale, y = rect.top + (b[1] + ds.offset[1]) * ds.scale;
            const x0 = Math.max(rect.left, x - m), y0 = Math.max(rect.top, y - m);
            const x1 = Math.min(rect.right, x + b[2] * ds.scale + m), y1 = Math.min(rect.bottom, y + b[3] * ds.scale + m);
            return { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
        }""", [b, margin])
        return {k: round(v) for k, v in r.items()}

    def wait_unblocked(self, timeout_ms: int = 60_000) -> None:
        """Wait until no full-screen BlockUI mask covers the page (the app shows one while it loads, e.g.
        while node definitions refresh). PrimeVue removes the mask at the end of its leave animation
        (``unblock`` adds ``p-overlay-mask-leave``, then waits for ``animationend``); when block and unblock
        come close together, as on a busy machine, that event never comes and the mask stays over the
        page with nothing loading (seen on frontend 1.49.6: the Run click timed out behind it). A mask
        already leaving gets the event it waits for; one still blocking is waited for."""
        self.page.wait_for_function(
            """() => {
                document.querySelectorAll('.p-blockui-mask.p-overlay-mask-leave')
                    .forEach(m => m.dispatchEvent(new Event('animationend')));
                return !document.querySelector('.p-blockui-mask');
            }""", timeout=timeout_ms, polling=250)

    def click_run(self) -> None:
        """The Run button of the top bar (queues the current graph via app.queuePrompt)."""
        btn = self.page.locator("button", has_text="Run").first
        btn.wait_for(state="visible", timeout=30_000)
        self.wait_unblocked()
        btn.click()

    def output_images(self) -> list[str]:
        """``src`` of every picture served by the backend's /view that the page shows."""
        return self.page.evaluate(
            "() => [...document.querySelectorAll('img')].map(i => i.src).filter(s => s.includes('/view?'))")
