"""Run a real ComfyUI host in-process for tests (no web server).

The host is never vendored: point ``COMFYUI_PATH`` at a ComfyUI checkout (the tested range is
ComfyUI 0.8.0 to 0.33.0), or place this repository inside a ComfyUI ``custom_nodes/`` folder.
Host differences are handled by feature detection (signatures, registered node ids), never by
version strings: see ``reset_executor`` and ``call_node``.

Typical use (pytest fixtures in ``conftest.py`` do this)::

    session = HostSession(tmp_dir)          # imports the host once per process
    session.load_pack(REPO_ROOT)            # -> list of node ids the pack registered
    result = session.run_prompt(api_prompt) # validates, then runs the PromptExecutor
    assert result.success, result.error
    result.executed                         # node ids that really ran ("executing" events)

One ``HostSession`` keeps one ``PromptExecutor``, so a second ``run_prompt`` sees the
outputs cached by the first one, exactly as in a running ComfyUI.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

ENV_VAR = "COMFYUI_PATH"
# Set to 1 to turn "host not found" into a failure instead of a skip (for CI that must run them).
REQUIRE_ENV_VAR = "IMAGIC_REQUIRE_HOST"
SKIP_REASON = "ComfyUI host not found: set COMFYUI_PATH to a ComfyUI checkout (0.8.0 to 0.33.0)"

# Not resolved on purpose: a symlink <ComfyUI>/custom_nodes/<pack> -> repo must still count.
REPO_ROOT = Path(os.path.abspath(__file__)).parents[2]

# Top-level module names that ComfyUI owns and that a pack or its tests could shadow
# (this repository has a ``nodes/`` package at its root, and ``python -m pytest`` puts the
# working directory on sys.path).
_HOST_TOP_LEVEL = ("nodes", "execution", "folder_paths", "utils", "comfy", "comfy_extras",
                   "comfy_execution", "comfy_api", "latent_preview", "node_helpers", "server", "app")

# Folders redirected to the session's temporary directory.
MODEL_FOLDERS = ("checkpoints", "loras", "embeddings", "imagic")
PLAIN_FOLDERS = ("input", "output", "temp", "user")

log = logging.getLogger(__name__)


def _is_comfyui(path: Path) -> bool:
    return all((path / p).is_file() for p in
               ("nodes.py", "execution.py", "folder_paths.py", "comfy/model_management.py"))


def find_comfyui() -> Path | None:
    """Return the ComfyUI root, or None.

    ``$COMFYUI_PATH`` wins when set (and must be a ComfyUI checkout, else None); otherwise the
    parent of the ``custom_nodes/`` folder this repository sits in, if any.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        p = Path(env).expanduser().absolute()
        return p if _is_comfyui(p) else None
    candidates = [REPO_ROOT, REPO_ROOT.resolve()]
    pwd = os.environ.get("PWD")  # keeps symlinks (custom_nodes/<pack> -> checkout elsewhere)
    if pwd:
        candidates += [p for p in (Path(pwd), *Path(pwd).parents)
                       if p.parent.name == "custom_nodes" and p.resolve() == REPO_ROOT.resolve()]
    for root in candidates:
        if root.parent.name == "custom_nodes" and _is_comfyui(root.parent.parent):
            return root.parent.parent
    return None


DEVICE_ENV_VAR = "IMAGIC_HOST_DEVICE"


def host_device() -> str:
    """Where the host tests run: "cpu" (default, --cpu) or "cuda" (the host's own defaults)."""
    return os.environ.get(DEVICE_ENV_VAR, "").strip().lower() or "cpu"


def skip_reason() -> str:
    """Why the host tests are skipped (only meaningful when find_comfyui() is None)."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return (f"ComfyUI host not found: COMFYUI_PATH={env!r} is not a ComfyUI checkout "
                "(needs nodes.py, execution.py, folder_paths.py, comfy/model_management.py)")
    return SKIP_REASON



def _outside_event_loop(fn, *args, **kwargs):
    """Call fn where no asyncio loop runs: a thread of its own if this one has a running loop.

    The host's entry points call asyncio.run(); Playwright's sync API (tests/browser, same pytest
    process) leaves a loop running in the main thread, where asyncio.run() refuses to start.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args, **kwargs)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


