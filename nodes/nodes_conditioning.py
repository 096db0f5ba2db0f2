"""Imagic stage 3 as nodes: interpolate e_tgt and e_opt at one eta, or at several for a side-by-side."""
from __future__ import annotations

from comfy_api.latest import io

from ..imagic import ImagicError, interpolate
from ..imagic.defaults import DEFAULTS, eta_sweep_text
from .host import embedding_of, entry_of, single_conditioning
from .schema import schema

DEFAULT_ETAS = eta_sweep_text(", ")


def interpolate_conditioning(target, optimized, eta):
    """eta * e_tgt + (1 - eta) * e_opt, keeping the target's dict (ControlNet, areas, size keys)."""
    tgt, tgt_extra = single_conditioning(target, "target")
    e_tgt, e_opt = embedding_of(tgt, tgt_extra), embedding_of(*single_conditioning(optimized, "optimized"))
    both = e_tgt.keys() & e_opt.keys()  # a pooled vector on one side only: the target's is kept as it is
    e = interpolate({k: e_tgt[k] for k in both}, {k: e_opt[k] for k in both}, eta)
    return [list(entry_of(e, tgt_extra))]


def parse_etas(text: str):
    parts = [p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()]
    if not parts:
        raise ImagicError("etas is empty: give comma-separated numbers, e.g. " + DEFAULT_ETAS)
    values = []
    for p in parts:
        try:
            values.append(float(p))
        except ValueError:
            raise ImagicError(f"etas: {p!r} is not a number; give comma-separated numbers, e.g. {DEFAULT_ETAS}") from None
    return values


_TARGET = "The target text's conditioning (CLIP Text Encode), e_tgt: the same one given to Optimize Embedding."
_OPTIMIZED = "The optimized conditioning from Imagic Optimize Embedding, e_opt."


class ImagicInterpolateConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ImagicInterpolateConditioning",
            search_aliases=["imagic", "edit photo with text", "blend conditioning", "eta", "lerp conditioning"],
            display_name="Imagic Interpolate Conditioning",
            category="Imagic",
            description="Imagic stage 3: eta * target + (1 - eta) * optimized. Sample it with the fine-tuned model. "
                        "eta 0 reproduces the photo, 1 is the target text alone; 0.6-0.8 is usually best. When 1 still "
                        "shows the photo (the fine-tune learnt it whatever the text), try 1.25-1.5.",
            inputs=[
                io.Conditioning.Input("target", tooltip=_TARGET),
                io.Conditioning.Input("optimized", tooltip=_OPTIMIZED),
                io.Float.Input("eta", default=DEFAULTS["eta"], min=-1.0, max=2.0, step=0.01,
                               tooltip="Weight of the target text. Outside 0..1 extrapolates: past 1 moves away from the photo's "
                                       "embedding, for a fine-tune that keeps the photo at 1."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, target, optimized, eta) -> io.NodeOutput:
        return io.NodeOutput(interpolate_conditioning(target, optimized, eta))


class ImagicEtaSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ImagicEtaSweep",
            search_aliases=["imagic", "eta sweep", "compare edit strengths", "conditioning list"],
            display_name="Imagic Eta Sweep",
            category="Imagic",
            description="Several etas at once: a list of conditionings, so the KSampler downstream runs once per "
                        "eta with the same seed, for a fair side-by-side.",
            inputs=[
                io.Conditioning.Input("target", tooltip=_TARGET),
                io.Conditioning.Input("optimized", tooltip=_OPTIMIZED),
                io.String.Input("etas", default=DEFAULT_ETAS, tooltip="Comma-separated etas, e.g. " + DEFAULT_ETAS),
            ],
            outputs=[io.Conditioning.Output(is_output_list=True, tooltip="One conditioning per eta, in order.")],
        )

    @classmethod
    def validate_inputs(cls, etas=None, **kwargs):
        if isinstance(etas, str):
            try:
                parse_etas(etas)
            except ImagicError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, target, optimized, etas) -> io.NodeOutput:
        return io.NodeOutput([interpolate_conditioning(target, optimized, eta) for eta in parse_etas(etas)])
