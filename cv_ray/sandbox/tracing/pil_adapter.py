"""The PIL adapter: ``Image.Image`` methods, ``Image.fromarray``, ``ImageOps``, ``ImageEnhance``,
``ImageDraw`` -> records (see :mod:`cv_ray.sandbox.tracing.registry` for the table's form)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from cv_ray.sandbox.ops import DIHEDRAL_SEQUENCES
from cv_ray.sandbox.tracing.registry import Patch, arg, literal_box, resize_ops

_TRANSPOSE_OPS: dict[int, tuple[str, ...]] = {
    int(Image.Transpose.FLIP_LEFT_RIGHT): ("flip_horizontal",),
    int(Image.Transpose.FLIP_TOP_BOTTOM): ("flip_vertical",),
    int(Image.Transpose.ROTATE_90): ("rotate_90",),
    int(Image.Transpose.ROTATE_180): ("rotate_180",),
    int(Image.Transpose.ROTATE_270): ("rotate_270",),
    int(Image.Transpose.TRANSPOSE): DIHEDRAL_SEQUENCES[6],
    int(Image.Transpose.TRANSVERSE): DIHEDRAL_SEQUENCES[7],
}
assert DIHEDRAL_SEQUENCES[6] == ("flip_horizontal", "rotate_90")

#: ``ImageFilter`` class name -> op name.
_FILTER_OPS: dict[str, str] = {
    **dict.fromkeys(["BLUR", "GaussianBlur", "BoxBlur", "SMOOTH", "SMOOTH_MORE"], "blur"),
    # Median and edge-preserving filters remove noise rather than soften everything: "denoise", the
    # fix the data generator records for noise and JPEG corruptions.
    "MedianFilter": "denoise",
    **dict.fromkeys(["SHARPEN", "UnsharpMask", "DETAIL", "EDGE_ENHANCE", "EDGE_ENHANCE_MORE"], "sharpen"),
    **dict.fromkeys(["FIND_EDGES", "CONTOUR", "EMBOSS"], "edge_detection"),
    **dict.fromkeys(["MinFilter", "MaxFilter", "ModeFilter", "RankFilter"], "morphology"),
}
#: ``ImageEnhance`` class name -> op stem (``contrast`` -> ``contrast_up`` / ``contrast_down``).
_ENHANCE_OPS: dict[str, str] = {"Contrast": "contrast", "Brightness": "brightness",
                                "Sharpness": "sharpness", "Color": "saturation"}
#: Photometric ``ImageOps`` functions (same geometry) -> op name.
_IMAGEOPS_PHOTOMETRIC: dict[str, str] = {
    "grayscale": "grayscale", "autocontrast": "autocontrast", "equalize": "equalize",
    "invert": "invert", "posterize": "posterize", "solarize": "solarize",
}
_IMAGEDRAW_METHODS = ("arc", "bitmap", "chord", "circle", "ellipse", "line", "multiline_text", "pieslice",
                      "point", "polygon", "rectangle", "regular_polygon", "rounded_rectangle", "text")
_GRAY_MODES = frozenset({"L", "LA", "I", "I;16", "F"})


def _on_rotate(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
    src = args[0]
    angle = float(arg(args, kwargs, 1, "angle")) % 360.0
    expand = bool(arg(args, kwargs, 3, "expand", False))
    moved = arg(args, kwargs, 4, "center") or arg(args, kwargs, 5, "translate")
    if angle == 0 and not moved:
        tracer.emit_same(tracer.node_of(src), out)
        return
    name = {90.0: "rotate_90", 180.0: "rotate_180", 270.0: "rotate_270"}.get(angle)
    if name is None or moved:
        name = "rotate_arbitrary"
    op = {"op": name, "angle": angle, "expand": expand, "via": "Image.rotate"}
    if name == "rotate_arbitrary":
        op["changed"] = True
    tracer.emit(tracer.node_of(src), op, out, out.size)


def _on_transpose(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
    names = _TRANSPOSE_OPS[int(arg(args, kwargs, 1, "method"))]
    tracer.emit_chain(tracer.node_of(args[0]), [{"op": n, "via": "Image.transpose"} for n in names], out)


def _on_crop(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
    box = arg(args, kwargs, 1, "box")
    if box is None:
        literal = box = [0, 0, *args[0].size]
    else:  # PIL rounds the box to whole pixels; the reward's reference mode wants it as passed
        literal, box = literal_box(box), [round(float(v)) for v in box]
    tracer.emit(tracer.node_of(args[0]), {"op": "crop", "box": box, "frame_box": literal, "via": "Image.crop"}, out)


def _on_resize(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
    src = args[0]
    tracer.emit_chain(tracer.node_of(src), resize_ops(src.size, out.size, arg(args, kwargs, 3, "box"), "Image.resize"),
                      out)


def _on_reduce(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
    src = args[0]
    tracer.emit_chain(tracer.node_of(src), resize_ops(src.size, out.size, arg(args, kwargs, 2, "box"), "Image.reduce"),
                      out)


def _resized_output(via: str) -> Callable[..., None]:
    def handler(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
        tracer.emit_chain(tracer.node_of(args[0]), resize_ops(args[0].size, out.size, None, via), out)

    return handler


def _on_thumbnail(tracer, out: None, args: tuple, kwargs: dict, size_before: tuple[int, int]) -> None:
    image = args[0]
    if image.size != size_before:
        tracer.emit(tracer.node_of(image), {"op": "resize", "size": list(image.size), "via": "Image.thumbnail",
                                            "changed": True}, image)


def _on_filter(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
    flt = arg(args, kwargs, 1, "filter")
    name = flt.__name__ if isinstance(flt, type) else type(flt).__name__
    params: dict[str, Any] = {}
    radius = getattr(flt, "radius", None)
    if isinstance(radius, (int, float)):
        params["radius"] = float(radius)
    tracer.photometric(args[0], out, _FILTER_OPS.get(name, "convolve"), f"ImageFilter.{name}", **params)


def _on_convert(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
    src = args[0]
    mode = out.mode
    if mode == src.mode:
        tracer.emit_same(tracer.node_of(src), out)
        return
    if mode in _GRAY_MODES and src.mode not in _GRAY_MODES:
        op = "grayscale"
    elif mode == "1":
        op = "threshold"
    else:
        op = "color_convert"
    tracer.photometric(src, out, op, "Image.convert")


def _on_imageops_crop(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
    src = args[0]
    border = int(arg(args, kwargs, 1, "border", 0))
    if border == 0:
        tracer.emit_same(tracer.node_of(src), out)
        return
    box = [border, border, src.width - border, src.height - border]
    tracer.emit(tracer.node_of(src), {"op": "crop", "box": box, "via": "ImageOps.crop"}, out)


def _on_imageops_expand(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
    src = args[0]
    border = arg(args, kwargs, 1, "border", 0)
    # `border` is one width, (left, top) or (left, top, right, bottom); the output's box in the
    # source frame starts at minus the left/top widths.
    left, top = (int(border[0]), int(border[1])) if isinstance(border, (tuple, list)) else (int(border),) * 2
    box = [-left, -top, out.width - left, out.height - top]
    tracer.emit(tracer.node_of(src), {"op": "pad", "box": box, "via": "ImageOps.expand", "changed": True}, out)


def _on_enhance(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
    enhancer = args[0]
    factor = float(arg(args, kwargs, 1, "factor"))
    stem = _ENHANCE_OPS.get(type(enhancer).__name__)
    if stem is None:
        return
    op = f"{stem}_up" if factor >= 1.0 else f"{stem}_down"
    tracer.photometric(enhancer.image, out, op, f"ImageEnhance.{type(enhancer).__name__}", factor=factor)


def _orientation(name: str, via: str) -> Callable[..., None]:
    def handler(tracer, out: Any, args: tuple, kwargs: dict) -> None:
        tracer.emit(tracer.node_of(args[0]), {"op": name, "via": via}, out)

    return handler


def _imageops_photometric(name: str, op: str) -> Callable[..., None]:
    def handler(tracer, out: Image.Image, args: tuple, kwargs: dict) -> None:
        params: dict[str, Any] = {}
        if name == "posterize":
            params["bits"] = int(arg(args, kwargs, 1, "bits"))
        elif name == "solarize":
            params["threshold"] = float(arg(args, kwargs, 1, "threshold", 128))
        tracer.photometric(args[0], out, op, f"ImageOps.{name}", **params)

    return handler


def _in_place(via: str) -> Callable[..., None]:
    return lambda tracer, out, args, kwargs: tracer.emit_in_place(args[0], via)


def _same_pixels(tracer, out: Any, args: tuple, kwargs: dict) -> None:
    tracer.emit_same(tracer.node_of(args[0]), out)


_ENHANCERS = (ImageEnhance.Contrast, ImageEnhance.Brightness, ImageEnhance.Sharpness, ImageEnhance.Color)

PATCHES: tuple[Patch, ...] = (
    Patch(Image.Image, "rotate", _on_rotate),
    Patch(Image.Image, "transpose", _on_transpose),
    Patch(Image.Image, "crop", _on_crop),
    Patch(Image.Image, "resize", _on_resize),
    Patch(Image.Image, "reduce", _on_reduce),
    Patch(Image.Image, "thumbnail", _on_thumbnail, pre=lambda args, kwargs: args[0].size),
    Patch(Image.Image, "filter", _on_filter),
    Patch(Image.Image, "convert", _on_convert),
    Patch(Image.Image, "copy", _same_pixels),
    Patch(Image.Image, "point", lambda tracer, out, args, kwargs: tracer.photometric(args[0], out, "lut", "Image.point")),
    Patch(Image.Image, "paste", _in_place("Image.paste")),
    Patch(Image.Image, "putpixel", _in_place("Image.putpixel")),
    Patch(Image, "fromarray", lambda tracer, out, args, kwargs: tracer.emit_same(
        tracer.node_of(arg(args, kwargs, 0, "obj")), out)),
    Patch(ImageOps, "mirror", _orientation("flip_horizontal", "ImageOps.mirror")),
    Patch(ImageOps, "flip", _orientation("flip_vertical", "ImageOps.flip")),
    *(Patch(ImageOps, name, _imageops_photometric(name, op)) for name, op in _IMAGEOPS_PHOTOMETRIC.items()),
    Patch(ImageOps, "crop", _on_imageops_crop),
    Patch(ImageOps, "expand", _on_imageops_expand),
    Patch(ImageOps, "scale", _resized_output("ImageOps.scale")),
    # The enhancers' constructors convert the image internally: not an op of the code's.
    *(Patch(enhancer, "__init__", wrapper=lambda tracer, original: tracer.quiet(original)) for enhancer in _ENHANCERS),
    Patch(ImageEnhance._Enhance, "enhance", _on_enhance),
    *(Patch(ImageDraw.ImageDraw, method, lambda tracer, out, args, kwargs: tracer.emit_in_place(args[0]._image, "ImageDraw"))
      for method in _IMAGEDRAW_METHODS),
)
