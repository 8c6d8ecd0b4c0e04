"""Many ways to write the same image op: the code snippets of the SFT trajectories.

Each op has several styles (PIL, NumPy, OpenCV) so the model sees that ``rotate_90`` can be
``image.transpose(...)``, ``np.rot90`` or ``cv2.rotate``. A style is a function from the op's
arguments to code; ``src`` is the name the code uses for its input image (``image`` or ``img``, both
defined by the tool). Every snippet leaves a PIL image in ``result``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CodeStyle = Callable[..., str]

_CV2_ROTATE = {90: "cv2.ROTATE_90_COUNTERCLOCKWISE", 180: "cv2.ROTATE_180", 270: "cv2.ROTATE_90_CLOCKWISE"}


def _rotate_styles(angle: int) -> dict[str, CodeStyle]:
    return {
        "pil_transpose": lambda src: f"result = {src}.transpose(Image.Transpose.ROTATE_{angle})",
        "pil_rotate": lambda src: f"# rotate counter-clockwise by {angle} degrees\nresult = {src}.rotate({angle}, expand=True)",
        "numpy": lambda src: f"arr = np.array({src})\nresult = Image.fromarray(np.rot90(arr, k={angle // 90}))",
        "cv2": lambda src: f"arr = np.array({src})\nturned = cv2.rotate(arr, {_CV2_ROTATE[angle]})\nresult = Image.fromarray(turned)",
    }


def _flip_styles(horizontal: bool) -> dict[str, CodeStyle]:
    pil_op = "ImageOps.mirror" if horizontal else "ImageOps.flip"
    transpose = "FLIP_LEFT_RIGHT" if horizontal else "FLIP_TOP_BOTTOM"
    numpy_op = "np.fliplr" if horizontal else "np.flipud"
    cv2_code = 1 if horizontal else 0
    return {
        "pil_ops": lambda src: f"result = {pil_op}({src})",
        "pil_transpose": lambda src: f"result = {src}.transpose(Image.Transpose.{transpose})",
        "numpy": lambda src: f"arr = np.asarray({src})\nresult = Image.fromarray(np.ascontiguousarray({numpy_op}(arr)))",
        "cv2": lambda src: f"arr = np.array({src})\nresult = Image.fromarray(cv2.flip(arr, {cv2_code}))",
    }


def _crop_styles() -> dict[str, CodeStyle]:
    def pil(src: str, box: list[int], scale: int) -> str:
        x1, y1, x2, y2 = box
        return (f"region = {src}.crop(({x1}, {y1}, {x2}, {y2}))\n"
                f"result = region.resize((region.width * {scale}, region.height * {scale}), Image.Resampling.LANCZOS)")

    def numpy(src: str, box: list[int], scale: int) -> str:
        x1, y1, x2, y2 = box
        return (f"arr = np.array({src})\nregion = arr[{y1}:{y2}, {x1}:{x2}]\n"
                f"result = Image.fromarray(region).resize(({(x2 - x1) * scale}, {(y2 - y1) * scale}), "
                "Image.Resampling.BICUBIC)")

    def cv2_style(src: str, box: list[int], scale: int) -> str:
        x1, y1, x2, y2 = box
        return (f"arr = np.array({src})\nx1, y1, x2, y2 = {x1}, {y1}, {x2}, {y2}\nregion = arr[y1:y2, x1:x2]\n"
                f"zoomed = cv2.resize(region, None, fx={scale}, fy={scale}, interpolation=cv2.INTER_CUBIC)\n"
                "result = Image.fromarray(zoomed)")

    return {"pil": pil, "numpy": numpy, "cv2": cv2_style}


ENHANCE_STYLES: dict[str, dict[str, CodeStyle]] = {
    "contrast_up": {
        "pil_enhance": lambda src: f"result = ImageEnhance.Contrast({src}).enhance(2.8)",
        "pil_enhance_strong": lambda src: f"enhancer = ImageEnhance.Contrast({src})\nresult = enhancer.enhance(3.5)",
    },
    "brightness_up": {
        "pil_enhance": lambda src: f"result = ImageEnhance.Brightness({src}).enhance(3.0)",
        "pil_enhance_strong": lambda src: f"brighter = ImageEnhance.Brightness({src})\nresult = brighter.enhance(3.5)",
    },
    "sharpen": {
        "pil_filter": lambda src: f"result = {src}.filter(ImageFilter.SHARPEN)",
        "pil_unsharp": lambda src: f"result = {src}.filter(ImageFilter.UnsharpMask(radius=2, percent=250, threshold=2))",
    },
}

ORIENTATION_STYLES: dict[str, dict[str, CodeStyle]] = {
    "rotate_90": _rotate_styles(90), "rotate_180": _rotate_styles(180), "rotate_270": _rotate_styles(270),
    "flip_horizontal": _flip_styles(True), "flip_vertical": _flip_styles(False),
}
CROP_STYLES: dict[str, CodeStyle] = _crop_styles()


def pick(styles: dict[str, CodeStyle], rng: np.random.Generator) -> tuple[str, CodeStyle]:
    """A style chosen uniformly (its name is recorded in the SFT example's metadata)."""
    name = str(rng.choice(sorted(styles)))
    return name, styles[name]
