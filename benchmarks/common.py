"""What every benchmark shares: the repository on ``sys.path``, checks that what a run needs is installed
(before any work), the machine and host it ran on, and the toy edit cases.

Import it first in a benchmark script (``import common``): the scripts run as ``python benchmarks/X.py``.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GB = 1024 ** 3


def require(*modules: str, extra: str = "bench") -> None:
    """Exit at once, naming the install, when a module this run needs is missing (not after an hour of work)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{Path(sys.argv[0]).name}: needs {', '.join(missing)}, which is not installed: "
                 f'pip install -e ".[{extra}]" (from the repository root)')


HOST_FILES = ("nodes.py", "execution.py", "folder_paths.py", "comfy/model_management.py")


def comfyui_root():
    """The ComfyUI folder that COMFYUI_PATH points to, or None."""
    env = os.environ.get("COMFYUI_PATH", "").strip()
    if not env:
        return None
    root = Path(env).expanduser().absolute()
    return root if all((root / f).is_file() for f in HOST_FILES) else None


def host_version(root) -> str:
    """ComfyUI's version, read from its comfyui_version.py (without importing the host here)."""
    try:
        text = (Path(root) / "comfyui_version.py").read_text()
        return text.split("__version__", 1)[1].split("=", 1)[1].strip().split()[0].strip("\"'")
    except (OSError, IndexError):
        return "unknown"


def machine_info(device: str, backend: str = "diffusers") -> dict:
    import torch

    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:  # the host backend does not need it
        diffusers_version = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                diffusers=diffusers_version, python=platform.python_version(), device=device,
                ram_total_gb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / GB, 1)
    if backend == "host":
        info["comfyui"] = host_version(comfyui_root())
        info["comfyui_path"] = str(comfyui_root())
    return info


def machine_summary() -> str:
    """One line for a result's metadata: CPU or GPU, cores, torch threads, torch version."""
    m = machine_info("cuda" if _cuda() else "cpu")
    return (f"{m.get('gpu', m['cpu'])}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
            f"Python {m['python']}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- the toy's edit cases
EDIT_KINDS = ("colour", "shape", "size", "position")


def edit_cases(n: int, offset: int = 0):
    """n fixed cases on test-split images of the toy data, cycling through the four attribute kinds."""
    import numpy as np

    from imagic.toy import data

    cases = []
    for i, seed in enumerate(data.split_seeds("test", n, offset)):
        ex = data.make_example(seed)
        kind = EDIT_KINDS[i % len(EDIT_KINDS)]
        choices = [v for v in data.ATTRIBUTES[kind] if v != ex.attrs[kind]]
        new = choices[np.random.default_rng(seed).integers(len(choices))]
        target = {**ex.attrs, kind: new}
        cases.append(dict(seed=seed, kind=kind, source=ex.attrs, target=target, image=ex.image,
                          ideal=data.render(target, ex.details), text=data.caption(target)))
    return cases


# The harder cases (issue #22): two attributes at once, the non-rigid edits (position, shape, size), and
# backgrounds with structure the model never saw (textures on top of the gradient) that must survive.
HARD_KINDS = ("colour", "shape", "size", "position", "colour+size", "shape+position")
TEXTURES = ("none", "waves", "stripes")


def hard_edit_cases(n: int, offset: int = 0):
    """n fixed cases on test-split images, cycling through HARD_KINDS; within a kind the background
    cycles through TEXTURES (the gradient alone, coarse waves on it, fine stripes on it).

    Each case: the photo (``image``), what changes (``attrs_changed``), the ideal edit (the target attributes
    drawn with the photo's own background, texture and jitter), the target text and the photo's caption
    (``source_text``: FlowEdit and RF-Inversion may use it; Imagic never does).
    """
    import numpy as np

    from imagic.toy import data

    cases = []
    for i, seed in enumerate(data.split_seeds("test", n, 50_000 + offset)):  # away from edit_cases' seeds
        ex = data.make_example(seed)
        kind = HARD_KINDS[i % len(HARD_KINDS)]
        texture_kind = TEXTURES[(i // len(HARD_KINDS)) % len(TEXTURES)]
        rng = np.random.default_rng([seed, 22])  # its own stream: the photo's attributes and details stay make_example's
        texture = None if texture_kind == "none" else data.sample_texture(rng, texture_kind)
        target = dict(ex.attrs)
        for attr in kind.split("+"):
            choices = [v for v in data.ATTRIBUTES[attr] if v != ex.attrs[attr]]
            target[attr] = choices[int(rng.integers(len(choices)))]
        cases.append(dict(seed=seed, kind=kind, attrs_changed=tuple(kind.split("+")), texture=texture_kind,
                          source=ex.attrs, target=target, details=ex.details,
                          image=data.render(ex.attrs, ex.details, texture=texture),
                          ideal=data.render(target, ex.details, texture=texture),
                          text=data.caption(target), source_text=data.caption(ex.attrs)))
    return cases
