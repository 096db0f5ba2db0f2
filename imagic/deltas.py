"""Trainable weight deltas: what stage 2 learns, kept apart from the model it is added to.

The base model is never written to. A delta is a set of tensors ``delta(name)`` that is added to
the named weight whenever the model runs, inside ``applied(delta, module)``: the one way both the
diffusers path and the ComfyUI nodes apply a delta to a network. Two kinds:

* ``LoraDelta``: low-rank ``up @ down * alpha / rank`` on every Linear and Conv2d weight (convolutions
  as LoCon: ``down`` has the kernel, ``up`` is 1x1). ``up`` starts at zero, so training starts exactly
  at the base model.
* ``FullDelta``: every weight and bias. It trains a copy W' of the weights (Adam on W' is the paper's
  full fine-tune) and is handed back as the exact difference W' - W (see the class).

State-dict keys follow the LoRA format that ComfyUI's loaders read (``<module>.lora_up.weight``,
``.lora_down.weight``, ``.alpha``; full deltas as ``<module>.diff`` / ``.diff_b``).
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Callable, Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from .errors import ImagicError
from .offload import parked

METHODS = ("lora", "full")


def is_linear(m: nn.Module) -> bool:
    """A linear layer: ``nn.Linear``, or a host's own linear module that is not one (ComfyUI's mixed-precision
    Linear for quantized files) but has a weight and integer ``in_features`` / ``out_features``."""
    if isinstance(m, nn.Linear):
        return True
    return (getattr(m, "weight", None) is not None and isinstance(getattr(m, "in_features", None), int)
            and isinstance(getattr(m, "out_features", None), int))


def _layer_weight_shape(m: nn.Module) -> torch.Size:
    # From the layer, not from its weight tensor: a quantized weight's storage shape is its encoding's
    # (ComfyUI-GGUF keeps Q8_0 blocks as bytes), the layer's sizes are the values' shape.
    if isinstance(m, nn.Conv2d):
        return torch.Size((m.out_channels, m.in_channels // m.groups) + tuple(m.kernel_size))
    return torch.Size((m.out_features, m.in_features))


def lora_target_shapes(module: nn.Module) -> Dict[str, torch.Size]:
    """Weights of every linear layer (``is_linear``) and Conv2d in the module, by parameter name."""
    shapes = {}
    for name, m in module.named_modules():
        if (is_linear(m) or isinstance(m, nn.Conv2d)) and getattr(m, "weight", None) is not None:
            shapes[f"{name}.weight"] = _layer_weight_shape(m)
    return shapes


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


def is_tensor_subclass(t: torch.Tensor) -> bool:
    """A tensor subclass such as the host's QuantizedTensor or ComfyUI-GGUF's GGMLTensor: its storage is an
    encoding of its values, not the values."""
    return type(t) not in (torch.Tensor, nn.Parameter)


def quantized_weights(module: nn.Module) -> List[str]:
    """Names of the parameters stored quantized: fp8 dtypes, or a tensor subclass (QuantizedTensor, GGUF)."""
    return [name for name, p in module.named_parameters() if p.dtype in FP8_DTYPES or is_tensor_subclass(p)]


def full_target_shapes(module: nn.Module) -> Dict[str, torch.Size]:
    return {name: p.shape for name, p in module.named_parameters() if name.rsplit(".", 1)[-1] in ("weight", "bias")}


class WeightDelta(nn.Module):
    """What stage 2 trains. Each kind knows how it is added to a layer (``attach_to``), how it is handed back
    (``finish``) and saved (``to_state_dict``); ``applied`` only walks the network."""
    method: str = ""

    def names(self) -> List[str]:
        raise NotImplementedError

    def delta(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def to_state_dict(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def shape(self, name: str) -> torch.Size:
        """The full shape of delta(name), known without building it."""
        raise NotImplementedError

    def attach_to(self, layer: nn.Module, name: str, side_branch: bool = True) -> Callable[[], None]:
        """Make ``layer`` compute with its tensor ``name`` (a full parameter name) plus this delta; returns the undo.

        The default: a parametrization weight -> weight + delta(name), which reads the base weight and
        never writes it.
        """
        return _parametrize(layer, name, _AddDelta(self, name))

    def finish(self) -> "WeightDelta":
        """After training: the delta in the form it is handed back, saved and applied in (here: as it is)."""
        return self

    @contextmanager
    def base_offloaded(self, folder=None, also: Optional[nn.Module] = None):
        """While training, let the base values the delta does not read wait outside memory (here: none)."""
        yield


def _module_name(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def _parametrize(layer: nn.Module, name: str, parametrization: nn.Module) -> Callable[[], None]:
    tensor_name = name.rsplit(".", 1)[1]
    order = list(layer._parameters)
    parametrize.register_parametrization(layer, tensor_name, parametrization, unsafe=True)

    def undo():
        parametrize.remove_parametrizations(layer, tensor_name, leave_parametrized=False)
        # Removing puts the tensor back last; the layer's parameters (and state dict) keep their order.
        if list(layer._parameters) != order and set(layer._parameters) == set(order):
            layer._parameters = {k: layer._parameters[k] for k in order}
    return undo


class LoraDelta(WeightDelta):
    method = "lora"

    def __init__(self, shapes: Mapping[str, torch.Size], rank: int = 4, alpha: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, device=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        self.shapes = {k: torch.Size(v) for k, v in shapes.items()}
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        self._index = {}
        for i, (name, shape) in enumerate(sorted(self.shapes.items())):
            out_f, in_f = shape[0], shape[1]
            kernel = tuple(shape[2:])
            r = min(self.rank, out_f, in_f * max(1, math.prod(kernel)))
            down = torch.empty((r, in_f) + kernel)
            # Kaiming-uniform like nn.Linear, from our own generator so the seed decides it.
            bound = 1.0 / math.sqrt(in_f * max(1, math.prod(kernel)))
            down.uniform_(-bound, bound, generator=generator)
            up = torch.zeros((out_f, r) + (1,) * len(kernel))
            self.down.append(nn.Parameter(down.to(device)))
            self.up.append(nn.Parameter(up.to(device)))
            self._index[name] = i

    def names(self):
        return list(self._index)

    def shape(self, name):
        return self.shapes[name]

    def factors(self, name):
        """(down, up, scale) of one target: its delta is scale * up @ down."""
        i = self._index[name]
        down, up = self.down[i], self.up[i]
        return down, up, self.alpha / down.shape[0]

    def delta(self, name):
        down, up, scale = self.factors(name)
        return (up.flatten(1) @ down.flatten(1)).reshape(self.shapes[name]) * scale

    def attach_to(self, layer, name, side_branch=True, merge: Optional["_MergeWherePays"] = None):
        """A side branch of the layer (a forward hook) where the layer allows it, else merged into the weight
        (``merge``: sampling; a side branch may merge itself after its first call, see ``_MergeWherePays``)."""
        if side_branch and name.endswith(".weight") and side_branch_ok(layer):
            return layer.register_forward_hook(_lora_side_branch(self, name, merge)).remove
        return super().attach_to(layer, name, side_branch)

    def to_state_dict(self, prefix=""):
        sd = {}
        for name, i in self._index.items():
            m = prefix + _module_name(name)
            sd[f"{m}.lora_down.weight"] = self.down[i].detach().clone()
            sd[f"{m}.lora_up.weight"] = self.up[i].detach().clone()
            sd[f"{m}.alpha"] = torch.tensor(self.alpha)
        return sd


class FullDelta(WeightDelta):
    """The full fine-tune, in one of two forms; ``tensors`` holds one tensor per weight and bias in either.

    * Training form (``FullDelta.trainable(module)``): ``tensors`` are a trainable fp32 copy W' of
      every weight and bias, starting at the module's values, kept beside the module's own parameters
      (whose values are never written). ``attach_to`` makes the layers compute with W' itself, so no
      weight + difference is formed at any step and nothing beyond W', its gradient and Adam's state
      is kept: Adam on W' is the paper's full fine-tune. The module's values are only read again by
      ``finish()``, so ``base_offloaded()`` can keep them out of memory meanwhile.
    * Difference form (``FullDelta(shapes)``, ``finish()``, or loaded from a file): ``tensors`` are the
      differences D = W' - W, added to the weights when applied. ``finish()`` turns the training form
      into this one in place, one tensor at a time, and drops the references.

    ``bind(module)`` turns a difference into the training form on ``module`` (D <- W + D in place, each
    element's exact way back kept), so a result read back from a file samples as one from ``train()``
    does: nothing added per call. ``finish()`` and ``delta()`` give D back bit for bit.
    """
    method = "full"

    def __init__(self, shapes: Mapping[str, torch.Size], device=None):
        super().__init__()
        self.tensors = nn.ParameterList()
        self._index = {}
        self._base: Optional[List[nn.Parameter]] = None  # training form: the module's parameters
        self._kept: Optional[list] = None  # bound from a difference: per tensor, D where (W + D) - W misses it
        self._lossy_on: Optional[int] = None  # id() of the module whose weights ``bind`` found D no difference of
        for i, (name, shape) in enumerate(sorted(shapes.items())):
            self.tensors.append(nn.Parameter(torch.zeros(shape, device=device)))
            self._index[name] = i

    @classmethod
    def trainable(cls, module: nn.Module, device=None) -> "FullDelta":
        params = dict(module.named_parameters())
        names = sorted(full_target_shapes(module))
        delta = cls({}, device=device)
        delta._base = []
        for i, name in enumerate(names):
            p = params[name]
            delta.tensors.append(nn.Parameter(p.detach().to(device=device, dtype=torch.float32, copy=True)))
            delta._base.append(p)  # the parameter itself, not a view: offloading must be able to free its memory
            delta._index[name] = i
        return delta

    @property
    def training_form(self) -> bool:
        return self._base is not None

    def bound_to(self, module: nn.Module) -> bool:
        """Training form, trained on ``module`` itself: its targets are the very parameters W' was copied
        from, so computing with W' there is computing with W + (W' - W)."""
        if self._base is None:
            return False
        params = dict(module.named_parameters())
        return all(params.get(name) is self._base[i] for name, i in self._index.items())

    def bind(self, module: nn.Module) -> bool:
        """Difference form -> training form on ``module``, in place: each tensor D becomes W + D (no new
        memory), so every later call computes with it as it is, as with the W' that ``train()`` hands back.
        Where (W + D) - W does not give D back bit for bit, D is kept aside (``_add_keeping_the_way_back``).
        False, with the delta as it was, where a tensor cannot hold W + D (another dtype, device or layout
        than its weight, a quantized weight, or a D that is not the difference of two float tensors): then
        ``applied`` merges it for each call instead (``merged_in_place``). ``module``'s values are only read."""
        if self._base is not None:
            return self.bound_to(module)
        if self._lossy_on == id(module):  # found at an earlier call: not again at every call (merging is as right)
            return False
        params = dict(module.named_parameters())
        order = sorted(self._index, key=self._index.get)
        pairs = [(self.tensors[self._index[n]], params.get(n)) for n in order]
        if not all(w is not None and _can_hold_sum(d, w) for d, w in pairs):
            return False
        kept = []
        with torch.no_grad():
            try:
                for d, w in pairs:
                    kept.append(_add_keeping_the_way_back(d, w.detach()))
            except BaseException as e:  # the tensor that raised is as it was; undo those before it
                for (d, w), k in zip(pairs, kept):
                    _subtract_restoring(d, w.detach(), k)
                if isinstance(e, _LossyWayBack):
                    self._lossy_on = id(module)
                    return False
                raise
        self._base, self._kept = [w for _, w in pairs], kept
        return True

    def weight(self, name) -> torch.Tensor:
        """Training form: the trained weight W' itself."""
        if self._base is None:
            raise RuntimeError("FullDelta.weight() is the trained weight of the training form; this delta holds differences")
        return self.tensors[self._index[name]]

    def attach_to(self, layer, name, side_branch=True):
        if self.training_form:  # the layer reads W' instead of its weight (``applied`` checks it is bound)
            return _parametrize(layer, name, _TrainedWeight(self, name))
        return super().attach_to(layer, name, side_branch)

    def finish(self) -> "FullDelta":
        """Training form -> difference form, in place (W' -= W), so no second copy is ever made."""
        if self._base is not None:
            with torch.no_grad():
                for i, p in enumerate(self._base):
                    if self._kept is not None:  # bound from a difference: D again, bit for bit
                        _subtract_restoring(self.tensors[i], p.detach(), self._kept[i])
                    else:
                        self.tensors[i].sub_(p.detach().to(self.tensors[i]))
            self._base, self._kept = None, None
        return self

    def base_offloaded(self, folder=None, also: Optional[nn.Module] = None):
        """Training form: the module's values of the trained tensors wait outside the compute memory
        (``offload.parked``). ``also``: a module whose same-named parameters are the same memory (the
        host's input network, which the training network aliases): they wait and come back with them."""
        if not self._base:
            return super().base_offloaded(folder, also)
        names = sorted(self._index, key=self._index.get)
        sharers = [[] for _ in self._base]
        if also is not None:
            theirs = dict(also.named_parameters())
            for i, (name, p) in enumerate(zip(names, self._base)):
                q = theirs.get(name)
                if q is not None and q is not p and q.shape == p.shape and q.data_ptr() == p.data_ptr():
                    sharers[i].append(q)
        return parked(self._base, sharers, folder)

    @contextmanager
    def merged_in_place(self, module: nn.Module):
        """Difference form, for inference: inside the block the layers of ``module`` compute with
        W + D held in this delta's own tensors (written over D, so no third copy of the weights is
        allocated: on a CPU fresh memory costs more time than the sum); afterwards every tensor holds
        D again, bit for bit, also after an error. ``module``'s values are only read.

        Why it is exact: before a tensor is written, each element's way back, (W + D) - W, is checked
        against D; the few elements where rounding does not lead back (a tie, or W + D in another binade)
        keep their D aside and are put back after the subtraction. A tensor that cannot take W + D (another
        dtype, device or layout than its weight), or whose way back misses in more than 1 in 256 elements (a D
        that is not the difference of two float tensors), gets the ordinary weight + difference instead. Not for
        sampling the same delta from two threads at once, and not with autograd (no gradients flow)."""
        if self.training_form:
            raise RuntimeError("merged_in_place() is for the difference form; a training form already holds W'")
        params = dict(module.named_parameters())
        with ExitStack() as undo, torch.no_grad():
            for name in self.names():
                d, w = self.tensors[self._index[name]], params[name].detach()
                layer = module.get_submodule(_module_name(name))
                if not _can_hold_sum(d, w):
                    undo.callback(self.attach_to(layer, name))
                    continue
                try:
                    kept = _add_keeping_the_way_back(d, w)
                except _LossyWayBack:  # not a difference of two float tensors: a merged copy for this one
                    undo.callback(self.attach_to(layer, name))
                    continue
                undo.callback(_subtract_restoring, d, w, kept)  # registered first: undone last
                undo.callback(_parametrize(layer, name, _HeldWeight(d)))
            yield

    def names(self):
        return list(self._index)

    def delta(self, name):
        i = self._index[name]
        d = self.tensors[i]
        if self._base is not None:
            out = d - self._base[i].to(d)
            if self._kept is not None and self._kept[i] is not None:
                with torch.no_grad():
                    out.view(-1)[self._kept[i][0]] = self._kept[i][1]
            return out
        return d

    def shape(self, name):
        return self.tensors[self._index[name]].shape

    def to_state_dict(self, prefix=""):
        sd = {}
        for name in self._index:
            suffix = "diff_b" if name.endswith(".bias") else "diff"
            sd[f"{prefix}{_module_name(name)}.{suffix}"] = self.delta(name).detach().clone()
        return sd