class HostNotFound(RuntimeError):
    pass


@dataclass
class Host:
    """The imported host: its modules and the temporary folders it was pointed at."""
    root: Path
    dirs: dict[str, Path]          # checkpoints, loras, embeddings, imagic, input, output, temp, user
    nodes: ModuleType
    execution: ModuleType
    folder_paths: ModuleType
    model_management: ModuleType
    comfy: ModuleType
    builtin_import_failed: list = field(default_factory=list)


_HOST: Host | None = None
_ACTIVE_SERVER: "FakeServer | None" = None
_LOADED_PACKS: dict[str, list[str]] = {}


def _evict_shadowing_modules(root: Path) -> None:
    """Drop top-level modules of these names that were imported from somewhere else."""
    root_s = str(root.resolve())
    for name in _HOST_TOP_LEVEL:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        f = getattr(mod, "__file__", None) or ""
        locations = [f] if f else list(getattr(mod, "__path__", []) or [])
        if locations and all(os.path.realpath(x).startswith(root_s + os.sep) for x in locations):
            continue
        log.warning("comfy_host: module %r (%s) shadows ComfyUI's; removing it from sys.modules", name, f)
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]


def _progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
    """Stand-in for main.py's hijack_progress hook: records "progress" events, honours interrupts."""
    from comfy_execution.utils import get_executing_context
    from comfy_execution.progress import get_progress_state
    import comfy.model_management

    server = _ACTIVE_SERVER
    ctx = get_executing_context()
    if prompt_id is None and ctx is not None:
        prompt_id = ctx.prompt_id
    if node_id is None and ctx is not None:
        node_id = ctx.node_id
    if server is not None:
        prompt_id = prompt_id if prompt_id is not None else server.last_prompt_id
        node_id = node_id if node_id is not None else server.last_node_id
    if server is not None and server.progress_callback is not None:
        server.progress_callback(node_id, value, total)
    comfy.model_management.throw_exception_if_processing_interrupted()
    get_progress_state().update_progress(node_id, value, total, preview_image)
    if server is not None:
        server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id,
                                      "node": node_id}, server.client_id)


