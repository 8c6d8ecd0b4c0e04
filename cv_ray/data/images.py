"""Real pictures and fonts that ship with installed packages (no network, ever).

Photos come from ``skimage.data`` functions whose files are inside the scikit-image wheel; the
functions that would fetch through pooch (``eagle``, ``kidney``, ``lily``, ...) are deliberately not
listed. Fonts are the DejaVu TrueType files that matplotlib ships.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageFont, ImageOps

#: skimage.data pictures verified to load from the installed package without a download.
PHOTOS: tuple[str, ...] = (
    "astronaut", "camera", "coins", "coffee", "chelsea", "page", "text", "rocket", "moon", "horse", "clock",
    "hubble_deep_field", "immunohistochemistry", "grass", "gravel", "brick", "cat", "cell", "retina",
)

#: DejaVu fonts shipped in matplotlib's data directory.
FONTS: tuple[str, ...] = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
                          "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")


@functools.cache
def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=256)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    if name not in FONTS:
        raise KeyError(f"unknown font {name!r}; known: {', '.join(FONTS)}")
    return ImageFont.truetype(str(_font_dir() / name), size)


@functools.cache
def _photo_source(name: str) -> Image.Image:
    import skimage.data

    if name not in PHOTOS:
        raise KeyError(f"unknown photo {name!r}; known: {', '.join(PHOTOS)}")
    pixels = getattr(skimage.data, name)()
    if pixels.dtype != np.uint8:  # bool (horse) and float pictures: stretch to 0..255
        pixels = pixels.astype(np.float64)
        pixels = (255 * (pixels - pixels.min()) / max(1e-9, float(np.ptp(pixels)))).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image.convert("RGB")


@functools.lru_cache(maxsize=64)
def _photo_fitted(name: str, size: int) -> Image.Image:
    return ImageOps.fit(_photo_source(name), (size, size), Image.Resampling.BILINEAR)


def photo(name: str, size: int) -> Image.Image:
    """A ``size x size`` RGB copy of a packaged photo (center-fitted, cached)."""
    return _photo_fitted(name, size).copy()