def delta_from_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "") -> WeightDelta:
    """Rebuild a delta saved by ``to_state_dict`` (keys may carry ``prefix``)."""
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    if any(k.endswith(".lora_up.weight") for k in keys):
        modules = sorted(k[: -len(".lora_up.weight")] for k in keys if k.endswith(".lora_up.weight"))
        shapes, downs, ups, alphas = {}, {}, {}, set()
        for m in modules:
            try:
                up = sd[f"{prefix}{m}.lora_up.weight"]
                down = sd[f"{prefix}{m}.lora_down.weight"]
            except KeyError as e:
                raise ValueError(f"LoRA entry for {m!r} is incomplete: {e.args[0]} is missing") from None
            shape = (up.shape[0], down.shape[1]) + tuple(down.shape[2:])
            shapes[f"{m}.weight"] = torch.Size(shape)
            downs[f"{m}.weight"], ups[f"{m}.weight"] = down, up
            if f"{prefix}{m}.alpha" in sd:
                alphas.add(float(sd[f"{prefix}{m}.alpha"]))
        rank = max(d.shape[0] for d in downs.values())
        alpha = alphas.pop() if len(alphas) == 1 else float(rank)
        delta = LoraDelta(shapes, rank=rank, alpha=alpha)
        with torch.no_grad():
            for name, i in delta._index.items():
                delta.down[i].data = downs[name].float().clone()
                delta.up[i].data = ups[name].float().clone()
        return delta
    shapes, values = {}, {}
    for k in keys:
        if k.endswith(".diff_b"):
            name = k[: -len(".diff_b")] + ".bias"
        elif k.endswith(".diff"):
            name = k[: -len(".diff")] + ".weight"
        else:
            continue
        shapes[name], values[name] = sd[prefix + k].shape, sd[prefix + k]
    if not shapes:
        raise ValueError("no LoRA (lora_up/lora_down) or full (diff) weights found")
    delta = FullDelta(shapes)
    with torch.no_grad():
        for name, i in delta._index.items():
            delta.tensors[i].data = values[name].float().clone()
    return delta


