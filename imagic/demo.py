"""``imagic demo``: an edit with the shipped toy model, no download, a couple of minutes on a CPU.

The example photo (a held-out image of the toy generator, ``example.png`` = data.make_example(EXAMPLE_SEED):
a large red circle on the left, on its own background) is edited with the text "a small red circle
on the left": a non-rigid edit (the object's extent changes) that must keep the colour, shape,
placement and background. The contact sheet shows the input and one column per eta. Settings are
the edit-quality benchmark's (benchmarks/edit_quality.py), where size edits succeed.
"""
from __future__ import annotations

from pathlib import Path

EXAMPLE_SEED = 2_000_014  # test split: never seen in training
TARGET_TEXT = "a small red circle on the left"
ETAS = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
SETTINGS = dict(embedding_steps=100, finetune_steps=200, lr_embedding=1e-2, lr_finetune=1e-4, noise_samples=1)


def example_image():
    from PIL import Image

    from .toy import TOY_DIR

    return Image.open(TOY_DIR / "example.png").convert("RGB")


def run_demo(args):
    from .cli import _quiet_libraries, _stage_bar, contact_sheet, save_image
    from .pipeline import ImagicPipeline
    from .toy import MODEL_DIR
    from .toy.sample import GATE

    out = Path(args.out)
    _quiet_libraries()
    pipe = ImagicPipeline.from_pretrained(MODEL_DIR, device="cpu")
    image = example_image()
    print(f"editing the example image with {TARGET_TEXT!r} (toy model, {MODEL_DIR})")
    bars = _stage_bar({"embedding": "1/3 optimize embedding", "finetune": "2/3 fine-tune", "sample": "3/3 sample"})
    result = pipe.train(image, TARGET_TEXT, seed=args.seed, progress=bars, **SETTINGS)
    images = pipe.sample(result, ETAS, seed=args.seed, steps=GATE["steps"], guidance=GATE["guidance"],
                         progress=bars("sample"))
    save_image(contact_sheet([image] + images, ["input"] + [f"eta {e:.1f}" for e in ETAS]), out)
    return [out]
