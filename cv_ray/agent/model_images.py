"""Resize tool output images for the model, keeping the originals for later ``image_index`` calls."""

from __future__ import annotations

import math

from PIL import Image


def fit_pixels(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size closest to ``width x height`` with the same aspect ratio and an area in [min, max].

    Scales by ``sqrt(bound / area)``; rounds down when shrinking (so the area stays <= max_pixels)
    and up when enlarging (so it reaches min_pixels). Sides are at least 1 pixel.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    area = width * height
    if area > max_pixels:
        scale = math.sqrt(max_pixels / area)
        return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    if area < min_pixels:
        scale = math.sqrt(min_pixels / area)
        return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))
    return width, height


def resize_for_model(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """``image`` itself when its area is in range, else a bicubic resize by :func:`fit_pixels`."""
    size = fit_pixels(image.width, image.height, min_pixels, max_pixels)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)
