"""``imagic demo``: an edit with the shipped toy model, no download, well under a minute on a CPU.

The example photo (``example.png`` = data.make_example(EXAMPLE_SEED), a held-out image of the toy
generator: a small red triangle on the left, on its own gradient background) is edited with the
text "a large red triangle on the left": a non-rigid edit (the object's extent changes) that must
keep the colour, shape, placement and background. The contact sheet shows the input, the target
text, and one column per eta with the toy classifier's reading under it; the default eta's column
is framed. ``tests/test_demo.py`` runs this same code and checks that column.

The stages are short (SETTINGS) because the toy UNet has 2 M parameters at 32x32; a Stable Diffusion
edit uses the defaults of ``imagic edit`` (``imagic/defaults.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from .defaults import DEFAULTS, format_rate

EXAMPLE_SEED = 2_000_008  # test split: never seen in training
TARGET_TEXT = "a large red triangle on the left"
ETAS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # includes the default, DEFAULTS["eta"]
DEMO_SEED = 0
DEMO_OUT = "imagic_demo.png"
# Half the edit benchmark's 100 + 200 steps (stage 1 at twice its 1e-2; stage 2 LoRA at the default 1e-4),
# picked on this example: at seed 0 the default column reads as the target on all four attributes with the
# background kept, which tests/test_demo.py checks. At seeds 1 and 2 the edit is right too, but the
# background is redrawn, at eta 0 as well (0.13 and 0.15 from the photo's at eta 0.7), as it is at the
# benchmark's settings (0.11, 0.09).
SETTINGS = dict(embedding_steps=50, lr_embedding=2e-2, finetune_steps=100, lr_finetune=1e-4, method="lora",
                noise_samples=1)
# Mean absolute difference (0..1) between the result's background and the input's, over the pixels that
# neither the input's object nor the target's covers (1.5 px margin). For scale, on this example: another
# held-out image's background is 0.12 away (median of 200), the input's own gradient reversed 0.10.
BACKGROUND_LIMIT = 0.05
# The distance above is an average: a flat fill of the right mean colour scores well on it while the photo's
# gradient is gone. So the sheet also reads the share of the photo's background variation that is kept
# (background_structure: 1 kept, 0 flat). Below this share the demo says the gradient was flattened.
STRUCTURE_LIMIT = 0.4
# The toy UNet has 2 M parameters: a second thread buys little and, on a machine running anything else,
# oversubscribes its cores. The demo runs on one (tests/conftest.py does the same for the tests' models).
DEMO_THREADS = 1


def example_image():
    from PIL import Image

    from .toy import TOY_DIR

    return Image.open(TOY_DIR / "example.png").convert("RGB")


def sampler():
    """DDIM steps and guidance of the toy model's quality gate, at which its figures hold."""
    from .toy.sample import GATE

    return dict(steps=GATE["steps"], guidance=GATE["guidance"])


@dataclass
class Reading:
    """What the toy classifier reads in one image, against the target text's attributes."""
    attrs: dict
    confidence: float  # the lowest probability among the four attributes it read
    target: dict

    @property
    def is_target(self) -> bool:
        return all(self.attrs[k] == v for k, v in self.target.items())

    @property
    def wrong(self) -> List[str]:
        return [k for k, v in self.target.items() if self.attrs[k] != v]

    def text(self) -> str:
        from .toy import data

        return data.caption(self.attrs)[2:]  # without the leading "a "


@dataclass
class DemoRun:
    sheet: object  # PIL image
    boxes: list  # the box of each image on the sheet: input, then one per eta
    images: list  # input, then one PIL image per eta
    readings: List[Reading]  # the same order
    background: List[float]  # background distance to the input, the same order
    structure: List[float]  # share of the input's background variation kept, the same order
    chosen: int  # index (in images) of the default eta
    seed: int
    seconds: float = 0.0
    path: Optional[Path] = None
    settings: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # the photo's attributes (the generator's caption)


