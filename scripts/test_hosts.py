#!/usr/bin/env python3
"""Run the host and browser suites (tests/host, tests/browser) against each ComfyUI in turn.

    COMFYUI_PATHS=/opt/ComfyUI-0.33:/opt/ComfyUI-0.8 python scripts/test_hosts.py
    python scripts/test_hosts.py /opt/ComfyUI-0.33=/venvs/comfy033/bin/python /opt/ComfyUI-0.8=/venvs/comfy08/bin/python

Each host is ``ROOT`` or ``ROOT=PYTHON``: PYTHON is the environment that host runs in (its
requirements, its pinned comfyui-frontend-package, plus pytest and playwright); without it,
COMFYUI_PYTHON or this interpreter. Hosts come from the arguments, else from COMFYUI_PATHS
(separated by ``os.pathsep``). Every suite runs in its own process with IMAGIC_REQUIRE_HOST=1 and
IMAGIC_REQUIRE_BROWSER=1, so a host that cannot be used fails instead of skipping. Extra pytest
arguments go after ``--``. Prints one summary line per host; exit status 1 if any host failed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _hosts(args) -> list[tuple[Path, str]]:
    entries = args or [e for e in os.environ.get("COMFYUI_PATHS", "").split(os.pathsep) if e.strip()]
    default_python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    hosts = []
    for e in entries:
        root, _, python = e.partition("=")
        hosts.append((Path(root).expanduser().absolute(), python or default_python))
    return hosts


def _version(root: Path) -> str:
    # Shown in the summary only; the harness itself adapts by feature detection.
    f = root / "comfyui_version.py"
    for line in f.read_text().splitlines() if f.is_file() else []:
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "?"


def _counts(junit: Path) -> dict:
    if not junit.is_file():
        return {"tests": 0, "failures": 0, "errors": 1, "skipped": 0}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    hosts = _hosts(argv[: argv.index("--")] if "--" in argv else argv)
    if not hosts:
        print("no hosts: pass ROOT[=PYTHON] arguments or set COMFYUI_PATHS", file=sys.stderr)
        return 2
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="imagic_hosts_") as tmp:
        for i, (root, python) in enumerate(hosts):
            junit = Path(tmp) / f"host{i}.xml"
            env = dict(os.environ, COMFYUI_PATH=str(root), COMFYUI_PYTHON=python,
                       IMAGIC_REQUIRE_HOST="1", IMAGIC_REQUIRE_BROWSER="1")
            env.setdefault("OMP_NUM_THREADS", "1")
            print(f"== ComfyUI {_version(root)} at {root} ({python})", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call([python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                  f"--junitxml={junit}", "tests/host", "tests/browser", *extra], cwd=REPO, env=env)
            c = _counts(junit)
            passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
            failed |= rc != 0
            rows.append((_version(root), str(root), passed, c["failures"] + c["errors"], c["skipped"],
                         time.perf_counter() - t0, rc))
    print("\nhost       passed  failed  skipped  seconds  path")
    for version, root, passed, bad, skipped, secs, rc in rows:
        print(f"{version:<10} {passed:>6}  {bad:>6}  {skipped:>7}  {secs:>7.0f}  {root}" + ("" if rc == 0 else f"  (exit {rc})"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
