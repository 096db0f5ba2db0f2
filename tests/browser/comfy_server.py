"""A real ComfyUI web server (a subprocess) with this pack loaded, for browser tests and scripts.

Nothing of ComfyUI is vendored: the host is found by ``tests/host/comfy_host.find_comfyui``
(``COMFYUI_PATH``), and its web frontend comes from the ``comfyui_frontend_package`` installed
in the Python that runs the server (the host's own requirements pin its version).

The server runs with a throw-away base directory::

    <tmp>/base/custom_nodes/ComfyUI-Imagic -> this repository (symlink)
    <tmp>/base/models/checkpoints/imagic_tiny_sd15.safetensors   (built at start, ~160 MB)
    <tmp>/base/{input,output,temp,user}

    python main.py --cpu --listen 127.0.0.1 --port <free port> --disable-auto-launch
                   --base-directory <tmp>/base --database-url sqlite:///:memory:

It listens on 127.0.0.1 only, in its own process group; ``stop()`` ends the whole group
(SIGTERM, then SIGKILL) and waits until the port no longer accepts connections.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(os.path.abspath(__file__)).parents[2]
PACK_NAME = "ComfyUI-Imagic"
TINY_CKPT = "imagic_tiny_sd15.safetensors"
HOST = "127.0.0.1"

# Model files that the workflows name, by loader node: (widget name, models/ sub-folder).
# ``provide_files`` puts the tiny SD1.5 checkpoint (checkpoints) or an empty placeholder
# (everything else) under the names a workflow uses, so that the shipped workflows validate
# unchanged. Placeholders are never loaded: only prompts that use the tiny checkpoint run.
MODEL_WIDGETS = {
    "CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
    "ControlNetLoader": ("control_net_name", "controlnet"),
    "LoraLoader": ("lora_name", "loras"),
    "LoraLoaderModelOnly": ("lora_name", "loras"),
    "UpscaleModelLoader": ("model_name", "upscale_models"),
    "VAELoader": ("vae_name", "vae"),
    "ImagicLoadEmbedding": ("embedding", "imagic"),
    "UNETLoader": ("unet_name", "diffusion_models"),
    "CLIPLoader": ("clip_name", "text_encoders"),
    "DualCLIPLoader": ("clip_name1", "text_encoders"),  # and clip_name2: FILE_WIDGETS
}
FILE_WIDGETS = {"DualCLIPLoader": 2}  # loaders whose first N widgets are files (default 1)
IMAGE_WIDGETS = {"LoadImage": "image"}

# Settings written to the server's user folder before the page first opens: no first-run
# template browser, no version toasts, no canvas info overlay, labels drawn at every zoom; a
# workflow loaded by the page is not persisted across reloads. All are ordinary user settings
# (the Settings dialog); the load checks (missing nodes/models warnings, workflow
# validation) are on, as by default.
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Notification.ShowVersionUpdates": False,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
    "Comfy.Validation.Workflows": True,
    "Comfy.Workflow.Persist": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,              # no fps/node counter in the corner
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,      # text stays drawn when zoomed out
    "Comfy.InstalledVersion": "1.27.10",
}


# ----------------------------------------------------------------------------- requirements

def _comfy_host_module():
    """tests/host/comfy_host.py, loaded under a private name (no sys.path change, no package)."""
    name = "_imagic_browser_comfy_host"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tests" / "host" / "comfy_host.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def find_host() -> Path | None:
    """The ComfyUI root (``COMFYUI_PATH``), found as the host tests find it; None when absent."""
    return _comfy_host_module().find_comfyui()


def host_python() -> str:
    """The interpreter that runs the server (``COMFYUI_PYTHON``, else this one)."""
    return os.environ.get("COMFYUI_PYTHON", "").strip() or sys.executable


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM_PATH", "").strip()
    for c in ([env] if env else []) + ["/usr/bin/chromium"]:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing_requirements() -> str | None:
    """Why a browser test cannot run here (None when everything is present)."""
    root = find_host()
    if root is None:
        env = os.environ.get("COMFYUI_PATH", "").strip()
        return ("ComfyUI host not found: set COMFYUI_PATH to a ComfyUI checkout (0.8.0 to 0.33.0)"
                + (f" (COMFYUI_PATH={env!r} is not one)" if env else ""))
    if find_chromium() is None:
        return "chromium not found (/usr/bin/chromium or on PATH; e.g. apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright (Python) not installed: pip install playwright"
    py = host_python()
    try:
        probe = subprocess.run([py, "-c", "import comfyui_frontend_package"], capture_output=True, timeout=60)
        ok = probe.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        return (f"comfyui_frontend_package not importable by {py}: pip install the "
                f"comfyui-frontend-package version pinned in {root / 'requirements.txt'}")
    return None


# ----------------------------------------------------------------------------- helpers

def host_has_flag(root, flag: str) -> bool:
    """Whether the host's command line (comfy/cli_args.py) defines ``flag``: feature detection, not versions."""
    f = Path(root) / "comfy" / "cli_args.py"
    return f.is_file() and f'"{flag}"' in f.read_text(encoding="utf-8")