def background_distance(image, example, target: dict) -> float:
    """Mean |image - input| (0..1) over the background that neither the input's nor the target's object covers."""
    import numpy as np

    from .toy import data

    mask = data.background_mask(example.details, example.attrs, target)
    diff = np.abs(np.asarray(image, np.float32) - example.image.astype(np.float32)) / 255
    return float(diff[mask].mean())


def background_structure(image, example, target: dict) -> float:
    """The share of the photo's background variation (its gradient; mean colour removed) that ``image`` keeps,
    over the same pixels as :func:`background_distance`: 1 - |r - p|^2 / |p|^2; 1 kept, 0 a flat fill."""
    import numpy as np

    from .toy import data

    mask = data.background_mask(example.details, example.attrs, target)
    p = example.image.astype(np.float32)[mask] / 255
    r = np.asarray(image, np.float32)[mask] / 255
    p, r = p - p.mean(0), r - r.mean(0)
    return float(1 - ((r - p) ** 2).sum() / max(float((p ** 2).sum()), 1e-12))


def read(images, target: dict) -> List[Reading]:
    import numpy as np

    from .toy.classifier import predict_attributes

    preds = predict_attributes(np.stack([np.asarray(im) for im in images]), return_probs=True)
    return [Reading({k: p[k] for k in target}, min(p["probs"][k][p[k]] for k in target), target) for p in preds]


def make_demo(seed: int = DEMO_SEED, progress=None) -> DemoRun:
    """Train, sample every eta, read each image with the classifier and lay out the contact sheet."""
    from .output import contact_sheet
    from .pipeline import ImagicPipeline
    from .toy import MODEL_DIR, data

    example = data.make_example(EXAMPLE_SEED)
    target = data.parse_caption(TARGET_TEXT)
    pipe = ImagicPipeline.from_pretrained(MODEL_DIR, device="cpu")
    image = example_image()
    result = pipe.train(image, TARGET_TEXT, seed=seed, progress=progress, **SETTINGS)
    edits = pipe.sample(result, ETAS, seed=seed, progress=progress("sample") if progress else None, **sampler())
    images = [image] + edits
    readings = read(images, target)
    background = [background_distance(im, example, target) for im in images]
    structure = [background_structure(im, example, target) for im in images]
    chosen = 1 + ETAS.index(DEFAULTS["eta"])
    settings = dict(SETTINGS, **sampler(), seed=seed)
    sheet, boxes = contact_sheet(
        images, ["input"] + [f"eta {e:.1f}" + (" (default)" if i + 1 == chosen else "") for i, e in enumerate(ETAS)],
        title=[f"Imagic demo: the photo (\"{example.caption}\") edited with the text \"{TARGET_TEXT}\"",
               "eta mixes the two embeddings: 0 rebuilds the photo, 1 is the target text alone. "
               f"Framed: the default, eta {DEFAULTS['eta']}.",
               "Under each image: what the toy's attribute classifier reads (green: the target, grey: the photo, "
               "red: neither); bg: the background's mean difference from the photo's (0..1), and the share of the "
               "photo's gradient kept (1 all, 0 flat).",
               f"Toy model (2 M parameters, 32x32 px), short stages: {describe_settings(settings)}."],
        captions=[_caption(r, example.attrs, b, st, i == 0)
                  for i, (r, b, st) in enumerate(zip(readings, background, structure))],
        chosen=chosen)
    return DemoRun(sheet, boxes, images, readings, background, structure, chosen, seed, settings=settings,
                   source=example.attrs)


def _verdict(reading: Reading, source: dict, is_input: bool) -> Tuple[str, object]:
    """What one column shows, and its colour: the photo (black), the photo rebuilt (grey), the target
    (green), or neither (red, with the attributes that miss the target)."""
    if is_input:
        return "the photo", "black"
    if reading.is_target:
        return "the target", (0, 130, 50)
    if reading.attrs == source:
        return "the photo rebuilt", (110, 110, 110)
    return "not: " + ", ".join(reading.wrong), (200, 30, 30)


def _caption(reading: Reading, source: dict, background: float, structure: float, is_input: bool):
    first, second = reading.text().split(" on the ")
    verdict, colour = _verdict(reading, source, is_input)
    return [(first, colour), ("on the " + second, colour), (f"{verdict} (p {reading.confidence:.2f})", colour),
            "" if is_input else f"bg {background:.3f}, gradient {structure:.2f}"]