def make_delta(method: str, module: nn.Module, rank: int, seed: int, device=None) -> WeightDelta:
    if method == "lora":
        g = torch.Generator().manual_seed(int(seed))
        return LoraDelta(lora_target_shapes(module), rank=rank, generator=g, device=device)
    if method == "full":
        quantized = quantized_weights(module)
        if quantized:
            raise ImagicError(f"a full fine-tune trains a full-precision copy of every weight, and this model's weights "
                              f"are stored quantized ({len(quantized)} of them, e.g. {quantized[0]}: fp8, GGUF or "
                              "mixed precision): that copy would be several times the file's size. Use method lora "
                              "(it trains on the quantized weights as they are), or load a bf16/fp16 file for full")
        return FullDelta.trainable(module, device=device)
    raise ValueError(f"unknown fine-tune method {method!r}; use one of {METHODS}")


# ---------------------------------------------------------------------------------------------
# Applying a delta to a network


class _TrainedWeight(nn.Module):
    """Parametrization weight -> W' (a full delta's trainable copy): the base weight is not read."""

    def __init__(self, delta: "FullDelta", name: str):
        super().__init__()
        self.delta, self.name = [delta], name

    def forward(self, weight):
        return self.delta[0].weight(self.name).to(weight.dtype)


class _AddDelta(nn.Module):
    """Parametrization weight -> weight + delta(name): the base weight is read, never written."""

    def __init__(self, delta: WeightDelta, name: str):
        super().__init__()
        self.delta, self.name = [delta], name  # a list, so the delta is not registered as a submodule

    def forward(self, weight):
        return weight + self.delta[0].delta(self.name).to(weight.dtype)


