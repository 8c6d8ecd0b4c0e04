"""Corruption ops: pure functions on PIL images, each with its exact fix and its box map.

A corruption is what the *data* does to a clean image (the model must undo it); its ``fix_ops``
are the sandbox op names the model should apply. Geometric corruptions also map the answer box
from the clean frame to the corrupted frame (continuous pixel coordinates, exclusive box ends, see
``cv_ray/geometry.py``). Natural corruptions keep the frame (identity map).

Randomness never happens inside ``apply``: parameters are drawn once by ``sample_params(rng)`` and
recorded, so ``apply(image, params)`` re-creates the corrupted image exactly from the record.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from cv_ray.geometry import identity, map_box
from cv_ray.types import Box, Matrix3

Params = dict[str, Any]


@dataclass(frozen=True)
class Corruption:
    """One corruption: how to draw its parameters, apply it, map the frame, and fix it."""

    name: str
    fix_ops: tuple[str, ...]
    """Sandbox op names that undo (or best counter) the corruption, in order."""
    apply: Callable[[Image.Image, Params], Image.Image]
    frame_map: Callable[[int, int], Matrix3]
    """``(width, height)`` of the clean image -> matrix mapping clean pixels to corrupted pixels."""
    sample_params: Callable[[np.random.Generator], Params]
    geometric: bool


def _no_params(rng: np.random.Generator) -> Params:
    return {}


# Frame maps of the five orientation changes on a W x H image, derived on corners (PIL conventions):
# rotate_90 (CCW): the top-right corner (W, 0) becomes the top-left (0, 0), and the top-left (0, 0)
#   becomes the bottom-left (0, W) of the H x W result:  (x, y) -> (y, W - x).
# rotate_180: (x, y) -> (W - x, H - y).
# rotate_270 (CW): the top-left (0, 0) becomes the top-right (H, 0):  (x, y) -> (H - y, x).
# flip_horizontal: (x, y) -> (W - x, y);  flip_vertical: (x, y) -> (x, H - y).
def _rot90_map(w: int, h: int) -> Matrix3:
    return [[0.0, 1.0, 0.0], [-1.0, 0.0, float(w)], [0.0, 0.0, 1.0]]


def _rot180_map(w: int, h: int) -> Matrix3:
    return [[-1.0, 0.0, float(w)], [0.0, -1.0, float(h)], [0.0, 0.0, 1.0]]


def _rot270_map(w: int, h: int) -> Matrix3:
    return [[0.0, -1.0, float(h)], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def _flip_h_map(w: int, h: int) -> Matrix3:
    return [[-1.0, 0.0, float(w)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def _flip_v_map(w: int, h: int) -> Matrix3:
    return [[1.0, 0.0, 0.0], [0.0, -1.0, float(h)], [0.0, 0.0, 1.0]]


def _same_frame(w: int, h: int) -> Matrix3:
    return identity()


def _transpose(method: Image.Transpose) -> Callable[[Image.Image, Params], Image.Image]:
    return lambda image, params: image.transpose(method)


def _gaussian_noise(image: Image.Image, params: Params) -> Image.Image:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    noise = np.random.default_rng(params["noise_seed"]).normal(0.0, params["sigma"], pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def _blur(image: Image.Image, params: Params) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(params["radius"]))


def _low_contrast(image: Image.Image, params: Params) -> Image.Image:
    return ImageEnhance.Contrast(image).enhance(params["factor"])


def _darken(image: Image.Image, params: Params) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(params["factor"])


def _jpeg(image: Image.Image, params: Params) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=params["quality"])
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _round(value: float) -> float:
    # Parameters are stored in JSON records; rounding keeps the record and the applied value equal.
    return round(float(value), 3)


CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption("rotate_90", ("rotate_270",), _transpose(Image.Transpose.ROTATE_90), _rot90_map, _no_params, True),
        Corruption("rotate_180", ("rotate_180",), _transpose(Image.Transpose.ROTATE_180), _rot180_map, _no_params,
                   True),
        Corruption("rotate_270", ("rotate_90",), _transpose(Image.Transpose.ROTATE_270), _rot270_map, _no_params,
                   True),
        Corruption("flip_horizontal", ("flip_horizontal",), _transpose(Image.Transpose.FLIP_LEFT_RIGHT), _flip_h_map,
                   _no_params, True),
        Corruption("flip_vertical", ("flip_vertical",), _transpose(Image.Transpose.FLIP_TOP_BOTTOM), _flip_v_map,
                   _no_params, True),
        Corruption("gaussian_noise", ("denoise",), _gaussian_noise, _same_frame,
                   lambda rng: {"sigma": _round(rng.uniform(18, 32)), "noise_seed": int(rng.integers(2**31))}, False),
        Corruption("blur", ("sharpen",), _blur, _same_frame, lambda rng: {"radius": _round(rng.uniform(1.2, 2.0))},
                   False),
        Corruption("low_contrast", ("contrast_up",), _low_contrast, _same_frame,
                   lambda rng: {"factor": _round(rng.uniform(0.2, 0.35))}, False),
        Corruption("darken", ("brightness_up",), _darken, _same_frame,
                   lambda rng: {"factor": _round(rng.uniform(0.2, 0.35))}, False),
        Corruption("jpeg", ("denoise",), _jpeg, _same_frame, lambda rng: {"quality": int(rng.integers(5, 12))}, False),
    )
}

ORIENTATION_CORRUPTIONS: tuple[str, ...] = ("rotate_90", "rotate_180", "rotate_270", "flip_horizontal",
                                            "flip_vertical")
NATURAL_CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "blur", "low_contrast", "darken", "jpeg")


def get_corruption(name: str) -> Corruption:
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name]


def apply_corruptions(image: Image.Image, box: Sequence[float] | None,
                      records: Sequence[Params]) -> tuple[Image.Image, Box | None]:
    """Apply recorded corruptions ``[{"name": ..., "params": {...}}, ...]`` in order.

    Returns the corrupted image and ``box`` (clean frame) mapped into the corrupted frame.
    """
    mapped = list(box) if box is not None else None
    for record in records:
        corruption = get_corruption(record["name"])
        if mapped is not None:
            mapped = map_box(corruption.frame_map(*image.size), mapped)
        image = corruption.apply(image, record["params"])
    return image, mapped


def sample_corruption(name: str, rng: np.random.Generator) -> Params:
    """A reproducible record of corruption ``name`` with parameters drawn from ``rng``."""
    return {"name": name, "params": get_corruption(name).sample_params(rng)}


def fix_ops(records: Sequence[Params]) -> list[str]:
    """The fixes (sandbox op names) for a chain of corruptions: undo the last one first."""
    ops: list[str] = []
    for record in reversed(records):
        ops.extend(get_corruption(record["name"]).fix_ops)
    return ops
