"""The lineage recorder: traced image objects, their nodes, and the records of the ops between them.

``OpTracer.install`` wraps every entry point the adapters of :mod:`.registry` list. Children
inherit the patched modules through ``fork``, so no call pays for patching. A wrapper checks two
attributes and calls through when tracing is off or when it runs inside another traced call (PIL's
``rotate`` calls ``transpose``; only the outer call is recorded).

Every traced image object (PIL image or ndarray) is bound to a *node*: its map to the input image
(``to_input``, None once a free rotation or an untracked copy broke it) and its size. Each op makes
a new node and a record ``{"op", ...params, "src", "dst"}`` (node ids; the input is node 0); crops
carry ``box`` in the frame of the image they were applied to (as the library applied it), the box
the code passed (``frame_box``, same frame) and ``input_box`` in the input's frame; non-core ops
carry ``changed`` (sampled pixel comparison first, exact comparison only when the sample saw no
difference, so ``enhance(1.0)`` is recorded as unchanged).

numpy views need no per-call hook at all: a slice, ``np.rot90``, ``np.flip``, ``a.T``... of a
traced array is a view whose ``base`` is the traced array, so its geometry (crop box, turn, flip)
follows exactly from its data pointer and strides (``numpy_adapter.view_geometry``). Views are
resolved when they are consumed (``Image.fromarray``, a cv2 call, ``np.array``, or
``ops(result=...)``), and recorded in the canonical form of ``cv_ray.sandbox.ops``. Copies made
outside the wrappers (``a.copy()``, arithmetic) lose the lineage; the parent's
``recognize.reconcile`` finds such crops from pixels.

``errors`` counts traced calls whose bookkeeping failed on odd arguments (the call itself ran);
the child reports it to the parent with each result (``tracer_errors`` in the pool's stats).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageChops

from cv_ray.geometry import compose, identity, map_box
from cv_ray.sandbox.ops import MAX_HINT_OPS, canonical_ops, op_geometry
from cv_ray.sandbox.tracing import registry
from cv_ray.sandbox.tracing.numpy_adapter import view_geometry
from cv_ray.sandbox.tracing.registry import array_size
from cv_ray.types import Matrix3

#: Records kept per call; past this the tracer stops recording (a loop of thousands of crops).
MAX_RECORDS = 1000
#: Side of the nearest-neighbour sample grid used for the cheap "did this op change the image" test.
_SAMPLE_SIDE = 32
#: Modes ``ImageChops.difference`` compares directly.
_CHOPS_MODES = frozenset({"1", "L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})


class _Node:
    """One traced image state: its map to the input, its size, the record that made it."""

    __slots__ = ("id", "record", "size", "to_input")

    def __init__(self, node_id: int, to_input: Matrix3 | None, size: tuple[int, int], record: int | None):
        self.id = node_id
        self.to_input = to_input
        self.size = size
        self.record = record


class OpTracer:
    """Records the image ops a piece of code runs (see the package docstring for the protocol)."""

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
        """Patch every entry point the adapters list (idempotent; call once, before forking)."""
        if self._installed:
            return
        for patch in registry.patches():
            original = patch.owner.__dict__[patch.name] if isinstance(patch.owner, type) else getattr(patch.owner, patch.name)
            self._patched.append((patch.owner, patch.name, original))
            if patch.wrapper is not None:
                replacement = patch.wrapper(self, original)
            else:
                replacement = self._wrap(original, patch.handler, patch.pre)
            setattr(patch.owner, patch.name, replacement)
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

    @property
    def tracing(self) -> bool:
        """Whether a call made now is an outermost call of a traced run (adapters' own wrappers)."""
        return self._active and not self._depth

    def ops(self, result: Any = None) -> list[dict[str, Any]]:
        """The recorded ops as plain dicts (at most ``MAX_HINT_OPS``).

        With ``result`` (the object the code left in ``result``), only the records on its lineage
        from the input, in order; a result that is a view of a traced array is resolved first.
        Without it, or when the result's lineage is unknown, the last records of the call.
        """
        self._depth += 1
        try:
            node = self.node_of(result) if result is not None else None
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

    # -- the adapters' API ------------------------------------------------------------------------

    def node_of(self, obj: Any) -> _Node | None:
        """The node an image object is bound to (a view of a traced array is resolved first)."""
        entry = self._objects.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        if isinstance(obj, np.ndarray):
            return self._resolve_view(obj)
        return None

    def emit(self, src: _Node | None, op: dict[str, Any], out: Any = None,
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
        if op["op"] == "crop":
            op.setdefault("frame_box", list(op["box"]))
        if size is None:
            size = out.size if isinstance(out, Image.Image) else array_size(out) if isinstance(out, np.ndarray) else (0, 0)
        node = self._new_node(to_input, size, len(self._records))
        op["dst"] = node.id
        self._records.append(op)
        if out is not None:
            self._bind(out, node)
        return node

    def emit_chain(self, src: _Node | None, ops: list[dict[str, Any]], out: Any) -> None:
        """Record several ops produced by one call; only the last output is a real object."""
        node = src
        for i, op in enumerate(ops):
            node = self.emit(node, op, out if i == len(ops) - 1 else None)
            if node is None:
                return

    def emit_same(self, src: _Node | None, out: Any) -> None:
        """``out`` shows exactly the pixels of ``src`` (a copy, a dtype change): no op, same node."""
        if src is not None and out is not None:
            self._bind(out, src)

    def emit_in_place(self, obj: Any, via: str) -> None:
        """A drawing call changed ``obj`` in place: a new node (same geometry) takes its place."""
        src = self.node_of(obj)
        if src is not None and src.record is not None and src.record == len(self._records) - 1:
            last = self._records[-1]
            if last["op"] == "draw" and last.get("via") == via:
                last["count"] = last.get("count", 1) + 1
                return
        self.emit(src, {"op": "draw", "via": via, "changed": True}, obj)

    def photometric(self, src_obj: Any, out: Any, op: str, via: str, **params: Any) -> None:
        """A pixel-wise op (same geometry) from ``src_obj`` to ``out``, with whether it changed anything."""
        if out is None:
            return
        if isinstance(src_obj, Image.Image) and isinstance(out, Image.Image):
            changed = _pil_changed(src_obj, out)
        else:
            changed = _array_changed(src_obj, out)
        self.emit(self.node_of(src_obj), {"op": op, "via": via, **params, "changed": changed}, out)

    def quiet(self, fn: Callable) -> Callable:
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

    # -- nodes --------------------------------------------------------------------------------

    def _new_node(self, to_input: Matrix3 | None, size: tuple[int, int], record: int | None) -> _Node:
        node = _Node(len(self._nodes), to_input, (int(size[0]), int(size[1])), record)
        self._nodes.append(node)
        return node

    def _bind(self, obj: Any, node: _Node) -> None:
        try:
            self._objects[id(obj)] = (weakref.ref(obj), node)
        except TypeError:  # an object without weak references cannot be an image we trace
            pass

    def _resolve_view(self, array: np.ndarray) -> _Node | None:
        base = array.base
        if not isinstance(base, np.ndarray):
            return None
        entry = self._objects.get(id(base))
        if entry is None or entry[0]() is not base:
            return None
        geometry = view_geometry(array, base)
        if geometry is None:
            return None
        matrix, channels_changed = geometry
        node = entry[1]
        ops = canonical_ops(matrix, array.shape[1], array.shape[0], base.shape[1], base.shape[0]) or []
        for op in ops:
            op["via"] = "numpy.view"
            node = self.emit(node, op)
            if node is None:
                return None
        if channels_changed:
            node = self.emit(node, {"op": "color_convert", "via": "numpy.view", "changed": True})
            if node is None:
                return None
        self._bind(array, node)
        return node

    # -- the wrapper --------------------------------------------------------------------------

    def _wrap(self, fn: Callable, handler: Callable[..., None] | None,
              pre: Callable[..., Any] | None = None) -> Callable:
        """``fn`` with ``handler(tracer, out, args, kwargs[, before])`` run after it, outermost calls only."""
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
                        handler(tracer, out, args, kwargs, before)
                    else:
                        handler(tracer, out, args, kwargs)
                except Exception:  # noqa: BLE001 -- counted in `errors`, reported to the parent
                    tracer.errors += 1
                return out
            finally:
                tracer._depth -= 1

        return traced


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
