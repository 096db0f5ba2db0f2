"""Seeded, reproducible generator of captioned 32x32 RGB toy images.

Every image shows one object on a muted gradient background.  The object is
described by four *attributes* (named in the caption) and the image has
*details* that no caption names (background colours and gradient direction,
sub-pixel placement jitter, small size and colour jitter).  An Imagic edit
changes one attribute and should keep every detail.

    ex = make_example(123)   # ex.image, ex.attrs, ex.details, ex.caption
    ex.caption               # e.g. "a large blue circle on the left"

Everything derives from one integer seed through ``numpy.random.default_rng``;
the same seed gives the same bytes on every platform.  Seeds are split into
disjoint ranges (``SPLITS``) so that held-out images are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32

# ---------------------------------------------------------------------------
# Attributes (named in captions).  Order of ATTRIBUTES is the order of the
# classifier heads.
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = ("left", "right")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)

# Nominal object colours (RGB, 0-255): saturated, far from the muted backgrounds.
COLOUR_RGB = {
    "red": (215, 35, 35),
    "green": (35, 170, 50),
    "blue": (40, 70, 215),
    "yellow": (235, 205, 30),
}
# Half-extent (circle radius) in pixels, before jitter.
SIZE_PX = {"small": 5.0, "large": 8.0}
# Horizontal centre in pixels, before jitter.
POSITION_X = {"left": 10.5, "right": 21.5}
CENTER_Y = 16.0

CAPTION_TEMPLATE = "a {size} {colour} {shape} on the {position}"

# Every word a caption can use; the toy tokenizer maps each to one token.
VOCABULARY = (
    "a", "an", "the", "on", "of", "in", "at", "and", "with",
    *SIZES, *COLOURS, *SHAPES, *POSITIONS,
    "top", "bottom", "center", "middle", "big",
    "photo", "image", "picture", "object", "shape", "background",
)

# Disjoint seed ranges.  Train images use seeds [0, 1e6); held-out images use
# other ranges, so a held-out image is never a training image.
SPLITS = {
    "train": (0, 1_000_000),
    "val": (1_000_000, 1_100_000),
    "test": (2_000_000, 2_100_000),
}

SUPERSAMPLE = 4  # anti-aliasing factor for rendering


@dataclass(frozen=True)
class Details:
    """Per-image details that are not named by the caption."""

    bg_a: tuple[int, int, int]  # background colour at one end of the gradient
    bg_b: tuple[int, int, int]  # background colour at the other end
    bg_angle: float  # gradient direction, radians
    dx: float  # placement jitter, pixels
    dy: float
    scale: float  # size jitter factor (~0.92..1.08)
    tint: tuple[int, int, int]  # object colour jitter, added to the nominal RGB


@dataclass(frozen=True)
class Example:
    seed: int
    attrs: dict
    details: Details
    caption: str
    image: np.ndarray  # uint8 [32, 32, 3]


def sample_attributes(rng: np.random.Generator) -> dict:
    """Draw one value per attribute, uniformly."""
    return {name: values[int(rng.integers(len(values)))] for name, values in ATTRIBUTES.items()}


def sample_details(rng: np.random.Generator) -> Details:
    """Draw the uncaptioned details (background, jitter)."""

    def muted():
        grey = rng.uniform(70, 190)
        c = grey + rng.uniform(-22, 22, size=3)
        return tuple(int(round(v)) for v in np.clip(c, 0, 255))

    return Details(
        bg_a=muted(),
        bg_b=muted(),
        bg_angle=float(rng.uniform(0, 2 * np.pi)),
        dx=float(rng.uniform(-2.5, 2.5)),
        dy=float(rng.uniform(-3.5, 3.5)),
        scale=float(rng.uniform(0.92, 1.08)),
        tint=tuple(int(v) for v in rng.integers(-15, 16, size=3)),
    )


def caption(attrs: dict) -> str:
    return CAPTION_TEMPLATE.format(**attrs)


def parse_caption(text: str) -> dict | None:
    """Inverse of :func:`caption` for template captions; None otherwise."""
    words = text.strip().lower().split()
    if len(words) != 7 or words[0] != "a" or words[4:6] != ["on", "the"]:
        return None
    attrs = {"size": words[1], "colour": words[2], "shape": words[3], "position": words[6]}
    if any(attrs[k] not in ATTRIBUTES[k] for k in attrs):
        return None
    return attrs


def _shape_mask(shape: str, cx: float, cy: float, r: float, n: int, ss: int) -> np.ndarray:
    """Coverage in [0,1] of an n x n image, by ss x ss supersampling."""
    m = n * ss
    coords = (np.arange(m, dtype=np.float64) + 0.5) / ss  # pixel-centre coordinates
    x = coords[None, :]
    y = coords[:, None]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        # Same bounding box as the circle, so the corners stick out 0.41 r past it.
        # (An equal-area square, h = 0.89 r, differed from a small circle by about
        # one pixel at each corner, and the toy model drew both as the same blob.)
        h = r
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":
        R = r * 1.25  # circumradius of an upward equilateral triangle centred on (cx, cy)
        top = cy - R
        base = cy + R / 2
        half_w = R * np.sqrt(3) / 2
        # inside if below the top vertex, above the base, and within the sloped sides
        t = (y - top) / (base - top)  # 0 at apex, 1 at base
        inside = (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * half_w)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    inside = inside.astype(np.float32)
    return inside.reshape(n, ss, n, ss).mean(axis=(1, 3))


def object_coverage(attrs: dict, details: Details, grow: float = 0.0, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage in [0,1] of the object that :func:`render` draws, its half-extent grown by ``grow`` px."""
    k = size / IMAGE_SIZE
    r = (SIZE_PX[attrs["size"]] * details.scale + grow) * k
    cx = (POSITION_X[attrs["position"]] + details.dx) * k
    cy = (CENTER_Y + details.dy) * k
    return _shape_mask(attrs["shape"], cx, cy, r, size, SUPERSAMPLE)


