"""The speed benchmark's report: ratios to the baseline, the Markdown table, the JSON, and merging runs."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .configs import HOST_MODEL_CLASS


def fmt(x, digits=0):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def stage2_what(r) -> str:
    if r["stage"] == "embedding":
        return "–"
    if r["cfg"]["method"] == "lora":
        return "LoRA r4"
    return "full (in-place)" if r["cfg"]["full_impl"] == "inplace" else "full (core FullDelta)"


def row_backend(r: dict, report: dict) -> str:
    return r.get("backend", report["settings"].get("backend", "diffusers"))


def add_ratios(report) -> None:
    """Time and memory of every measured row over the baseline row of the same stage and backend."""
    rows = report["rows"]
    for r in rows:
        r.pop("time_ratio", None), r.pop("cpu_ratio", None), r.pop("mem_ratio", None)
    for key in {(row_backend(r, report), r["stage"]) for r in rows}:
        group = [r for r in rows if (row_backend(r, report), r["stage"]) == key and r["status"] == "ok"]
        # The paper baseline (the diffusers in-place run) where it was measured, for both backends.
        paper = [r for r in rows if row_backend(r, report) == "diffusers" and r["stage"] == key[1]
                 and r["name"] == "baseline" and r["status"] == "ok"]
        base = paper[0] if paper else next((r for r in group if r["name"] == "baseline"), None)
        if base is None:
            continue
        for r in group:
            r["time_ratio"] = r["ms_per_step"] / base["ms_per_step"]
            if r.get("cpu_ms_per_step") and base.get("cpu_ms_per_step"):
                r["cpu_ratio"] = r["cpu_ms_per_step"] / base["cpu_ms_per_step"]
            r["mem_ratio"] = r["peak_gb"] / base["peak_gb"]


def markdown(report) -> str:
    m, s = report["machine"], report["settings"]
    cuda = s["device"] == "cuda"
    backends = sorted({row_backend(r, report) for r in report["rows"]} | {s.get("backend", "diffusers")})
    host = "host" in backends
    mixed = len(backends) > 1  # merged runs of both backends: a backend column
    ok_host = [r for r in report["rows"] if r["status"] == "ok" and row_backend(r, report) == "host"]
    software = f"torch {m['torch']}" + (f", diffusers {m['diffusers']}" if "diffusers" in backends else "") \
        + (f", ComfyUI {m.get('comfyui', '?')}" if host else "")
    lines = [f"### {s['model'].upper()} UNet ({report['params'] / 1e6:,.0f} M parameters, random weights"
             + ("; tiny testing config, not the real UNet" if s.get("tiny") else "") + "), "
             f"latent {s['latent']}x{s['latent']} ({s['latent'] * 8} px), {s['device']}, "
             + " and ".join("ComfyUI host" if b == "host" else b for b in backends),
             "",
             f"{m.get('gpu', m['cpu'])}, {m['cores']} CPU cores, {software}, "
             f"{m['date']}, load average at start {fmt(m.get('loadavg_start', [None])[0], 1)}. "
             f"{s.get('threads', m['torch_threads'])} torch thread(s). "
             f"{s['warmup']} warm-up + {s['steps']} measured steps per configuration, each configuration in a "
             f"fresh process; ms/step is the median wall time of the measured steps"
             + ("" if cuda else ", CPU ms/step the median process CPU time (all threads) of the same steps, "
                "less sensitive to other jobs on the machine")
             + f". Memory cap {s['cap_gb']:g} GB.",
             ""]
    if host:
        r0 = ok_host[0] if ok_host else {}
        lines += [f"Backend: the ComfyUI host (`comfy.supported_models.{HOST_MODEL_CLASS[s['model']]}`"
                  + ("" if s.get("tiny") else ", with the UNet config the host detects for the real checkpoint")
                  + f", `get_model`, in a `ModelPatcher`; the host's attention "
                  f"`{r0.get('attention', '?')}`). Each stage runs as the nodes run it: `ComfyDenoiser` on the nodes' private training model, "
                  "`den.loaded(gradient_checkpointing=...)`, then `optimize_embedding` / `finetune` of the core.",
                  ""]
    after = {"host": "loading the model (`load_models_gpu`)", "diffusers": "building the model"}
    after = " (diffusers) or ".join(after[b] for b in backends) + (" (host)" if mixed else "")
    if cuda:
        lines.append("Memory: peak `torch.cuda.max_memory_allocated` during the stage (weights included); "
                     f"+GB = that peak minus the allocation right after {after}.")
    else:
        lines.append("Memory: peak RSS of the worker process during the stage (kernel VmHWM = ru_maxrss, reset "
                     f"after {after}; weights included); +GB = that peak minus the RSS right after "
                     f"{after}. Skipped rows give the script's estimate of what they would need.")
    lines += ["", "| configuration | " + ("backend | " if mixed else "") + "stage | stage 2 trains | ms/step | × base | "
              + ("" if cuda else "CPU ms/step | × base | ") + "peak GB | +GB | × base | first step s | notes |",
              "|---|" + ("---|" if mixed else "") + "---|---|---:|---:|" + ("" if cuda else "---:|---:|")
              + "---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        note = r.get("note", "")
        if r.get("weight_dtype") not in (None, "float32"):
            note = (note + f" weights {r['weight_dtype']}").strip()
        if r["status"] != "ok":
            note = f"**{r['status']}**: {r.get('reason', '')}"
        cpu = "" if cuda else f"{fmt(r.get('cpu_ms_per_step'))} | {fmt(r.get('cpu_ratio'), 2)} | "
        which = f"{row_backend(r, report)} | " if mixed else ""
        lines.append(f"| {r['name']} | {which}{r['stage']} | {stage2_what(r)} | {fmt(r.get('ms_per_step'))} | "
                     f"{fmt(r.get('time_ratio'), 2)} | {cpu}{fmt(r.get('peak_gb'), 2)} | "
                     f"{fmt(r.get('peak_increment_gb'), 2)} | {fmt(r.get('mem_ratio'), 2)} | "
                     f"{fmt(r.get('first_step_s'), 1)} | {note} |")
    e = report.get("end_to_end")
    if e:
        lines.append("")
        if "total_s" in e:
            lines.append(f"End to end, the default edit ({e['embedding_steps']} + {e['finetune_steps']} training "
                         f"steps, {len(e['etas'])} etas x {e['sample_steps']} DDIM steps, autocast {e['autocast']}, "
                         f"checkpointing {e['gradient_checkpointing']}; no VAE or text encoder): stage 1 "
                         f"{e['stage1_s']:.1f} s, stage 2 {e['stage2_s']:.1f} s, sampling {e['sample_s']:.1f} s, "
                         f"total {e['total_s']:.1f} s" + (f", peak {e['peak_gb']:.2f} GB" if "peak_gb" in e else "")
                         + ".")
        else:
            lines.append(f"End to end: failed ({e})")
    return "\n".join(lines) + "\n"


def write(report, out) -> None:
    add_ratios(report)
    md = markdown(report)
    print(md, flush=True)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(str(out) + ".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        Path(str(out) + ".md").write_text(md)


def combine(a: dict, b: dict) -> dict:
    """Two runs of the same row: pool their measured steps (median of all), keep the larger peak."""
    if b["status"] != "ok":
        return a if a["status"] == "ok" else b
    if a["status"] != "ok":
        return b
    rounds = a.get("rounds", [dict(date=a.get("date"), step_s=a["step_s"], cpu_step_s=a.get("cpu_step_s"),
                                   peak_gb=a["peak_gb"], warmup=a.get("warmup"))])
    rounds.append(dict(date=b.get("date"), step_s=b["step_s"], cpu_step_s=b.get("cpu_step_s"),
                       peak_gb=b["peak_gb"], warmup=b.get("warmup")))
    steps = [t for r in rounds for t in r["step_s"][r["warmup"]:]]
    cpu = [t for r in rounds if r["cpu_step_s"] for t in r["cpu_step_s"][r["warmup"]:]]
    out = dict(b if b["peak_gb"] >= a["peak_gb"] else a)
    out.update(rounds=rounds, ms_per_step=1000 * statistics.median(steps),
               cpu_ms_per_step=1000 * statistics.median(cpu) if cpu else None,
               note=(out.get("note", "") + f" {len(rounds)} runs pooled").strip())
    return out


def merge(paths, out) -> None:
    """Combine result files: new rows are added, a row measured again is pooled (``combine``)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    report = reports[0]
    keyed, order = {}, []
    for rep in reports:
        for r in rep["rows"]:
            r.setdefault("warmup", rep["settings"]["warmup"])
            r.setdefault("date", rep["machine"]["date"])
            r.setdefault("backend", rep["settings"].get("backend", "diffusers"))
            k = (r["backend"], r["name"], r["stage"])
            if k not in keyed:
                order.append(k)
                keyed[k] = r
            else:
                keyed[k] = combine(keyed[k], r)
        if rep is not report:
            if rep.get("end_to_end"):
                report["end_to_end"] = rep["end_to_end"]
            for key in ("comfyui", "comfyui_path", "diffusers"):  # versions of the other backend's runs
                if report["machine"].get(key) is None and rep["machine"].get(key) is not None:
                    report["machine"][key] = rep["machine"][key]
            report.setdefault("merged_runs", []).append(dict(date=rep["machine"]["date"],
                                                             settings=rep["settings"]))
    report["rows"] = [keyed[k] for k in order]
    write(report, out)
