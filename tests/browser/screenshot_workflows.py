#!/usr/bin/env python3
"""Regenerate docs/workflows/<name>.png: each workflows/*.json as ComfyUI's web frontend shows it.

It also writes workflows/<name>.jpg, the thumbnail the template browser shows for the template.

With --resave it first writes each workflow back as the frontend serializes it after loading
(``app.graph.serialize()``), so the shipped files are in the current frontend's format.

Needs what tests/browser needs (see tests/browser/conftest.py): a ComfyUI checkout in
COMFYUI_PATH, comfyui-frontend-package (the version the host pins) and playwright in the
Python that runs this script (or COMFYUI_PYTHON), and chromium (/usr/bin/chromium).

    COMFYUI_PATH=/path/to/ComfyUI python -m tests.browser.screenshot_workflows [names...]   (from the repository root)

It starts a temporary server (127.0.0.1, free port, stopped at the end), opens the frontend
in headless chromium, drops each workflow on the canvas as a user does, fits the graph to the
view in the frontend's focus mode, and saves the part of the canvas that holds the graph
(rendered at --scale device pixels per CSS pixel, then reduced to a 256-colour palette so a
picture stays small). Model files the workflows name are empty placeholders (nothing runs);
input pictures are a small generated test picture (a missing one would mark LoadImage as an error). Problems the frontend reports while
loading (missing nodes, dialogs, toasts, broken links, invalid values) are printed; with
--strict they make the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from . import comfy_server, frontend

REPO = Path(__file__).resolve().parents[2]


def _save_small_png(raw: Path, out: Path) -> None:
    from PIL import Image
    im = Image.open(raw).convert("RGB")
    pal = im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out.parent.mkdir(parents=True, exist_ok=True)
    pal.save(out, optimize=True)


def _save_thumbnail(raw: Path, out: Path, width: int = 640) -> None:
    """<workflow>.jpg beside the workflow: the picture ComfyUI's template browser shows for it."""
    from PIL import Image
    im = Image.open(raw).convert("RGB")
    im.thumbnail((width, width * 3), Image.Resampling.LANCZOS)
    im.save(out, quality=85, optimize=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="workflow names (file stems); default: all")
    ap.add_argument("--workflows", type=Path, default=REPO / "workflows")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "workflows")
    ap.add_argument("--width", type=int, default=frontend.VIEWPORT["width"])
    ap.add_argument("--height", type=int, default=frontend.VIEWPORT["height"])
    ap.add_argument("--scale", type=float, default=1.5, help="device pixels per CSS pixel (default 1.5)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when the frontend reports a problem")
    ap.add_argument("--resave", action="store_true",
                    help="write each workflow back as the frontend serializes it (its current format)")
    args = ap.parse_args(argv)

    reason = comfy_server.missing_requirements()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    paths = comfy_server.workflow_files(args.workflows)
    if args.names:
        paths = [p for p in paths if p.stem in args.names]
    if not paths:
        print(f"no workflows in {args.workflows}", file=sys.stderr)
        return 2
    workflows = {p: frontend.read_workflow(p) for p in paths}

    from playwright.sync_api import sync_playwright
    problems = 0
    with tempfile.TemporaryDirectory(prefix="imagic_shots_") as tmp:
        tmp = Path(tmp)
        with comfy_server.running_server(tmp / "server", checkpoint=False,
                                         workflows=workflows.values(), images=True) as server, \
                sync_playwright() as pw:
            browser = frontend.launch(pw, comfy_server.find_chromium())
            try:
                ctx = browser.new_context(viewport={"width": args.width, "height": args.height},
                                          device_scale_factor=args.scale)
                fe = frontend.Frontend(ctx.new_page(), server.url)
                fe.open()
                fe.focus_mode()
                for path, wf in workflows.items():
                    t0 = time.perf_counter()
                    report = fe.load(wf, path.stem)
                    # Input pictures are left out on purpose: their combo values are not a problem.
                    picked = [p for p in report.problems
                              if not any(f"{t} widget {w}=" in p for t, w in comfy_server.IMAGE_WIDGETS.items())]
                    for p in picked:
                        print(f"  {path.name}: {p}")
                    problems += len(picked)
                    fe.close_messages()
                    if args.resave:
                        saved = fe.page.evaluate("() => JSON.parse(JSON.stringify(window.app.graph.serialize()))")
                        path.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
                        print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: re-saved")
                    fe.fit_view()
                    raw = tmp / f"{path.stem}.raw.png"
                    fe.page.screenshot(path=str(raw), clip=fe.graph_clip())
                    out = args.out / f"{path.stem}.png"
                    _save_small_png(raw, out)
                    _save_thumbnail(raw, path.with_suffix(".jpg"))
                    from PIL import Image
                    size = Image.open(out).size
                    print(f"{out.relative_to(REPO) if out.is_relative_to(REPO) else out}: "
                          f"{size[0]}x{size[1]}, {out.stat().st_size // 1024} KB, "
                          f"{len(wf['nodes'])} nodes, {time.perf_counter() - t0:.1f} s")
            finally:
                browser.close()
    return 1 if (problems and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
