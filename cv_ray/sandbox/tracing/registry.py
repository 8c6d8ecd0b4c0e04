"""The registry of library adapters: which entry points the tracer wraps, library by library.

A :class:`Patch` names one entry point (``owner.name``) and how a call of it becomes records:

* ``handler(tracer, out, args, kwargs)`` runs after the original returned ``out`` (outermost
  traced calls only; see ``OpTracer`` for the nesting rule); with ``pre``, ``pre(args, kwargs)``
  runs before the call and its value is passed as a fifth argument (``thumbnail`` works in place);
* or ``wrapper(tracer, original)`` returns the replacement itself (patches that record nothing
  but change how tracing proceeds, e.g. suspending it inside a constructor).

Adding a library is one module with a ``PATCHES`` table, named in :data:`ADAPTERS`. The helpers at
the end are shared by the adapters.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Patch:
    owner: Any
    """The module or class holding the entry point."""
    name: str
    handler: Callable[..., None] | None = None
    pre: Callable[[tuple, dict], Any] | None = None
    wrapper: Callable[[Any, Callable], Callable] | None = None


#: The adapter modules (in this package), in the order their patches are applied.
ADAPTERS = ("pil_adapter", "numpy_adapter", "opencv_adapter")


def patches() -> Iterator[Patch]:
    """Every adapter's patches, in registry order (imported only here: adapters import their library)."""
    for name in ADAPTERS:
        yield from importlib.import_module(f"cv_ray.sandbox.tracing.{name}").PATCHES


# -- helpers shared by the adapters --------------------------------------------------------------


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def literal_box(box: Any) -> list[float | int]:
    """A box as the code passed it (ints stay ints), JSON-able."""
    return [int(v) if isinstance(v, int) else float(v) for v in box]


def array_size(array: Any) -> tuple[int, int]:
    """``(width, height)`` of an (H, W[, C]) array."""
    return int(array.shape[1]), int(array.shape[0])


def resize_ops(src_size: tuple[int, int], out_size: tuple[int, int], box: Any, via: str) -> list[dict]:
    """A resize from a source region: ``[crop(box)]`` when the region is not everything, then resize.

    With a region the resize op carries the region's exact size as its own ``box`` (in the crop's
    frame): a fractional region is resampled as it is, while the crop's image is whole pixels.
    """
    ops: list[dict[str, Any]] = []
    if box is not None and [float(v) for v in box] != [0.0, 0.0, float(src_size[0]), float(src_size[1])]:
        literal, box = literal_box(box), [float(v) for v in box]
        ops.append({"op": "crop", "box": box, "frame_box": literal, "via": via})
        region = (box[2] - box[0], box[3] - box[1])
        resize = {"op": "resize", "size": list(out_size), "box": [0.0, 0.0, *region], "via": via}
    else:
        region = src_size
        resize = {"op": "resize", "size": list(out_size), "via": via}
    resize["changed"] = tuple(float(v) for v in out_size) != tuple(float(v) for v in region)
    return [*ops, resize]