def import_host(tmp_dir: str | os.PathLike) -> Host:
    """Import ComfyUI in-process, CPU only, with its folders under ``tmp_dir``.

    Idempotent: the first call does the work; later calls (any ``tmp_dir``) return the same
    Host. Raises HostNotFound when find_comfyui() is None.
    """
    global _HOST
    if _HOST is not None:
        return _HOST
    root = find_comfyui()
    if root is None:
        raise HostNotFound(skip_reason())

    root_s = str(root)
    while root_s in sys.path:
        sys.path.remove(root_s)
    sys.path.insert(0, root_s)
    _evict_shadowing_modules(root)

    # 1. CLI args are read at import time by comfy.model_management: CPU before importing it
    #    (unless IMAGIC_HOST_DEVICE=cuda: the host's defaults, so DynamicVRAM on NVIDIA with 0.33).
    #    comfy.options.args_parsing stays False, so pytest's argv is never parsed.
    from comfy.cli_args import args
    on_cpu = host_device() == "cpu"
    args.cpu = on_cpu
    import comfy.model_management as model_management
    if on_cpu and model_management.cpu_state != model_management.CPUState.CPU:
        raise RuntimeError("comfy.model_management was imported before import_host() set args.cpu")
    if not on_cpu and model_management.get_torch_device().type != host_device():
        raise RuntimeError(f"IMAGIC_HOST_DEVICE={host_device()} but the host runs on {model_management.get_torch_device()}")
    # 2. The host's top-level ``utils`` package before ``nodes`` (nodes.py puts comfy/ first
    #    on sys.path, after which ``utils`` would resolve to comfy/utils.py).
    import utils.extra_config  # noqa: F401
    import folder_paths

    tmp = Path(tmp_dir).absolute()
    dirs = {name: tmp / name for name in MODEL_FOLDERS + PLAIN_FOLDERS}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    exts = set(folder_paths.supported_pt_extensions)
    for name in ("checkpoints", "loras", "embeddings"):
        folder_paths.folder_names_and_paths[name] = ([str(dirs[name])], exts)
    folder_paths.folder_names_and_paths["imagic"] = ([str(dirs["imagic"])], set(exts))
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    folder_paths.set_user_directory(str(dirs["user"]))
    folder_paths.filename_list_cache.clear()

    import nodes
    import execution
    import comfy
    import comfy.utils

    failed = _outside_event_loop(asyncio.run, nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    comfy.utils.set_progress_bar_global_hook(_progress_hook)

    _HOST = Host(root=root, dirs=dirs, nodes=nodes, execution=execution, folder_paths=folder_paths,
                 model_management=model_management, comfy=comfy,
                 builtin_import_failed=list(failed or []))
    return _HOST


def _ensure_imagic_folder(host: Host) -> None:
    """Keep the session's imagic folder first, even if a pack (re)registered "imagic"."""
    fp = host.folder_paths
    if "imagic" not in fp.folder_names_and_paths:
        fp.folder_names_and_paths["imagic"] = ([str(host.dirs["imagic"])], set(fp.supported_pt_extensions))
    else:
        fp.add_model_folder_path("imagic", str(host.dirs["imagic"]), is_default=True)
    fp.filename_list_cache.clear()


class PackLoadError(RuntimeError):
    pass


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_pack(pack_dir: str | os.PathLike = REPO_ROOT, *, strict: bool = True) -> list[str]:
    """Load a node pack the way ComfyUI does (``nodes.load_custom_node``).

    Returns the node ids the pack added to ``nodes.NODE_CLASS_MAPPINGS`` (V1 mappings and V3
    ``comfy_entrypoint`` alike). ComfyUI only logs import errors; with ``strict`` (default) a
    failed import raises PackLoadError carrying the logged traceback, otherwise it returns [].
    Loading the same folder again returns the ids of the first load. Needs import_host() first.
    """
    if _HOST is None:
        raise RuntimeError("call import_host(tmp_dir) before load_pack()")
    key = os.path.abspath(pack_dir)
    if key in _LOADED_PACKS:
        return list(_LOADED_PACKS[key])
    nodes = _HOST.nodes
    before = dict(nodes.NODE_CLASS_MAPPINGS)
    cap = _Capture()
    root_logger = logging.getLogger()
    root_logger.addHandler(cap)
    try:
        ok = _outside_event_loop(asyncio.run, nodes.load_custom_node(key))
    finally:
        root_logger.removeHandler(cap)
    added = [k for k, v in nodes.NODE_CLASS_MAPPINGS.items() if before.get(k) is not v]
    _ensure_imagic_folder(_HOST)
    if not ok:
        if strict:
            raise PackLoadError(f"ComfyUI could not load the pack at {key}:\n" + "\n".join(cap.messages))
        return []
    _LOADED_PACKS[key] = added
    return added


class PromptValidationError(AssertionError):
    def __init__(self, error, node_errors):
        self.error = error
        self.node_errors = node_errors
        lines = [f"prompt failed validation: {error}"] if error else ["prompt failed validation"]
        for nid, e in (node_errors or {}).items():
            for r in e.get("errors", []):
                lines.append(f"  node {nid} ({e.get('class_type')}): {r.get('message')}: {r.get('details')}")
        super().__init__("\n".join(lines))


class FakeServer:
    """The parts of server.PromptServer that execution.py and the progress handler use."""

    def __init__(self):
        self.client_id: str | None = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.events: list[tuple[str, Any]] = []
        self.progress_callback: Callable[[str, int, int], None] | None = None

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def queue_updated(self):
        pass


@dataclass
class RunResult:
    prompt_id: str
    success: bool
    status_messages: list            # [(event, data)] from PromptExecutor.status_messages
    outputs: dict                    # history_result["outputs"]: node id -> ui dict
    executed: list[str]              # node ids in the order they really ran ("executing" events)
    cached: list[str]                # node ids reported as cached at the start ("execution_cached")
    events: list                     # every (event, data) the fake server received
    error: dict | None               # the "execution_error"/"execution_interrupted" data, if any

    @property
    def progress(self) -> list[dict]:
        return [d for e, d in self.events if e == "progress"]

    def image_paths(self, node_id: str, output_dir: str | os.PathLike | None = None) -> list[Path]:
        """Files that a SaveImage-like node reported under outputs[node_id]["images"]."""
        base = Path(output_dir) if output_dir is not None else Path(_HOST.folder_paths.get_output_directory())
        out = []
        for img in self.outputs.get(node_id, {}).get("images", []):
            d = base if img.get("type", "output") == "output" else Path(
                _HOST.folder_paths.get_directory_by_type(img["type"]))
            out.append(d / img.get("subfolder", "") / img["filename"])
        return out

    def raise_for_error(self) -> "RunResult":
        if not self.success:
            e = self.error or {}
            raise AssertionError(
                f"prompt failed at node {e.get('node_id')} ({e.get('node_type')}): "
                f"{e.get('exception_type')}: {e.get('exception_message')}\n"
                + "".join(e.get("traceback") or []))
        return self


class HostSession:
    """One imported host plus one PromptExecutor (so caching across runs is observable)."""

    def __init__(self, tmp_dir: str | os.PathLike, cache_type=None):
        self.host = import_host(tmp_dir)
        self.server = FakeServer()
        self.cache_type = cache_type
        self.executor = None
        self.reset_executor()

    # convenience access to the host
    @property
    def nodes(self):
        return self.host.nodes

    @property
    def execution(self):
        return self.host.execution

    @property
    def folder_paths(self):
        return self.host.folder_paths

    @property
    def dirs(self) -> dict[str, Path]:
        return self.host.dirs

    def load_pack(self, pack_dir: str | os.PathLike = REPO_ROOT, *, strict: bool = True) -> list[str]:
        return load_pack(pack_dir, strict=strict)

    def save_and_reload_lora(self, model, lora, name: str):
        """What a user does with the Fine-tune node's LORA_MODEL: stock Save LoRA Weights, the file moved into
        models/loras, stock LoraLoaderModelOnly on ``model``. Returns (the MODEL it gives, the host's
        "lora key not loaded" warnings while loading)."""
        import shutil

        import torch

        call_node("SaveLoRA", lora=lora, prefix=f"loras/{name}")
        # The saver's counter only: "x_*" would also match the files of a longer name "x_fast".
        saved = sorted((self.dirs["output"] / "loras").glob(f"{name}_[0-9][0-9][0-9][0-9][0-9]_.safetensors"))[-1]
        shutil.copy(saved, self.dirs["loras"] / saved.name)
        self.folder_paths.filename_list_cache.clear()
        cap = _Capture()
        logging.getLogger().addHandler(cap)
        try:
            with torch.inference_mode():
                stock = self.nodes.LoraLoaderModelOnly().load_lora_model_only(model, saved.name, 1.0)[0]
        finally:
            logging.getLogger().removeHandler(cap)
        return stock, [m for m in cap.messages if "lora key not loaded" in m]

    def reset_executor(self) -> None:
        """A fresh PromptExecutor: forgets every cached output."""
        ex = self.host.execution
        ct = self.cache_type if self.cache_type is not None else ex.CacheType.CLASSIC
        kwargs = {}
        if "cache_args" in inspect.signature(ex.PromptExecutor).parameters:
            # Since v0.3.68 the executor reads its RAM limits from cache_args at every run; these are
            # the values main.py passes with --cache-classic.
            kwargs["cache_args"] = {"lru": 0, "ram": 0, "ram_inactive": 0}
        self.executor = ex.PromptExecutor(self.server, cache_type=ct, **kwargs)

    def validate(self, prompt: dict, prompt_id: str | None = None,
                 partial_execution_list: list[str] | None = None) -> list[str]:
        """Run execution.validate_prompt; return the output node ids or raise PromptValidationError."""
        pid = prompt_id or str(uuid.uuid4())
        ok, error, outputs, node_errors = _outside_event_loop(asyncio.run, 
            self.host.execution.validate_prompt(pid, prompt, partial_execution_list))
        if not ok or node_errors:
            raise PromptValidationError(error, node_errors)
        return outputs

    def run_prompt(self, prompt: dict, *, outputs: list[str] | None = None, check: bool = False,
                   progress_callback: Callable[[str, int, int], None] | None = None) -> RunResult:
        """Validate (raises PromptValidationError) then execute an API-format prompt.

        ``outputs``: run only these output nodes (partial execution). ``check``: raise
        AssertionError with the node's traceback if execution failed. ``progress_callback``
        (node_id, value, total) is called from every comfy.utils.ProgressBar update, before the
        host's interrupt check (call ``self.interrupt()`` in it to test interruption).
        """
        global _ACTIVE_SERVER
        prompt_id = str(uuid.uuid4())
        execute_outputs = self.validate(prompt, prompt_id, outputs)
        server = self.server
        server.events = []
        server.last_prompt_id = prompt_id
        server.progress_callback = progress_callback
        _ACTIVE_SERVER = server
        try:
            _outside_event_loop(self.executor.execute, prompt, prompt_id, {"client_id": "comfy-host-tests"}, execute_outputs)
        finally:
            _ACTIVE_SERVER = None
            server.progress_callback = None
            self.host.nodes.interrupt_processing(False)
        ex = self.executor
        events = list(server.events)
        executed = [d["node"] for e, d in events if e == "executing" and d.get("node") is not None]
        cached = next((list(d["nodes"]) for e, d in ex.status_messages if e == "execution_cached"), [])
        error = next((d for e, d in ex.status_messages
                      if e in ("execution_error", "execution_interrupted")), None)
        result = RunResult(prompt_id=prompt_id, success=bool(ex.success) and error is None,
                           status_messages=list(ex.status_messages),
                           outputs=dict(ex.history_result.get("outputs", {})), executed=executed,
                           cached=cached, events=events, error=error)
        if check:
            result.raise_for_error()
        return result

    def interrupt(self) -> None:
        """Ask the running prompt to stop (what the UI's Cancel button does)."""
        self.host.nodes.interrupt_processing(True)


def call_node(node_id: str, **inputs):
    """Run a registered node as the executor would (inference mode), returning its outputs as a tuple.

    Works for V3 nodes (``execute`` classmethod returning a NodeOutput) and V1 nodes (``FUNCTION``),
    so a test does not depend on which form a stock node has in this host.
    """
    import torch

    cls = _HOST.nodes.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():
        if hasattr(cls, "GET_SCHEMA"):
            out = cls.execute(**inputs)
            return tuple(out.args) if out is not None else ()
        return tuple(getattr(cls(), cls.FUNCTION)(**inputs))


_DEFAULT_SESSION: HostSession | None = None


def default_session(tmp_dir: str | os.PathLike | None = None) -> HostSession:
    """The process-wide HostSession (created on first use; tmp_dir needed then)."""
    global _DEFAULT_SESSION
    if _DEFAULT_SESSION is None:
        if tmp_dir is None:
            raise RuntimeError("default_session() needs tmp_dir on first use")
        _DEFAULT_SESSION = HostSession(tmp_dir)
    return _DEFAULT_SESSION


def run_prompt(prompt: dict, **kw) -> RunResult:
    """run_prompt on the process-wide session (import_host/default_session must have run)."""
    return default_session().run_prompt(prompt, **kw)