class _HeldWeight(nn.Module):
    """Parametrization weight -> a tensor computed beforehand (``FullDelta.merged_in_place``'s W + D)."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.held = [tensor]  # a list: not registered, not saved

    def forward(self, weight):
        return self.held[0]


_CHUNK = 1 << 18  # elements per pass: small enough that a chunk's temporaries stay in the CPU's cache


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns: compares -0.0 with 0.0 and NaN with itself as different and equal."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


class _LossyWayBack(Exception):
    """(W + D) - W misses D in too many elements to keep them aside: use a fresh merged copy instead."""


def _can_hold_sum(d: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a difference tensor can take W + D in place, element for element (``_add_keeping_the_way_back``):
    the same dtype, device, shape and contiguous layout as its weight, and a weight stored as plain values."""
    return (d.dtype == w.dtype and d.device == w.device and d.shape == w.shape and d.is_contiguous()
            and w.is_contiguous() and not is_tensor_subclass(w))


def _add_keeping_the_way_back(d: torch.Tensor, w: torch.Tensor):
    """d <- w + d in place, chunk by chunk; returns the flat positions (and their d) where (w + d) - w
    does not give d back bit for bit, for ``_subtract_restoring``. Interrupted, it undoes what it did.

    A difference handed back by stage 2 is W' - W of two float tensors, and (W + D) - W gives it back in
    all but a few elements; an arbitrary D (not such a difference) misses in most, and keeping those
    aside would take more memory than a merged copy: past 1 in 256 elements it raises _LossyWayBack,
    d as it was."""
    fd, fw = d.view(-1), w.reshape(-1)
    positions, values = [], []
    budget, count = max(1024, fd.numel() // 256), 0

    def kept():
        return (torch.cat(positions), torch.cat(values)) if positions else None

    done = 0
    try:
        for start in range(0, fd.numel(), _CHUNK):
            dc, wc = fd[start:start + _CHUNK], fw[start:start + _CHUNK]
            merged = wc + dc
            lost = _bits(merged - wc) != _bits(dc)
            if lost.any():
                at = lost.nonzero().view(-1)
                count += at.numel()
                if count > budget:
                    raise _LossyWayBack
                positions.append(at + start)
                values.append(dc[at].clone())
            dc.copy_(merged)
            done = start + dc.numel()
    except BaseException:
        _subtract_restoring(d, w, kept(), upto=done)
        raise
    return kept()


def _subtract_restoring(d: torch.Tensor, w: torch.Tensor, kept, upto: Optional[int] = None) -> None:
    """Undo ``_add_keeping_the_way_back`` (on the first ``upto`` elements): d <- (w + d) - w, then the
    kept elements, so d is as it was, bit for bit."""
    with torch.no_grad():
        fd, fw = d.view(-1), w.reshape(-1)
        for start in range(0, fd.numel() if upto is None else upto, _CHUNK):
            end = start + _CHUNK if upto is None else min(start + _CHUNK, upto)
            fd[start:end].sub_(fw[start:end])
        if kept is not None:
            fd[kept[0]] = kept[1]


class _MergeWherePays:
    """Sampling with a LoRA: a layer whose weight is small beside its activations (a UNet's high-resolution
    layers) costs less merged once than as a side branch at every step, so after the side branch's first
    call the layer gets W + scale * up @ down, formed once and held for the block's remaining forward
    passes (a fresh tensor of the layer's size: the base weight is only read). Where it pays, by the
    memory each touches: the branch reads the input and reads and writes the output at every pass, the
    merge writes and reads about MERGE_TOUCHES weight-sized tensors once. Against the branches' per-layer
    times measured on SD1.5 at 256 px (one thread), the rule saves 8% of their time in a 2-step call, 41%
    in a 10-step one, 70% in a 50-step one (3 instead of 6 gives the same; 1.5 merges too much)."""
    MERGE_TOUCHES = 6

    def __init__(self, delta: LoraDelta, forwards: int, undo: ExitStack):
        self.delta, self.remaining, self.undo = delta, int(forwards) - 1, undo

    def __call__(self, module: nn.Module, name: str, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether ``module`` now holds its merged weight (then the branch adds nothing from here on)."""
        weight = getattr(module, name.rsplit(".", 1)[1])
        if self.remaining * (x.numel() + 2 * out.numel()) <= self.MERGE_TOUCHES * weight.numel():
            return False
        with torch.no_grad():
            merged = weight + self.delta.delta(name).to(weight.dtype)
        self.undo.callback(_parametrize(module, name, _HeldWeight(merged)))
        return True


def _lora_side_branch(delta: LoraDelta, name: str, merge: Optional[_MergeWherePays] = None):
    """Forward hook: out + scale * up(down(x)), the same function as the layer with weight + up @ down.

    Why not merge: a merged weight is a full-size tensor per layer that autograd keeps for the
    backward pass, i.e. one more copy of the whole network during training; the branch keeps only
    rank-r activations and never forms a full-size weight or weight gradient.
    """
    merged = []

    def hook(module, args, out):
        if merged:  # the layer computes with its merged weight for the rest of the block
            return None
        x = args[0]
        down, up, scale = delta.factors(name)
        down, up = down.to(x.dtype), up.to(x.dtype)
        linear = is_linear(module)
        if linear:
            h = F.linear(x, down)
        elif _down_by_shifts(module, x, torch.is_grad_enabled()):
            h = _conv_down_by_shifts(x, down)
        else:  # LoCon: the down convolution takes the layer's geometry, up is 1x1
            h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
        if _accumulates_in_place(out, h):
            out = _add_up_in_place(out, h, up, scale, linear)
            if merge is not None and merge(module, name, x, out):
                merged.append(True)
            return out
        h = F.linear(h, up) if linear else F.conv2d(h, up)
        return out + (h * scale).to(out.dtype)

    return hook


def _down_by_shifts(conv: nn.Module, x: torch.Tensor, grad: bool) -> bool:
    """Whether a LoCon's down convolution can run as ``_conv_down_by_shifts``: without autograd (its
    intermediate is kernel-size times the output, too much to keep for a backward pass), on NCHW memory,
    for a stride-1 convolution whose zero padding keeps the size (a 3x3 with padding 1)."""
    if grad or x.dim() != 4 or not x.is_contiguous() or type(x) is not torch.Tensor:
        return False
    kh, kw = conv.kernel_size
    return (kh > 1 or kw > 1) and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1) \
        and tuple(conv.padding) == ((kh - 1) // 2, (kw - 1) // 2) and kh % 2 == 1 and kw % 2 == 1


def _conv_down_by_shifts(x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """conv2d(x, down) with "same" zero padding, for a down projection of few output channels (r): one
    matrix product for every kernel position at once, then each position's r channels added in at its
    shift. The same sum as the convolution in another order (rounding aside); a direct convolution of
    r outputs uses the CPU far below the layer's own rate (measured 3x slower at 320 channels, 32x32)."""
    n, c, hh, ww = x.shape
    r, _, kh, kw = down.shape
    y = torch.matmul(down.permute(2, 3, 0, 1).reshape(kh * kw * r, c), x.view(n, c, hh * ww))
    y = y.view(n, kh, kw, r, hh, ww)
    ch, cw = kh // 2, kw // 2
    h = y[:, ch, cw].clone()
    for i in range(kh):
        for j in range(kw):
            dy, dx = i - ch, j - cw
            if (dy or dx) and abs(dy) < hh and abs(dx) < ww:  # output (a, b) reads input (a + dy, b + dx)
                h[:, :, max(0, -dy):hh - max(0, dy), max(0, -dx):ww - max(0, dx)] += \
                    y[:, i, j, :, max(0, dy):hh - max(0, -dy), max(0, dx):ww - max(0, -dx)]
    return h


def _accumulates_in_place(out: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether the up projection can be added into the layer's output where it lies: only without
    autograd (sampling: nothing keeps ``out`` for a backward pass), in one dtype, on memory laid out
    as one matrix per sample, and where writing is allowed (an inference tensor only in inference mode)."""
    if torch.is_grad_enabled() or type(out) is not torch.Tensor or out.dtype != h.dtype:
        return False
    if out.is_inference() and not torch.is_inference_mode_enabled():
        return False
    return out.is_contiguous() or (out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last))


def _add_up_in_place(out, h, up, scale, linear):
    """out += scale * up(h) as one matrix product accumulating into ``out`` (BLAS beta = 1): the same
    sum as ``out + up(h) * scale`` up to rounding, without the three output-sized temporaries that
    cost the side branch most of its time at sampling (small layers are memory-bound)."""
    up = up.to(out.dtype).flatten(1)  # (out_features, r)
    r = up.shape[1]
    if linear:
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, r), up.t(), alpha=scale)
    elif out.is_contiguous():  # NCHW: one (C, HW) matrix per sample
        n, c = out.shape[:2]
        out.view(n, c, -1).baddbmm_(up.expand(n, c, r), h.reshape(n, r, -1), alpha=scale)
    else:  # channels_last: one (NHW, C) matrix
        out.permute(0, 2, 3, 1).view(-1, out.shape[1]).addmm_(h.permute(0, 2, 3, 1).reshape(-1, r), up.t(),
                                                               alpha=scale)
    return out


def side_branch_ok(module: nn.Module) -> bool:
    """Whether a LoRA on this layer can run as a side branch (else it is merged into the weight)."""
    if is_linear(module):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


@contextmanager
def applied(delta: Optional[WeightDelta], module: nn.Module, side_branch: bool = True, offload_base: bool = False,
            offload_also: Optional[nn.Module] = None, inference: bool = False, forwards: Optional[int] = None):
    """Inside the block, ``module`` computes with weight + delta; afterwards it is exactly as before.

    Each kind of delta attaches itself to each layer it targets (``WeightDelta.attach_to``): LoRA as a
    side branch where the layer allows it (``side_branch=False``: merged into the weight), a full delta
    as its trained copy (training form) or weight + difference. With ``offload_base`` (training only) the module's own
    values that the delta does not read (and ``offload_also``'s, where they are the same memory) wait
    outside memory meanwhile (``WeightDelta.base_offloaded``). The module's values are never changed,
    so the base stays bit for bit unchanged. ``inference`` (no gradients, e.g. sampling): a full
    difference is bound to the network once (``FullDelta.bind``: W + D written over D, read by each layer as
    it is at this and every later call, no third copy of the weights); where it cannot be, it is added into
    the delta's own tensors for the block alone (``FullDelta.merged_in_place``). A full delta in its
    training form computes with W' on the network it was trained on (nothing to add); on another network
    it becomes the differences first (``finish``), which are then added to that network's weights.
    ``forwards`` (with ``inference``): how many forward passes the block runs (sampling: its steps); a LoRA
    layer whose merged weight costs less than its side branch over them is merged (``_MergeWherePays``).
    """
    if delta is None:
        yield
        return
    if isinstance(delta, FullDelta) and delta.training_form and not delta.bound_to(module):
        delta.finish()
    if inference and isinstance(delta, FullDelta) and not delta.training_form and not delta.bind(module):
        with delta.merged_in_place(module):
            yield
        return
    with ExitStack() as undo:
        merge = (_MergeWherePays(delta, forwards, undo) if inference and forwards and forwards > 1
                 and isinstance(delta, LoraDelta) else None)
        for name in delta.names():
            layer = module.get_submodule(_module_name(name))
            undo.callback(delta.attach_to(layer, name, side_branch, merge=merge) if merge is not None
                          else delta.attach_to(layer, name, side_branch))
        if offload_base and not inference:  # (parking a model-sized base costs more than a sampling call gains)
            undo.enter_context(delta.base_offloaded(also=offload_also))
        yield


def check_fits(delta: WeightDelta, module: nn.Module) -> Optional[str]:
    """The first target of ``delta`` that ``module`` lacks or has in another shape (None: it fits).

    Uses the delta's factor shapes only: no full-size delta is built.
    """
    params = dict(module.named_parameters())
    for name in delta.names():
        if name not in params or params[name].shape != delta.shape(name):
            return name
    return None