def background_mask(details: Details, *attrs: dict, margin: float = 1.5) -> np.ndarray:
    """True where none of the objects ``attrs`` (drawn with ``details``, ``margin`` px grown) covers the image."""
    mask = np.ones((IMAGE_SIZE, IMAGE_SIZE), bool)
    for a in attrs:
        mask &= object_coverage(a, details, grow=margin) == 0
    return mask


@dataclass(frozen=True)
class Texture:
    """Structure on the background that no training image has: a sum of plane waves (grey levels).

    The edit benchmark's harder cases draw it (``sample_texture``) so that a method must keep a
    background the model cannot redraw from the caption; ``make_example`` never draws it.
    """

    waves: tuple  # ((amplitude, period px, angle rad, phase rad), ...)


def sample_texture(rng: np.random.Generator, kind: str = "waves") -> Texture:
    """``"stripes"``: one fine wave (period 3.5..6 px); ``"waves"``: three coarser ones (6..14 px)."""
    if kind == "stripes":
        n, periods, amp = 1, (3.5, 6.0), (14.0, 20.0)
    elif kind == "waves":
        n, periods, amp = 3, (6.0, 14.0), (7.0, 11.0)
    else:
        raise ValueError(f"unknown texture kind {kind!r} (expected 'stripes' or 'waves')")
    return Texture(tuple((float(rng.uniform(*amp)), float(rng.uniform(*periods)), float(rng.uniform(0, np.pi)),
                          float(rng.uniform(0, 2 * np.pi))) for _ in range(n)))


def render(attrs: dict, details: Details, size: int = IMAGE_SIZE, texture: Texture | None = None) -> np.ndarray:
    """Render to a uint8 [size, size, 3] array (``texture``: added to the background, see :class:`Texture`)."""
    n = size
    # background: linear gradient from bg_a to bg_b along bg_angle
    c = (np.arange(n, dtype=np.float32) + 0.5) / n - 0.5
    u = np.cos(details.bg_angle) * c[None, :] + np.sin(details.bg_angle) * c[:, None]
    t = np.clip(u / np.sqrt(0.5) * 0.5 + 0.5, 0, 1)[..., None]
    bg = (1 - t) * np.asarray(details.bg_a, np.float32) + t * np.asarray(details.bg_b, np.float32)
    if texture is not None:
        px = (np.arange(n, dtype=np.float32) + 0.5) * IMAGE_SIZE / n  # in 32-px units, so any size draws the same
        for amp, period, angle, phase in texture.waves:
            w = np.cos(angle) * px[None, :] + np.sin(angle) * px[:, None]
            bg = bg + (amp * np.sin(2 * np.pi * w / period + phase))[..., None]

    cov = object_coverage(attrs, details, size=n)[..., None]
    fg = np.clip(np.asarray(COLOUR_RGB[attrs["colour"]], np.float32) + np.asarray(details.tint, np.float32), 0, 255)
    img = (1 - cov) * bg + cov * fg
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_example(seed: int) -> Example:
    """The example for one seed (attributes, details, caption, image)."""
    rng = np.random.default_rng(int(seed))
    attrs = sample_attributes(rng)
    details = sample_details(rng)
    return Example(int(seed), attrs, details, caption(attrs), render(attrs, details))


def split_seeds(split: str, n: int, offset: int = 0) -> list[int]:
    """The first ``n`` seeds (after ``offset``) of a split."""
    lo, hi = SPLITS[split]
    if lo + offset + n > hi:
        raise ValueError(f"split {split!r} has only {hi - lo} seeds")
    return list(range(lo + offset, lo + offset + n))


def split_of(seed: int) -> str | None:
    for name, (lo, hi) in SPLITS.items():
        if lo <= seed < hi:
            return name
    return None


def attrs_to_labels(attrs: dict) -> list[int]:
    """Attribute dict -> class indices, in ATTRIBUTE_NAMES order."""
    return [ATTRIBUTES[name].index(attrs[name]) for name in ATTRIBUTE_NAMES]


def labels_to_attrs(labels) -> dict:
    return {name: ATTRIBUTES[name][int(i)] for name, i in zip(ATTRIBUTE_NAMES, labels)}


def make_dataset(seeds) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images uint8 [N,32,32,3], labels int64 [N,4], captions for many seeds."""
    seeds = list(seeds)
    images = np.empty((len(seeds), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = np.empty((len(seeds), len(ATTRIBUTE_NAMES)), np.int64)
    caps = []
    for i, s in enumerate(seeds):
        ex = make_example(s)
        images[i] = ex.image
        labels[i] = attrs_to_labels(ex.attrs)
        caps.append(ex.caption)
    return images, labels, caps


def all_attribute_combos() -> list[dict]:
    """All 3*4*2*2 = 48 attribute combinations, in a fixed order."""
    out = [{}]
    for name, values in ATTRIBUTES.items():
        out = [{**d, name: v} for d in out for v in values]
    return out
