"""Fixtures for the browser tests: a real ComfyUI server with this pack, and headless chromium.

Every test here is skipped, with the reason, unless all of these are present:
- a ComfyUI host: ``COMFYUI_PATH`` (as for tests/host; see tests/host/comfy_host.py);
- chromium: /usr/bin/chromium or on PATH (``CHROMIUM_PATH`` to choose another);
- Playwright for Python (``pip install playwright``; its own browser download is not used);
- ``comfyui_frontend_package`` importable by the Python that runs the server
  (``COMFYUI_PYTHON``, default: this interpreter).
``IMAGIC_REQUIRE_BROWSER=1`` turns the skip into a failure. ``IMAGIC_HOST_CKPT_CACHE=<dir>``
keeps the tiny checkpoint between runs (as in tests/host).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import comfy_server, frontend

_HERE = Path(__file__).parent.resolve()


def _required() -> bool:
    return os.environ.get("IMAGIC_REQUIRE_BROWSER", "").strip() not in ("", "0")


def pytest_collection_modifyitems(config, items):
    mine = [i for i in items if _HERE in Path(str(i.fspath)).resolve().parents]
    if not mine:
        return
    reason = comfy_server.missing_requirements()
    if reason is None or _required():
        return
    skip = pytest.mark.skip(reason=reason)
    for item in mine:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The running server (comfy_server.ComfyServer); stopped, and its port checked closed."""
    reason = comfy_server.missing_requirements()
    if reason:
        pytest.fail(reason) if _required() else pytest.skip(reason)
    workflows = [frontend.read_workflow(p) for p in comfy_server.workflow_files()]
    tmp = tmp_path_factory.mktemp("comfy_server")
    with comfy_server.running_server(tmp, workflows=workflows) as srv:
        port = srv.port
        yield srv
    assert not comfy_server.port_open(port), f"port {port} still accepts connections after stop()"
    assert srv.proc is None


@pytest.fixture(scope="session")
def browser(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = frontend.launch(p, comfy_server.find_chromium())
        try:
            yield b
        finally:
            b.close()


def _open(browser, server):
    ctx = browser.new_context(viewport=frontend.VIEWPORT)
    fe = frontend.Frontend(ctx.new_page(), server.url)
    fe.open()
    return ctx, fe


@pytest.fixture(scope="module")
def app_page(browser, server):
    """One page of the frontend, shared by a module's tests (each load replaces the graph)."""
    ctx, fe = _open(browser, server)
    try:
        yield fe
    finally:
        ctx.close()


@pytest.fixture
def fresh_page(browser, server):
    """A page of its own, for a test that changes more than the graph."""
    ctx, fe = _open(browser, server)
    try:
        yield fe
    finally:
        ctx.close()