def describe_settings(settings: dict) -> str:
    s = settings
    method = "LoRA" if s["method"] == "lora" else s["method"]
    return (f"stage 1 {s['embedding_steps']} steps at {format_rate(s['lr_embedding'])}, stage 2 {method} "
            f"{s['finetune_steps']} steps at {format_rate(s['lr_finetune'])}, DDIM {s['steps']} steps, guidance "
            f"{s['guidance']:g}, seed {s['seed']}")


def run_demo(args) -> List[Path]:
    """``imagic demo``: make the demo, write the sheet, say where it is, how long it took and what to look at."""
    from .output import quiet_libraries, save_image, stage_bar
    from .toy import MODEL_DIR

    import torch

    torch.set_num_threads(DEMO_THREADS)
    start = time.perf_counter()
    out = Path(args.out)
    from .output import image_format

    image_format(out)  # a wrong extension fails before the minute of work
    print(f"imagic demo: the toy model's example photo edited with the text {TARGET_TEXT!r}\n"
          f"  model {MODEL_DIR} (2 M parameters, 32x32 px, shipped); short stages for a toy: "
          f"{describe_settings(dict(SETTINGS, **sampler(), seed=args.seed))}; {DEMO_THREADS} torch thread", flush=True)
    quiet_libraries()
    run = make_demo(args.seed, progress=stage_bar())
    run.path = save_image(run.sheet, out).resolve()
    run.seconds = time.perf_counter() - start
    print(summary(run))
    return [run.path]


def summary(run: DemoRun) -> str:
    """The readings per eta, where the sheet went, the time, and what to look at (true to this run)."""
    lines = [f"what the toy classifier reads (the target: {TARGET_TEXT[2:]}):"]
    labels = ["input"] + [f"eta {e:.1f}" for e in ETAS]
    for i, (label, r, b, st) in enumerate(zip(labels, run.readings, run.background, run.structure)):
        verdict, _ = _verdict(r, run.source, i == 0)
        lines.append(f"  {label:8s} {r.text():32s} p {r.confidence:.2f}  {verdict:18s}"
                     + (f"  background {b:.3f}, gradient kept {st:.2f}" if i else "")
                     + ("  <- the default" if i == run.chosen else ""))
    eta = DEFAULTS["eta"]
    r, b, st = run.readings[run.chosen], run.background[run.chosen], run.structure[run.chosen]
    lines.append(f"wrote {run.path} in {run.seconds:.0f} s")
    if r.is_target and b < BACKGROUND_LIMIT and st >= STRUCTURE_LIMIT:
        lines.append(f"look at the framed column (eta {eta}, the default): the triangle grew, a non-rigid edit, and "
                     f"kept its colour and its place; the background stays close to the photo's (difference "
                     f"{b:.3f}; another photo's background is about 0.12 away)"
                     + (f", but only {st:.2f} of its gradient's variation is kept ({run.structure[1]:.2f} at eta 0): "
                        "the background is greyer than the photo's" if st < 0.8 else f", its gradient kept ({st:.2f})")
                     + ". eta 0 rebuilds the photo; towards eta 1 the text weighs more and the photo less.")
    else:
        problem = (f"the classifier reads {r.text()!r}; compare the other etas" if not r.is_target else
                   f"its background is {b:.3f} from the photo's (the limit: {BACKGROUND_LIMIT}), and "
                   f"{run.background[1]:.3f} at eta 0: at this seed the short fine-tune does not rebuild the "
                   "photo's background" if b >= BACKGROUND_LIMIT else
                   f"it keeps {st:.2f} of the photo's background gradient (the limit: {STRUCTURE_LIMIT}): the "
                   "background is flattened")
        lines.append(f"look at the framed column (eta {eta}, the default): at seed {run.seed} it is not the clean "
                     f"edit: {problem}. The README shows seed {DEMO_SEED}.")
    return "\n".join(lines)
