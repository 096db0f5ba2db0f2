import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The tests' models are tiny: threads buy nothing, and torch's default (one per core) oversubscribes a
# machine that is running anything else (the suite once took 27 min that way, 49 s with one thread).
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def tiny_vpred_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_vpred") / "model", prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def tiny_flow_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_flow") / "model", prediction_type="flow", seed=2)


@pytest.fixture(scope="session")
def pipe(tiny_sd_dir):
    from imagic.pipeline import ImagicPipeline

    return ImagicPipeline.from_pretrained(tiny_sd_dir, device="cpu")


@pytest.fixture(scope="session")
def photo(tmp_path_factory):
    """A non-square 'photo': a gradient with a bright square, so it has structure to reconstruct."""
    h, w = 24, 40
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, 80)], -1).astype(np.uint8)
    img[6:16, 10:22] = [250, 240, 30]
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(img).save(path)
    return path
