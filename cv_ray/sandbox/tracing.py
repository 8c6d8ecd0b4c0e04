"""Op tracing in the sandbox child: what model-written image code actually did, from execution.

Usage (the zygote / child of the isolation layer)::

    tracer = OpTracer()
    tracer.install()            # once, in the zygote, after importing PIL/numpy/cv2 and before forking
    ...                         # in the forked child:
    tracer.begin(image)         # the very object placed in the namespace as `image` / `img`
    exec(code, namespace)
    hints = tracer.ops(result=namespace["result"])   # list[dict], JSON-serializable
    tracer.end()                # optional: stop recording (a trajectory child between cells)

``uninstall()`` restores the original entry points (tests, or a process that goes on to run
trusted code); ``errors`` counts traced calls whose bookkeeping failed on odd arguments.

``install`` replaces the image entry points of PIL (``Image.Image`` methods, ``Image.fromarray``,
``ImageOps``, ``ImageEnhance``, ``ImageDraw``), numpy (``array``/``asarray`` and the flips/turns,
so that arrays made from a traced image are known) and cv2 with thin wrappers. Children inherit the
patched modules through ``fork``, so no call pays for patching. A wrapper checks two attributes and
calls through when tracing is off or when it runs inside another traced call (PIL's ``rotate``
calls ``transpose``; only the outer call is recorded).

Every traced image object (PIL image or ndarray) is bound to a *node*: its map to the input image
(``to_input``, None once a free rotation or an untracked copy broke it) and its size. Each op makes
a new node and a record ``{"op", ...params, "src", "dst"}`` (node ids; the input is node 0); crops
carry ``box`` in the frame of the image they were applied to and ``input_box`` in the input's
frame; non-core ops carry ``changed`` (sampled pixel comparison first, exact comparison only when
the sample saw no difference, so ``enhance(1.0)`` is recorded as unchanged).

numpy views need no per-call hook at all: a slice, ``np.rot90``, ``np.flip``, ``a.T``... of a
traced array is a view whose ``base`` is the traced array, so its geometry (crop box, turn, flip)
follows exactly from its data pointer and strides. Views are resolved when they are consumed
(``Image.fromarray``, a cv2 call, ``np.array``, or ``ops(result=...)``), and recorded in the
canonical form of ``cv_ray.sandbox.ops``. Copies made outside the wrappers (``a.copy()``,
arithmetic) lose the lineage; the parent's ``recognize.reconcile`` finds such crops from pixels.

These records are hints for the parent, never trusted: the model's code runs in this process and
can reach and forge them. The parent sanitizes and verifies them against the pixels.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageOps

from cv_ray.geometry import compose, identity, map_box
from cv_ray.sandbox.ops import CORE_OPS, DIHEDRAL_SEQUENCES, MAX_HINT_OPS, canonical_ops, op_geometry
from cv_ray.types import Matrix3

#: Records kept per call; past this the tracer stops recording (a loop of thousands of crops).
MAX_RECORDS = 1000
#: Side of the nearest-neighbour sample grid used for the cheap "did this op change the image" test.
_SAMPLE_SIDE = 32

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
#: Photometric cv2 functions (output keeps the input's geometry) -> op name.
_CV2_PHOTOMETRIC: dict[str, str] = {
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
_CV2_DRAWING = ("rectangle", "circle", "line", "arrowedLine", "putText", "ellipse", "polylines",
                "fillPoly", "fillConvexPoly", "drawContours", "drawMarker")
_IMAGEDRAW_METHODS = ("arc", "bitmap", "chord", "circle", "ellipse", "line", "multiline_text", "pieslice",
                      "point", "polygon", "rectangle", "regular_polygon", "rounded_rectangle", "text")
_GRAY_MODES = frozenset({"L", "LA", "I", "I;16", "F"})
#: Modes ``ImageChops.difference`` compares directly.
_CHOPS_MODES = frozenset({"1", "L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
_CV2_ROTATE_OPS = {int(cv2.ROTATE_90_COUNTERCLOCKWISE): "rotate_90", int(cv2.ROTATE_180): "rotate_180",
                   int(cv2.ROTATE_90_CLOCKWISE): "rotate_270"}
_CV2_TO_GRAY = frozenset(getattr(cv2, n) for n in dir(cv2) if n.startswith("COLOR_") and n.endswith("2GRAY"))


class _Node:
    """One traced image state: its map to the input, its size, the record that made it."""

    __slots__ = ("id", "record", "size", "to_input")

    def __init__(self, node_id: int, to_input: Matrix3 | None, size: tuple[int, int], record: int | None):
        self.id = node_id
        self.to_input = to_input
        self.size = size
        self.record = record


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _array_size(array: np.ndarray) -> tuple[int, int]:
    return int(array.shape[1]), int(array.shape[0])


class OpTracer:
    """Records the image ops a piece of code runs (see the module docstring for the protocol)."""

    def __init__(self) -> None:
        self._installed = False
        self._active = False
        self._depth = 0
        self.errors = 0
        """Traced calls whose bookkeeping failed on model-supplied arguments (the call itself ran)."""
        self._records: list[dict[str, Any]] = []
        self._nodes: list[_Node] = []
        self._objects: dict[int, tuple[weakref.ref, _Node]] = {}
        self._patched: list[tuple[Any, str, Any]] = []

    # -- protocol ----------------------------------------------------------------------------

    def install(self) -> None:
        """Patch the PIL / numpy / cv2 entry points (idempotent; call once, before forking)."""
        if self._installed:
            return
        self._install_pil()
        self._install_numpy()
        self._install_cv2()
        self._installed = True

    def uninstall(self) -> None:
        """Put the original entry points back (for processes that go on to run trusted code)."""
        self._active = False
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()
        self._installed = False

    def begin(self, input_image: Image.Image) -> None:
        """Start a call: forget earlier state and make ``input_image`` node 0."""
        self._records, self._nodes, self._objects = [], [], {}
        self.errors = 0
        self._bind(input_image, self._new_node(identity(), input_image.size, None))
        self._active = True

    def end(self) -> None:
        """Stop recording (the wrappers call straight through until the next ``begin``)."""
        self._active = False

    def ops(self, result: Any = None) -> list[dict[str, Any]]:
        """The recorded ops as plain dicts (at most ``MAX_HINT_OPS``).

        With ``result`` (the object the code left in ``result``), only the records on its lineage
        from the input, in order; a result that is a view of a traced array is resolved first.
        Without it, or when the result's lineage is unknown, the last records of the call.
        """
        self._depth += 1
        try:
            node = self._node_of(result) if result is not None else None
        finally:
            self._depth -= 1
        records = self._records
        if node is not None:
            chain: list[dict[str, Any]] = []
            while node.record is not None:
                record = records[node.record]
                chain.append(record)
                src = record.get("src")
                if src is None:
                    break
                node = self._nodes[src]
            records = chain[::-1]
        return [dict(record) for record in records[-MAX_HINT_OPS:]]

    # -- nodes and records --------------------------------------------------------------------

    def _new_node(self, to_input: Matrix3 | None, size: tuple[int, int], record: int | None) -> _Node:
        node = _Node(len(self._nodes), to_input, (int(size[0]), int(size[1])), record)
        self._nodes.append(node)
        return node

    def _bind(self, obj: Any, node: _Node) -> None:
        try:
            self._objects[id(obj)] = (weakref.ref(obj), node)
        except TypeError:  # an object without weak references cannot be an image we trace
            pass

    def _node_of(self, obj: Any) -> _Node | None:
        entry = self._objects.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        if isinstance(obj, np.ndarray):
            return self._resolve_view(obj)
        return None

    def _emit(self, src: _Node | None, op: dict[str, Any], out: Any = None,
              out_size: tuple[int, int] | None = None) -> _Node | None:
        """Record one op applied to ``src``; bind its output object (if any) to the new node."""
        if len(self._records) >= MAX_RECORDS:
            return None
        to_input, size = None, out_size
        if src is not None:
            op["src"] = src.id
            geometry = op_geometry(op, *src.size)
            if geometry is not None:
                size = geometry[1]
                if src.to_input is not None:
                    to_input = compose(src.to_input, geometry[0])
            if op["op"] == "crop" and src.to_input is not None:
                op["input_box"] = map_box(src.to_input, op["box"])
        if size is None:
            size = out.size if isinstance(out, Image.Image) else _array_size(out) if isinstance(out, np.ndarray) else (0, 0)
        node = self._new_node(to_input, size, len(self._records))
        op["dst"] = node.id
        self._records.append(op)
        if out is not None:
            self._bind(out, node)
        return node

    def _emit_chain(self, src: _Node | None, ops: list[dict[str, Any]], out: Any) -> None:
        """Record several ops produced by one call; only the last output is a real object."""
        node = src
        for i, op in enumerate(ops):
            node = self._emit(node, op, out if i == len(ops) - 1 else None)
            if node is None:
                return

    def _emit_same(self, src: _Node | None, out: Any) -> None:
        """``out`` shows exactly the pixels of ``src`` (a copy, a dtype change): no op, same node."""
        if src is not None and out is not None:
            self._bind(out, src)

    def _emit_in_place(self, obj: Any, via: str) -> None:
        """A drawing call changed ``obj`` in place: a new node (same geometry) takes its place."""
        src = self._node_of(obj)
        if src is not None and src.record is not None and src.record == len(self._records) - 1:
            last = self._records[-1]
            if last["op"] == "draw" and last.get("via") == via:
                last["count"] = last.get("count", 1) + 1
                return
        self._emit(src, {"op": "draw", "via": via, "changed": True}, obj)

    # -- numpy views -------------------------------------------------------------------------

    def _resolve_view(self, array: np.ndarray) -> _Node | None:
        base = array.base
        if not isinstance(base, np.ndarray):
            return None
        entry = self._objects.get(id(base))
        if entry is None or entry[0]() is not base:
            return None
        geometry = _view_geometry(array, base)
        if geometry is None:
            return None
        matrix, channels_changed = geometry
        node = entry[1]
        ops = canonical_ops(matrix, array.shape[1], array.shape[0], base.shape[1], base.shape[0]) or []
        for op in ops:
            op["via"] = "numpy.view"
            node = self._emit(node, op)
            if node is None:
                return None
        if channels_changed:
            node = self._emit(node, {"op": "color_convert", "via": "numpy.view", "changed": True})
            if node is None:
                return None
        self._bind(array, node)
        return node

    # -- changed tests -------------------------------------------------------------------------

    @staticmethod
    def _pil_changed(before: Image.Image, after: Image.Image) -> bool:
        if before.size != after.size:
            return True
        side = (min(_SAMPLE_SIDE, before.width), min(_SAMPLE_SIDE, before.height))
        a = before.resize(side, Image.Resampling.NEAREST)
        b = after.resize(side, Image.Resampling.NEAREST)
        if a.mode != b.mode:
            a, b = a.convert("RGBA"), b.convert("RGBA")
        if a.tobytes() != b.tobytes():
            return True
        if before.mode != after.mode:
            before, after = before.convert("RGBA"), after.convert("RGBA")
        if before.mode in _CHOPS_MODES:  # C-speed difference; alpha_only=False: all bands count
            return ImageChops.difference(before, after).getbbox(alpha_only=False) is not None
        return before.tobytes() != after.tobytes()

    @staticmethod
    def _array_changed(before: Any, after: Any) -> bool:
        if not isinstance(before, np.ndarray) or not isinstance(after, np.ndarray):
            return True
        if before.shape[:2] != after.shape[:2]:
            return True
        step_y = max(1, before.shape[0] // _SAMPLE_SIDE)
        step_x = max(1, before.shape[1] // _SAMPLE_SIDE)
        if before.shape != after.shape:
            # A gray output of a colour input is unchanged only when the input was gray already.
            if after.ndim != 2 or before.ndim != 3:
                return True
            for sample in (before[::step_y, ::step_x], before):  # the sample usually settles it
                if not all(np.array_equal(sample[..., 0], sample[..., c]) for c in range(1, sample.shape[2])):
                    return True
            before = before[..., 0]
        if not np.array_equal(before[::step_y, ::step_x], after[::step_y, ::step_x]):
            return True
        return not np.array_equal(before, after)

    # -- the wrapper --------------------------------------------------------------------------

    def _wrap(self, fn: Callable, handler: Callable[..., None], pre: Callable[..., Any] | None = None) -> Callable:
        """``fn`` with ``handler(out, args, kwargs[, before])`` run after it, outermost calls only."""
        tracer = self

        @functools.wraps(fn)
        def traced(*args: Any, **kwargs: Any) -> Any:
            if tracer._depth or not tracer._active:
                return fn(*args, **kwargs)
            tracer._depth += 1
            try:
                before = pre(args, kwargs) if pre is not None else None
                out = fn(*args, **kwargs)
                # Trust boundary: the arguments are the model's; bookkeeping must never change what
                # its code does, so a failure here is counted and the op goes unrecorded.
                try:
                    if pre is not None:
                        handler(out, args, kwargs, before)
                    else:
                        handler(out, args, kwargs)
                except Exception:  # noqa: BLE001 -- counted in `errors`, see above
                    tracer.errors += 1
                return out
            finally:
                tracer._depth -= 1

        return traced

    def _quiet(self, fn: Callable) -> Callable:
        """``fn`` with tracing suspended inside (e.g. ImageEnhance constructors call ``convert``)."""
        tracer = self

        @functools.wraps(fn)
        def quiet(*args: Any, **kwargs: Any) -> Any:
            tracer._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                tracer._depth -= 1

        return quiet

    def _patch(self, owner: Any, name: str, handler: Callable[..., None] | None = None,
               pre: Callable[..., Any] | None = None, replacement: Callable | None = None) -> None:
        """Replace ``owner.name`` with its traced wrapper (or ``replacement``), remembering the original."""
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        self._patched.append((owner, name, original))
        setattr(owner, name, replacement if replacement is not None else self._wrap(original, handler, pre))

    # -- PIL -------------------------------------------------------------------------------

    def _install_pil(self) -> None:
        patch, cls = self._patch, Image.Image
        patch(cls, "rotate", self._on_rotate)
        patch(cls, "transpose", self._on_transpose)
        patch(cls, "crop", self._on_crop)
        patch(cls, "resize", self._on_resize)
        patch(cls, "reduce", self._on_reduce)
        patch(cls, "thumbnail", self._on_thumbnail, pre=lambda args, kwargs: args[0].size)
        patch(cls, "filter", self._on_filter)
        patch(cls, "convert", self._on_convert)
        patch(cls, "copy", lambda out, args, kwargs: self._emit_same(self._node_of(args[0]), out))
        patch(cls, "point", lambda out, args, kwargs: self._photometric(args[0], out, "lut", "Image.point"))
        patch(cls, "paste", lambda out, args, kwargs: self._emit_in_place(args[0], "Image.paste"))
        patch(cls, "putpixel", lambda out, args, kwargs: self._emit_in_place(args[0], "Image.putpixel"))
        patch(Image, "fromarray", lambda out, args, kwargs: self._emit_same(
            self._node_of(_arg(args, kwargs, 0, "obj")), out))

        patch(ImageOps, "mirror", self._orientation_handler("flip_horizontal", "ImageOps.mirror"))
        patch(ImageOps, "flip", self._orientation_handler("flip_vertical", "ImageOps.flip"))
        for name, op in _IMAGEOPS_PHOTOMETRIC.items():
            patch(ImageOps, name, self._imageops_handler(name, op))
        patch(ImageOps, "crop", self._on_imageops_crop)
        patch(ImageOps, "expand", self._on_imageops_expand)
        patch(ImageOps, "scale", self._on_resized_output("ImageOps.scale"))

        for enhancer in (ImageEnhance.Contrast, ImageEnhance.Brightness, ImageEnhance.Sharpness, ImageEnhance.Color):
            patch(enhancer, "__init__", replacement=self._quiet(enhancer.__init__))
        patch(ImageEnhance._Enhance, "enhance", self._on_enhance)
        for method in _IMAGEDRAW_METHODS:
            patch(ImageDraw.ImageDraw, method, lambda out, args, kwargs: self._emit_in_place(args[0]._image, "ImageDraw"))

    def _photometric(self, src_obj: Any, out: Any, op: str, via: str, **params: Any) -> None:
        if out is None:
            return
        if isinstance(src_obj, Image.Image) and isinstance(out, Image.Image):
            changed = self._pil_changed(src_obj, out)
        else:
            changed = self._array_changed(src_obj, out)
        self._emit(self._node_of(src_obj), {"op": op, "via": via, **params, "changed": changed}, out)

    def _orientation_handler(self, name: str, via: str) -> Callable[..., None]:
        def handler(out: Any, args: tuple, kwargs: dict) -> None:
            self._emit(self._node_of(args[0]), {"op": name, "via": via}, out)

        return handler

    def _imageops_handler(self, name: str, op: str) -> Callable[..., None]:
        def handler(out: Image.Image, args: tuple, kwargs: dict) -> None:
            params: dict[str, Any] = {}
            if name == "posterize":
                params["bits"] = int(_arg(args, kwargs, 1, "bits"))
            elif name == "solarize":
                params["threshold"] = float(_arg(args, kwargs, 1, "threshold", 128))
            self._photometric(args[0], out, op, f"ImageOps.{name}", **params)

        return handler

    def _on_rotate(self, out: Image.Image, args: tuple, kwargs: dict) -> None:
        src = args[0]
        angle = float(_arg(args, kwargs, 1, "angle")) % 360.0
        expand = bool(_arg(args, kwargs, 3, "expand", False))
        moved = _arg(args, kwargs, 4, "center") or _arg(args, kwargs, 5, "translate")
        if angle == 0 and not moved:
            self._emit_same(self._node_of(src), out)
            return
        name = {90.0: "rotate_90", 180.0: "rotate_180", 270.0: "rotate_270"}.get(angle)
        if name is None or moved:
            name = "rotate_arbitrary"
        op = {"op": name, "angle": angle, "expand": expand, "via": "Image.rotate"}
        if name == "rotate_arbitrary":
            op["changed"] = True
        self._emit(self._node_of(src), op, out, out.size)

    def _on_transpose(self, out: Image.Image, args: tuple, kwargs: dict) -> None:
        names = _TRANSPOSE_OPS[int(_arg(args, kwargs, 1, "method"))]
        self._emit_chain(self._node_of(args[0]), [{"op": n, "via": "Image.transpose"} for n in names], out)

    def _on_crop(self, out: Image.Image, args: tuple, kwargs: dict) -> None:
        box = _arg(args, kwargs, 1, "box")
        box = [0, 0, *args[0].size] if box is None else [round(float(v)) for v in box]
        self._emit(self._node_of(args[0]), {"op": "crop", "box": box, "via": "Image.crop"}, out)

    def _resize_ops(self, src_size: tuple[int, int], out_size: tuple[int, int], box: Any, via: str) -> list[dict]:
        """A resize from a source region: ``[crop(box)]`` when the region is not everything, then resize."""
        ops: list[dict[str, Any]] = []
        if box is not None and [float(v) for v in box] != [0.0, 0.0, float(src_size[0]), float(src_size[1])]:
            box = [float(v) for v in box]
            ops.append({"op": "crop", "box": box, "via": via})
            region = (round(box[2] - box[0]), round(box[3] - box[1]))
        else:
            region = src_size
        ops.append({"op": "resize", "size": list(out_size), "via": via, "changed": tuple(out_size) != tuple(region)})
        return ops

    def _on_resize(self, out: Image.Image, args: tuple, kwargs: dict) -> None:
        src = args[0]
        ops = self._resize_ops(src.size, out.size, _arg(args, kwargs, 3, "box"), "Image.resize")
        self._emit_chain(self._node_of(src), ops, out)

    def _on_reduce(self, out: Image.Image, args: tuple, kwargs: dict) -> None:
        src = args[0]
        ops = self._resize_ops(src.size, out.size, _arg(args, kwargs, 2, "box"), "Image.reduce")
        self._emit_chain(self._node_of(src), ops, out)

    def _on_resized_output(self, via: str) -> Callable[..., None]:
        def handler(out: Image.Image, args: tuple, kwargs: dict) -> None:
            self._emit_chain(self._node_of(args[0]), self._resize_ops(args[0].size, out.size, None, via), out)

        return handler

    def _on_thumbnail(self, out: None, args: tuple, kwargs: dict, size_before: tuple[int, int]) -> None:
        image = args[0]
        if image.size != size_before:
            self._emit(self._node_of(image), {"op": "resize", "size": list(image.size), "via": "Image.thumbnail",
                                              "changed": True}, image)

    def _on_filter(self, out: Image.Image, args: tuple, kwargs: dict) -> None:
        flt = _arg(args, kwargs, 1, "filter")
        name = flt.__name__ if isinstance(flt, type) else type(flt).__name__
        params: dict[str, Any] = {"via": f"ImageFilter.{name}"}
        radius = getattr(flt, "radius", None)
        if isinstance(radius, (int, float)):
            params["radius"] = float(radius)
        self._photometric(args[0], out, _FILTER_OPS.get(name, "convolve"), params.pop("via"), **params)

    def _on_convert(self, out: Image.Image, args: tuple, kwargs: dict) -> None:
        src = args[0]
        mode = out.mode
        if mode == src.mode:
            self._emit_same(self._node_of(src), out)
            return
        if mode in _GRAY_MODES and src.mode not in _GRAY_MODES:
            op = "grayscale"
        elif mode == "1":
            op = "threshold"
        else:
            op = "color_convert"
        self._photometric(src, out, op, "Image.convert")

    def _on_imageops_crop(self, out: Image.Image, args: tuple, kwargs: dict) -> None:
        src = args[0]
        border = int(_arg(args, kwargs, 1, "border", 0))
        if border == 0:
            self._emit_same(self._node_of(src), out)
            return
        box = [border, border, src.width - border, src.height - border]
        self._emit(self._node_of(src), {"op": "crop", "box": box, "via": "ImageOps.crop"}, out)

    def _on_imageops_expand(self, out: Image.Image, args: tuple, kwargs: dict) -> None:
        src = args[0]
        border = _arg(args, kwargs, 1, "border", 0)
        # `border` is one width, (left, top) or (left, top, right, bottom); the output's box in the
        # source frame starts at minus the left/top widths.
        left, top = (int(border[0]), int(border[1])) if isinstance(border, (tuple, list)) else (int(border),) * 2
        box = [-left, -top, out.width - left, out.height - top]
        self._emit(self._node_of(src), {"op": "pad", "box": box, "via": "ImageOps.expand", "changed": True}, out)

    def _on_enhance(self, out: Image.Image, args: tuple, kwargs: dict) -> None:
        enhancer = args[0]
        factor = float(_arg(args, kwargs, 1, "factor"))
        stem = _ENHANCE_OPS.get(type(enhancer).__name__)
        if stem is None:
            return
        op = f"{stem}_up" if factor >= 1.0 else f"{stem}_down"
        self._photometric(enhancer.image, out, op, f"ImageEnhance.{type(enhancer).__name__}", factor=factor)

    # -- numpy --------------------------------------------------------------------------------

    def _install_numpy(self) -> None:
        for name in ("array", "asarray", "asanyarray", "ascontiguousarray", "copy"):
            self._patch(np, name, self._on_np_array)
        for name in ("rot90", "flip", "fliplr", "flipud", "transpose", "swapaxes"):
            self._patch(np, name, replacement=self._image_first(getattr(np, name)))

    def _on_np_array(self, out: Any, args: tuple, kwargs: dict) -> None:
        src = _arg(args, kwargs, 0, "a", kwargs.get("object"))
        if isinstance(out, np.ndarray) and out.ndim in (2, 3):
            self._emit_same(self._node_of(src), out)

    def _image_first(self, fn: Callable) -> Callable:
        """numpy's turns and flips of a PIL image go through the traced ``np.asarray``.

        The result is a view of that array, resolved when it is consumed; no record here.
        """
        tracer = self

        @functools.wraps(fn)
        def image_first(m: Any, *args: Any, **kwargs: Any) -> Any:
            if tracer._active and not tracer._depth and isinstance(m, Image.Image):
                m = np.asarray(m)
            return fn(m, *args, **kwargs)

        return image_first

    # -- cv2 ---------------------------------------------------------------------------------

    def _install_cv2(self) -> None:
        patch = self._patch
        patch(cv2, "rotate", self._on_cv2_rotate)
        patch(cv2, "flip", self._on_cv2_flip)
        patch(cv2, "transpose", lambda out, args, kwargs: self._emit_chain(
            self._node_of(args[0]), [{"op": n, "via": "cv2.transpose"} for n in DIHEDRAL_SEQUENCES[6]], out))
        patch(cv2, "resize", self._cv2_resized("cv2.resize"))
        patch(cv2, "pyrDown", self._cv2_resized("cv2.pyrDown"))
        patch(cv2, "pyrUp", self._cv2_resized("cv2.pyrUp"))
        patch(cv2, "warpAffine", self._on_cv2_warp_affine)
        patch(cv2, "warpPerspective", lambda out, args, kwargs: self._emit(
            self._node_of(args[0]), {"op": "perspective", "via": "cv2.warpPerspective", "changed": True}, out))
        patch(cv2, "copyMakeBorder", self._on_cv2_border)
        patch(cv2, "cvtColor", self._on_cv2_cvt_color)
        patch(cv2, "convertScaleAbs", self._on_cv2_scale_abs)
        for name, op in _CV2_PHOTOMETRIC.items():
            if hasattr(cv2, name):
                patch(cv2, name, self._cv2_photometric(name, op))
        for name in _CV2_DRAWING:
            if hasattr(cv2, name):
                patch(cv2, name, lambda out, args, kwargs, _n=name:
                      self._emit_in_place(_arg(args, kwargs, 0, "img"), f"cv2.{_n}"))

    def _cv2_photometric(self, name: str, op: str) -> Callable[..., None]:
        def handler(out: Any, args: tuple, kwargs: dict) -> None:
            image = out[1] if isinstance(out, tuple) else out  # threshold returns (retval, dst)
            src = _arg(args, kwargs, 0, "src")
            if isinstance(image, np.ndarray) and isinstance(src, np.ndarray) and image.shape[:2] == src.shape[:2]:
                params: dict[str, Any] = {}
                if name == "threshold":
                    params["threshold"] = float(_arg(args, kwargs, 1, "thresh"))
                self._photometric(src, image, op, f"cv2.{name}", **params)

        return handler

    def _on_cv2_rotate(self, out: np.ndarray, args: tuple, kwargs: dict) -> None:
        name = _CV2_ROTATE_OPS[int(_arg(args, kwargs, 1, "rotateCode"))]
        self._emit(self._node_of(args[0]), {"op": name, "via": "cv2.rotate"}, out)

    def _on_cv2_flip(self, out: np.ndarray, args: tuple, kwargs: dict) -> None:
        code = int(_arg(args, kwargs, 1, "flipCode"))
        name = "flip_vertical" if code == 0 else "flip_horizontal" if code > 0 else "rotate_180"
        self._emit(self._node_of(args[0]), {"op": name, "via": "cv2.flip"}, out)

    def _cv2_resized(self, via: str) -> Callable[..., None]:
        def handler(out: np.ndarray, args: tuple, kwargs: dict) -> None:
            src = _arg(args, kwargs, 0, "src")
            ops = self._resize_ops(_array_size(src), _array_size(out), None, via)
            self._emit_chain(self._node_of(src), ops, out)

        return handler

    def _on_cv2_warp_affine(self, out: np.ndarray, args: tuple, kwargs: dict) -> None:
        src = _arg(args, kwargs, 0, "src")
        forward = np.vstack([np.asarray(_arg(args, kwargs, 1, "M"), dtype=np.float64).reshape(2, 3), [0, 0, 1]])
        flags = int(_arg(args, kwargs, 4, "flags", cv2.INTER_LINEAR))
        # cv2 maps dst -> src through the inverse unless WARP_INVERSE_MAP; its pixel centres are
        # integers, ours are at +0.5, hence the half-pixel shifts around the map.
        back = forward if flags & cv2.WARP_INVERSE_MAP else np.linalg.inv(forward)
        shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
        matrix = (shift @ back @ np.linalg.inv(shift)).tolist()
        out_w, out_h = _array_size(out)
        ops = canonical_ops(matrix, out_w, out_h, *_array_size(src), tol=1e-4)
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
        self._emit_chain(self._node_of(src), ops, out)

    def _on_cv2_border(self, out: np.ndarray, args: tuple, kwargs: dict) -> None:
        src = _arg(args, kwargs, 0, "src")
        top = int(_arg(args, kwargs, 1, "top"))
        left = int(_arg(args, kwargs, 3, "left"))
        out_w, out_h = _array_size(out)
        box = [-left, -top, out_w - left, out_h - top]
        self._emit(self._node_of(src), {"op": "pad", "box": box, "via": "cv2.copyMakeBorder",
                                        "changed": out.shape[:2] != src.shape[:2]}, out)

    def _on_cv2_cvt_color(self, out: np.ndarray, args: tuple, kwargs: dict) -> None:
        src = _arg(args, kwargs, 0, "src")
        code = int(_arg(args, kwargs, 1, "code"))
        self._photometric(src, out, "grayscale" if code in _CV2_TO_GRAY else "color_convert", "cv2.cvtColor")

    def _on_cv2_scale_abs(self, out: np.ndarray, args: tuple, kwargs: dict) -> None:
        alpha = float(_arg(args, kwargs, 2, "alpha", 1.0))
        beta = float(_arg(args, kwargs, 3, "beta", 0.0))
        if alpha != 1.0:
            op, factor = ("contrast_up" if alpha > 1.0 else "contrast_down"), alpha
        else:
            op, factor = ("brightness_up" if beta >= 0 else "brightness_down"), beta
        self._photometric(_arg(args, kwargs, 0, "src"), out, op, "cv2.convertScaleAbs", factor=factor)


def _view_geometry(view: np.ndarray, base: np.ndarray) -> tuple[Matrix3, bool] | None:
    """The out->in matrix of ``view`` (a numpy view of ``base``), and whether it reorders channels.

    ``base`` must be C-contiguous (H, W[, C]). Each of the view's first two axes must step by
    exactly one row or one column of the base (either sign): crops, flips, turns and transposes.
    Derivation: view element (i, j) sits at byte ``off + i*s0 + j*s1`` of the base, i.e. at base
    row ``r0 + i*dr0 + j*dr1`` and column ``c0 + i*dc0 + j*dc1``. In continuous coordinates the
    view pixel centre (j+.5, i+.5) maps to the base centre, which gives the matrix below.
    """
    if base.ndim not in (2, 3) or view.ndim not in (2, 3) or view.dtype != base.dtype or not base.flags.c_contiguous:
        return None
    row_stride, col_stride = base.strides[0], base.strides[1]
    if row_stride == col_stride:
        return None
    offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    if not 0 <= offset < base.nbytes:
        return None
    r0, rest = divmod(offset, row_stride)
    c0, rest = divmod(rest, col_stride)
    ch0 = rest // base.itemsize
    steps = []
    for axis in (0, 1):
        stride = view.strides[axis]
        step = {row_stride: (1, 0), -row_stride: (-1, 0), col_stride: (0, 1), -col_stride: (0, -1)}.get(stride)
        if step is None:
            return None
        steps.append(step)
    (dr0, dc0), (dr1, dc1) = steps
    if (dr0 == 0) == (dr1 == 0):
        return None
    channels = base.shape[2] if base.ndim == 3 else 1
    if view.ndim == 3:
        if base.ndim != 3:
            return None
        same = view.shape[2] == channels and view.strides[2] == base.itemsize and ch0 == 0
        channels_changed = not same
    else:
        channels_changed = base.ndim == 3
    matrix = [[float(dc1), float(dc0), c0 + 0.5 - (dc1 + dc0) * 0.5],
              [float(dr1), float(dr0), r0 + 0.5 - (dr1 + dr0) * 0.5],
              [0.0, 0.0, 1.0]]
    return matrix, channels_changed
