"""Diffusion-model files in the weight formats ComfyUI users load, written at test time from a tiny model.

``write(fmt, sd, path, arch)`` writes the bf16 state dict ``sd`` (the host's diffusion-model key layout)
as one format; ``FORMATS`` lists each with the loader that reads it:

- ``fp32`` / ``fp16`` / ``bf16``: plain files, the stock Load Diffusion Model (``UNETLoader``);
- ``fp8_e4m3fn`` / ``fp8_e4m3fn_fast`` / ``fp8_e5m2``: the bf16 file with UNETLoader's ``weight_dtype``;
- ``scaled_fp8``: the legacy "scaled fp8" layout (fp8 e4m3 weights, a per-layer ``scale_weight``, a
  ``scaled_fp8`` marker), which the host converts at load (``comfy.utils.convert_old_quants``);
- ``mixed_<format>``: ``_quantization_metadata`` checkpoints (QUANTIZATION.md) in each of the host's
  ``QUANT_ALGOS`` (float8_e4m3fn, float8_e5m2, nvfp4, mxfp8, int8_tensorwise, convrot_w4a4,
  asym_w4a8_int8 in 0.33), quantized with the host's own ``QuantizedTensor.from_float`` and loaded as
  ``QuantizedTensor``s run by ``MixedPrecisionOps`` (on a CPU through its dequantizing fallback);
- ``gguf_*``: GGUF files written with PyPI's ``gguf`` and loaded by ComfyUI-GGUF's ``UnetLoaderGGUF``
  (F16, BF16 and the block quants ``gguf.quants`` can write: Q8_0, Q5_1, Q4_0; its Python quantizer has
  no K-quants, ``NotImplementedError``). 1-D and small tensors stay F32, as ComfyUI-GGUF's converter keeps
  them; a tensor whose last axis is not a multiple of the block is stored flattened to blocks with its
  shape in ``comfy.gguf.orig_shape``, as that converter does.

Only 2-D (linear) weights are quantized in the fp8 layouts, as the host's own quantized files do.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Format:
    name: str
    loader: str            # "unet" (stock UNETLoader) or "gguf" (ComfyUI-GGUF's UnetLoaderGGUF)
    weight_dtype: str = "default"
    quantized: bool = True  # stored quantized or as a tensor subclass (GGUF): a full fine-tune is refused


FORMATS = {f.name: f for f in [
    Format("fp32", "unet", quantized=False), Format("fp16", "unet", quantized=False),
    Format("bf16", "unet", quantized=False),
    Format("fp8_e4m3fn", "unet", "fp8_e4m3fn"), Format("fp8_e4m3fn_fast", "unet", "fp8_e4m3fn_fast"),
    Format("fp8_e5m2", "unet", "fp8_e5m2"),
    Format("scaled_fp8", "unet"),
    *[Format(f"mixed_{algo}", "unet") for algo in ("float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "int8_tensorwise",
                                                    "convrot_w4a4", "asym_w4a8_int8")],
    Format("gguf_f16", "gguf"), Format("gguf_bf16", "gguf"),  # GGMLTensor weights: no full fine-tune either
    Format("gguf_q8_0", "gguf"), Format("gguf_q5_1", "gguf"), Format("gguf_q4_0", "gguf"),
]}


def _fp8(w: torch.Tensor, dtype):
    scale = (w.float().abs().max() / torch.finfo(dtype).max).clamp(min=1e-12)
    return (w.float() / scale).to(dtype), scale.reshape(()).float()


def _linear_weights(sd):
    return [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2 and v.numel() >= 256]


def write(fmt: str, sd: dict, path, arch: str) -> Path:
    import comfy.utils

    path = Path(path)
    f = FORMATS[fmt]
    if f.loader == "gguf":
        return _write_gguf(fmt, sd, path, arch)
    if fmt in ("fp32", "fp16"):
        out = {k: v.to(torch.float32 if fmt == "fp32" else torch.float16) for k, v in sd.items()}
        comfy.utils.save_torch_file(out, str(path))
    elif fmt == "scaled_fp8":
        out = dict(sd)
        for k in _linear_weights(sd):
            out[k], out[k[:-len(".weight")] + ".scale_weight"] = _fp8(sd[k], torch.float8_e4m3fn)
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        comfy.utils.save_torch_file(out, str(path))
    elif fmt.startswith("mixed_"):
        import comfy.quant_ops

        algo = fmt[len("mixed_"):]
        layout = comfy.quant_ops.QUANT_ALGOS[algo]["comfy_tensor_layout"]
        out, layers = dict(sd), {}
        for k in _linear_weights(sd):
            try:  # block formats need whole blocks (convrot_w4a4: 256 inputs): other layers stay bf16
                q = comfy.quant_ops.QuantizedTensor.from_float(sd[k].float(), layout)
            except ValueError:
                continue
            del out[k]
            out.update(q.state_dict(k))
            layers[k[:-len(".weight")]] = {"format": algo}
        if not layers:
            raise ValueError(f"no layer of this model can be stored as {algo}")
        meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
        comfy.utils.save_torch_file(out, str(path), metadata=meta)
    else:  # bf16 and the weight_dtype formats: the file as built
        comfy.utils.save_torch_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(path))
    return path


def _write_gguf(fmt: str, sd: dict, path: Path, arch: str) -> Path:
    import gguf

    T = gguf.GGMLQuantizationType
    qtype = {"gguf_f16": T.F16, "gguf_bf16": T.BF16, "gguf_q8_0": T.Q8_0, "gguf_q5_1": T.Q5_1,
             "gguf_q4_0": T.Q4_0}[fmt]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in sd.items():
        data = value.float().numpy()
        t = qtype
        if data.ndim <= 1 or data.size <= 1024:
            t = T.F32
        elif data.shape[-1] % block:
            if data.size % 256:
                t = T.F32 if qtype not in (T.F16, T.BF16) else qtype
            else:
                writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(d) for d in data.shape])
                data = data.reshape(-1, 256)
        writer.add_tensor(key, gguf.quants.quantize(data, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fingerprint(module: torch.nn.Module) -> dict:
    """Every parameter as stored: (type name, dtype, the stored bytes or values), so "unchanged" means bit
    for bit in the file's own format (QuantizedTensor: its quantized data and scales; GGUF: its blocks)."""
    out = {}
    for name, p in module.named_parameters():
        kind = type(p).__name__
        if hasattr(p, "state_dict") and callable(getattr(p, "dequantize", None)):  # comfy_kitchen QuantizedTensor
            stored = {k: v.detach().clone() for k, v in p.state_dict(name).items()}
        else:
            stored = p.detach().as_subclass(torch.Tensor).clone()
        out[name] = (kind, p.dtype, stored)
    return out


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.element_size() == 1:  # fp8 and byte blocks: compare the bits
        x, y = x.view(torch.uint8), y.view(torch.uint8)
    return torch.equal(x, y)


def same(a: dict, b: dict) -> list:
    """Names whose stored form differs between two fingerprints."""
    bad = []
    for name, (kind, dtype, stored) in a.items():
        k2, d2, s2 = b[name]
        if kind != k2 or dtype != d2:
            bad.append(name)
        elif isinstance(stored, dict):
            if stored.keys() != s2.keys() or not all(_equal(stored[k], s2[k]) for k in stored):
                bad.append(name)
        elif not _equal(stored, s2):
            bad.append(name)
    return bad
