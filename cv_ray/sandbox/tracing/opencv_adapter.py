"""The OpenCV adapter: cv2's turns, flips, resizes, warps, borders, colour conversions, filters and
drawing functions -> records (see :mod:`cv_ray.sandbox.tracing.registry` for the table's form)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from cv_ray.sandbox.ops import CORE_OPS, DIHEDRAL_SEQUENCES, canonical_ops
from cv_ray.sandbox.tracing.registry import Patch, arg, array_size, resize_ops

#: Photometric cv2 functions (output keeps the input's geometry) -> op name.
_PHOTOMETRIC: dict[str, str] = {
    **dict.fromkeys(["GaussianBlur", "blur", "boxFilter", "stackBlur"], "blur"),
    **dict.fromkeys(["medianBlur", "bilateralFilter", "fastNlMeansDenoising", "fastNlMeansDenoisingColored"],
                    "denoise"),
    **dict.fromkeys(["Canny", "Sobel", "Scharr", "Laplacian"], "edge_detection"),
    **dict.fromkeys(["threshold", "adaptiveThreshold"], "threshold"),
    **dict.fromkeys(["erode", "dilate", "morphologyEx"], "morphology"),
    "equalizeHist": "equalize", "filter2D": "convolve", "bitwise_not": "invert",
    "normalize": "autocontrast", "LUT": "lut", "addWeighted": "blend", "detailEnhance": "sharpen",
}
#: cv2 drawing functions (they draw into their first argument in place).
_DRAWING = ("rectangle", "circle", "line", "arrowedLine", "putText", "ellipse", "polylines",
            "fillPoly", "fillConvexPoly", "drawContours", "drawMarker")
_ROTATE_OPS = {int(cv2.ROTATE_90_COUNTERCLOCKWISE): "rotate_90", int(cv2.ROTATE_180): "rotate_180",
               int(cv2.ROTATE_90_CLOCKWISE): "rotate_270"}
_TO_GRAY = frozenset(getattr(cv2, n) for n in dir(cv2) if n.startswith("COLOR_") and n.endswith("2GRAY"))


def _photometric(name: str, op: str) -> Callable[..., None]:
    def handler(tracer, out: Any, args: tuple, kwargs: dict) -> None:
        image = out[1] if isinstance(out, tuple) else out  # threshold returns (retval, dst)
        src = arg(args, kwargs, 0, "src")
        if isinstance(image, np.ndarray) and isinstance(src, np.ndarray) and image.shape[:2] == src.shape[:2]:
            params: dict[str, Any] = {}
            if name == "threshold":
                params["threshold"] = float(arg(args, kwargs, 1, "thresh"))
            tracer.photometric(src, image, op, f"cv2.{name}", **params)

    return handler


def _on_rotate(tracer, out: np.ndarray, args: tuple, kwargs: dict) -> None:
    name = _ROTATE_OPS[int(arg(args, kwargs, 1, "rotateCode"))]
    tracer.emit(tracer.node_of(args[0]), {"op": name, "via": "cv2.rotate"}, out)


def _on_flip(tracer, out: np.ndarray, args: tuple, kwargs: dict) -> None:
    code = int(arg(args, kwargs, 1, "flipCode"))
    name = "flip_vertical" if code == 0 else "flip_horizontal" if code > 0 else "rotate_180"
    tracer.emit(tracer.node_of(args[0]), {"op": name, "via": "cv2.flip"}, out)


def _on_transpose(tracer, out: np.ndarray, args: tuple, kwargs: dict) -> None:
    tracer.emit_chain(tracer.node_of(args[0]), [{"op": n, "via": "cv2.transpose"} for n in DIHEDRAL_SEQUENCES[6]], out)


def _resized(via: str) -> Callable[..., None]:
    def handler(tracer, out: np.ndarray, args: tuple, kwargs: dict) -> None:
        src = arg(args, kwargs, 0, "src")
        tracer.emit_chain(tracer.node_of(src), resize_ops(array_size(src), array_size(out), None, via), out)

    return handler


def _on_warp_affine(tracer, out: np.ndarray, args: tuple, kwargs: dict) -> None:
    src = arg(args, kwargs, 0, "src")
    forward = np.vstack([np.asarray(arg(args, kwargs, 1, "M"), dtype=np.float64).reshape(2, 3), [0, 0, 1]])
    flags = int(arg(args, kwargs, 4, "flags", cv2.INTER_LINEAR))
    # cv2 maps dst -> src through the inverse unless WARP_INVERSE_MAP; its pixel centres are
    # integers, ours are at +0.5, hence the half-pixel shifts around the map.
    back = forward if flags & cv2.WARP_INVERSE_MAP else np.linalg.inv(forward)
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    matrix = (shift @ back @ np.linalg.inv(shift)).tolist()
    out_w, out_h = array_size(out)
    ops = canonical_ops(matrix, out_w, out_h, *array_size(src), tol=1e-4)
    if ops is None:
        linear = np.asarray(matrix)[:2, :2]
        similar = abs(linear[0, 0] - linear[1, 1]) < 1e-4 and abs(linear[0, 1] + linear[1, 0]) < 1e-4
        angle = float(np.degrees(np.arctan2(linear[1, 0], linear[0, 0])))
        ops = [{"op": "rotate_arbitrary", "angle": angle} if similar else {"op": "affine"}]
        ops[0]["changed"] = True
    for op in ops:
        op["via"] = "cv2.warpAffine"
        if op["op"] not in CORE_OPS:
            op.setdefault("changed", True)
    tracer.emit_chain(tracer.node_of(src), ops, out)


def _on_border(tracer, out: np.ndarray, args: tuple, kwargs: dict) -> None:
    src = arg(args, kwargs, 0, "src")
    top = int(arg(args, kwargs, 1, "top"))
    left = int(arg(args, kwargs, 3, "left"))
    out_w, out_h = array_size(out)
    box = [-left, -top, out_w - left, out_h - top]
    tracer.emit(tracer.node_of(src), {"op": "pad", "box": box, "via": "cv2.copyMakeBorder",
                                      "changed": out.shape[:2] != src.shape[:2]}, out)


def _on_cvt_color(tracer, out: np.ndarray, args: tuple, kwargs: dict) -> None:
    src = arg(args, kwargs, 0, "src")
    code = int(arg(args, kwargs, 1, "code"))
    tracer.photometric(src, out, "grayscale" if code in _TO_GRAY else "color_convert", "cv2.cvtColor")


def _on_scale_abs(tracer, out: np.ndarray, args: tuple, kwargs: dict) -> None:
    alpha = float(arg(args, kwargs, 2, "alpha", 1.0))
    beta = float(arg(args, kwargs, 3, "beta", 0.0))
    if alpha != 1.0:
        op, factor = ("contrast_up" if alpha > 1.0 else "contrast_down"), alpha
    else:
        op, factor = ("brightness_up" if beta >= 0 else "brightness_down"), beta
    tracer.photometric(arg(args, kwargs, 0, "src"), out, op, "cv2.convertScaleAbs", factor=factor)


def _drawing(name: str) -> Callable[..., None]:
    return lambda tracer, out, args, kwargs: tracer.emit_in_place(arg(args, kwargs, 0, "img"), f"cv2.{name}")


PATCHES: tuple[Patch, ...] = (
    Patch(cv2, "rotate", _on_rotate),
    Patch(cv2, "flip", _on_flip),
    Patch(cv2, "transpose", _on_transpose),
    *(Patch(cv2, name, _resized(f"cv2.{name}")) for name in ("resize", "pyrDown", "pyrUp")),
    Patch(cv2, "warpAffine", _on_warp_affine),
    Patch(cv2, "warpPerspective", lambda tracer, out, args, kwargs: tracer.emit(
        tracer.node_of(args[0]), {"op": "perspective", "via": "cv2.warpPerspective", "changed": True}, out)),
    Patch(cv2, "copyMakeBorder", _on_border),
    Patch(cv2, "cvtColor", _on_cvt_color),
    Patch(cv2, "convertScaleAbs", _on_scale_abs),
    *(Patch(cv2, name, _photometric(name, op)) for name, op in _PHOTOMETRIC.items() if hasattr(cv2, name)),
    *(Patch(cv2, name, _drawing(name)) for name in _DRAWING if hasattr(cv2, name)),
)
