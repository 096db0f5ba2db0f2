"""What a worker measures (``StageMeter``: time per step, peak memory) and how the parent runs a worker
(``run_child``: a subprocess watched for its memory and time)."""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import threading
import time

GB = 1024 ** 3


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GB
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM, which ru_maxrss reports) for this process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


def mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return float("nan")


class StageMeter:
    """What every worker measures. ``start()`` marks the memory after the build (RSS on CPU, with
    the peak reset; CUDA allocation on GPU) and the start of the clock; the meter itself is the
    core's progress callback, which stamps the end of every step and reads the peak memory at the
    last one (so what a node does after training, handing the result back, is not counted)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.stamps, self.cpu_stamps = [], []
        self.out = {}

    def start(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mem = torch.cuda.memory_allocated() / GB
        else:
            self.out["peak_reset"] = reset_peak_rss()
            self.start_mem = rss_gb()
        self.out["mem_after_build_gb"] = round(self.start_mem, 3)
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def __call__(self, step, total, loss):
        if self.cuda:
            import torch
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        if step == total:
            self.peak_at_last_step = self.peak()

    def peak(self) -> float:
        import torch

        return torch.cuda.max_memory_allocated() / GB if self.cuda else maxrss_gb()

    def result(self, warmup: int, losses) -> dict:
        times = [b - a for a, b in zip([self.t0] + self.stamps[:-1], self.stamps)]
        cpu_times = [b - a for a, b in zip([self.c0] + self.cpu_stamps[:-1], self.cpu_stamps)]
        measured = times[warmup:]
        out = dict(self.out, step_s=[round(t, 4) for t in times], first_step_s=round(times[0], 3),
                   ms_per_step=1000 * statistics.median(measured) if measured else None,
                   cpu_step_s=[round(t, 4) for t in cpu_times],
                   cpu_ms_per_step=1000 * statistics.median(cpu_times[warmup:]) if measured else None,
                   loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None)
        out["peak_gb"] = getattr(self, "peak_at_last_step", None) or self.peak()
        out["peak_increment_gb"] = out["peak_gb"] - self.start_mem
        return out


def _child_rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return 0.0


def run_child(argv, cap_gb: float, timeout_s: float, cuda: bool):
    """Run a worker; kill it if its RSS passes the cap (CPU) or it runs past the timeout."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = dict(killed=None, max_rss=0.0)

    def watch():
        start = time.time()
        while proc.poll() is None:
            r = _child_rss_gb(proc.pid)
            state["max_rss"] = max(state["max_rss"], r)
            if not cuda and r > cap_gb:
                state["killed"] = f"killed: RSS {r:.1f} GB passed the {cap_gb:g} GB cap"
                proc.kill()
            elif time.time() - start > timeout_s:
                state["killed"] = f"killed: ran past the {timeout_s:g} s timeout"
                proc.kill()
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    t.join()
    result = None
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    return proc.returncode, result, state, stderr