def templates_json_only(root) -> bool:
    """Whether the host serves a custom node's template folder as JSON files only (its route refuses any
    other name, so thumbnails beside the templates are not served; seen in ComfyUI 0.38's
    app/custom_node_manager.py), rather than as a static folder."""
    f = Path(root) / "app" / "custom_node_manager.py"
    return f.is_file() and 'endswith(".json")' in f.read_text(encoding="utf-8")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def workflow_files(folder: Path | None = None) -> list[Path]:
    folder = Path(folder) if folder else REPO_ROOT / "workflows"
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def tiny_png(path: Path, size: int = 64) -> Path:
    """A small RGB picture with structure (gradient and a square), written with Pillow."""
    from PIL import Image
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = (x * 255 // size, y * 255 // size, 90)
    for y in range(size // 4, size // 2):
        for x in range(size // 3, 2 * size // 3):
            px[x, y] = (245, 230, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


_CKPT_SCRIPT = r"""
import sys, pathlib
repo, tmp, out, cache = sys.argv[1:5]
sys.path.insert(0, repo + "/tests/host")
import comfy_host, checkpoints
comfy_host.import_host(tmp)
out = pathlib.Path(out)
if cache:
    checkpoints.cached_checkpoint(checkpoints.make_sd15_checkpoint, cache, out.name, out.parent)
else:
    checkpoints.make_sd15_checkpoint(out)
"""


def build_tiny_checkpoint(out: Path, work: Path) -> float:
    """Build the tiny SD1.5 checkpoint in a child process (the host imported there, not here).

    ``IMAGIC_HOST_CKPT_CACHE`` (as for tests/host) keeps it between runs. Returns seconds.
    """
    t0 = time.perf_counter()
    cache = os.environ.get("IMAGIC_HOST_CKPT_CACHE", "").strip()
    env = dict(os.environ, COMFYUI_PATH=str(find_host()))
    r = subprocess.run([host_python(), "-c", _CKPT_SCRIPT, str(REPO_ROOT), str(work), str(out), cache],
                       cwd=str(work), env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"building the tiny checkpoint failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the server

@dataclass
class ComfyServer:
    root: Path                       # ComfyUI checkout
    tmp: Path                        # everything this server writes
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    timings: dict = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.tmp / "base"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def models(self, folder: str) -> Path:
        d = self.base / "models" / folder
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- setup ---------------------------------------------------------------------------
    def prepare(self, *, checkpoint: bool = True) -> None:
        for d in ("custom_nodes", "input", "output", "temp", "user/default"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            os.symlink(REPO_ROOT, link, target_is_directory=True)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        settings.write_text(json.dumps(FRONTEND_SETTINGS, indent=1))
        if checkpoint and not (self.models("checkpoints") / TINY_CKPT).exists():
            self.timings["checkpoint_s"] = build_tiny_checkpoint(
                self.models("checkpoints") / TINY_CKPT, self.tmp)

    def provide_files(self, workflows, *, images: bool = True) -> dict[str, list[str]]:
        """Make every model (and, with ``images``, input) file the workflows name exist.

        Checkpoints become links to the tiny SD1.5 checkpoint (when it was built), anything
        else an empty placeholder (see MODEL_WIDGETS); input pictures a small PNG.
        """
        made: dict[str, list[str]] = {}
        tiny = self.models("checkpoints") / TINY_CKPT
        for wf in workflows:
            for node in wf.get("nodes", []):
                t, vals = node.get("type"), node.get("widgets_values")
                if not isinstance(vals, list) or not vals or not isinstance(vals[0], str):
                    continue
                name = vals[0]   # every loader above has its file as its first widget
                if t in MODEL_WIDGETS:
                    folder = MODEL_WIDGETS[t][1]
                    for name in vals[:FILE_WIDGETS.get(t, 1)]:
                        dst = self.models(folder) / name
                        if dst.exists() or dst.is_symlink():
                            continue
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        if folder == "checkpoints" and tiny.exists():
                            os.symlink(tiny, dst)
                        else:
                            dst.write_bytes(b"")
                        made.setdefault(folder, []).append(name)
                elif t in IMAGE_WIDGETS and images:
                    dst = self.base / "input" / name
                    if not dst.exists():
                        tiny_png(dst)
                        made.setdefault("input", []).append(name)
        return made

    # -- run -----------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> None:
        self.port = self.port or free_port()
        self.log_path = self.tmp / "server.log"
        cmd = [host_python(), "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:"]
        if host_has_flag(self.root, "--disable-assets"):  # newer hosts scan assets at start unless told not to
            cmd.append("--disable-assets")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("COMFYUI_PATH", None)
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=str(self.root), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                stats = self.get_json("/system_stats", timeout=2)
                if stats.get("system", {}).get("comfyui_version"):
                    self.timings["server_start_s"] = time.perf_counter() - t0
                    return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """End the server's whole process group; wait until its port is closed."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            # SIGTERM first: a process started in the background of a non-interactive shell
            # has SIGINT ignored, and the server keeps nothing that needs a clean shutdown.
            for sig, wait in ((signal.SIGTERM, timeout / 2), (signal.SIGKILL, timeout / 2)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
                try:
                    p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if p is not None:
            with contextlib.suppress(ProcessLookupError):   # leftovers of the group, if any
                os.killpg(p.pid, signal.SIGKILL)
        if self.port:
            deadline = time.monotonic() + timeout
            while port_open(self.port) and time.monotonic() < deadline:
                time.sleep(0.2)

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except (OSError, AttributeError):
            return ""

    # -- http ----------------------------------------------------------------------------
    def request(self, path: str, data=None, *, method=None, headers=None, timeout=30):
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str, timeout=30):
        status, body = self.request(path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:500]!r}")
        return json.loads(body)

    def post_json(self, path: str, obj, timeout=60):
        status, body = self.request(path, json.dumps(obj).encode(), method="POST",
                                    headers={"Content-Type": "application/json"}, timeout=timeout)
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, body.decode(errors="replace")

    def upload_image(self, path: Path, name: str | None = None, overwrite: bool = True) -> dict:
        """POST /upload/image (multipart, as the frontend's upload button does)."""
        name = name or path.name
        boundary = uuid.uuid4().hex
        parts = [
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n".encode() + path.read_bytes() + b"\r\n",
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\n"
            f"{'true' if overwrite else 'false'}\r\n".encode(),
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\ninput\r\n".encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        status, body = self.request("/upload/image", b"".join(parts), method="POST",
                                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise RuntimeError(f"upload failed: {status} {body[:300]!r}")
        return json.loads(body)

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until nothing runs or waits in the queue."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            q = self.get_json("/queue")
            if not q.get("queue_running") and not q.get("queue_pending"):
                return
            time.sleep(0.3)
        raise TimeoutError("the queue did not empty")

    def cancel(self, prompt_id: str, timeout: float = 120.0) -> None:
        """Take a prompt off the queue, or interrupt it while it runs, until it is gone.

        Repeated because an interrupt that arrives between the worker taking the prompt and
        starting it is cleared by the executor (execution.py resets the flag at the start).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            q = self.get_json("/queue")
            running = [item[1] for item in q.get("queue_running", [])]
            pending = [item[1] for item in q.get("queue_pending", [])]
            if prompt_id in pending:
                self.post_json("/queue", {"delete": [prompt_id]})
            elif prompt_id in running:
                self.post_json("/interrupt", {"prompt_id": prompt_id})
            else:
                return
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} still queued or running after {timeout} s")


@contextlib.contextmanager
def running_server(tmp: Path | None = None, *, checkpoint: bool = True, workflows=(), images: bool = True):
    """Start a server (see module doc) and always stop it; yields the ComfyServer."""
    root = find_host()
    if root is None:
        raise RuntimeError(missing_requirements() or "no host")
    own_tmp = tmp is None
    tmp = Path(tempfile.mkdtemp(prefix="imagic_browser_")) if own_tmp else Path(tmp)
    server = ComfyServer(root=root, tmp=tmp)
    try:
        server.prepare(checkpoint=checkpoint)
        server.provide_files(workflows, images=images)
        server.start()
        yield server
    finally:
        server.stop()
        if own_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
