"""Helpers of the agent tests: code strings the model is scripted to write, and a noise image."""

from __future__ import annotations

import numpy as np
from PIL import Image

ROTATE_90 = "result = image.transpose(Image.ROTATE_90)"
CROP = "result = image.crop((8, 4, 40, 28))"
FAILING = "result = undefined_name"


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
