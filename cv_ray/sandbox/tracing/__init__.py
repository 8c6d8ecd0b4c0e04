"""Op tracing in the sandbox child: what model-written image code actually did, from execution.

Usage (the zygote / child of the isolation layer)::

    tracer = OpTracer()
    tracer.install()            # once, in the zygote, after importing PIL/numpy/cv2 and before forking
    ...                         # in the forked child:
    tracer.begin(image)         # the very object placed in the namespace as `image` / `img`
    exec(code, namespace)
    hints = tracer.ops(result=namespace["result"])   # list[dict], JSON-serializable
    tracer.end()                # optional: stop recording (a trajectory child between cells)

Two parts:

* :mod:`.recorder` -- ``OpTracer``, the lineage recorder: every traced image object (PIL image or
  ndarray) is bound to a *node* (its map to the input image and its size); each op makes a new
  node and a record ``{"op", ...params, "src", "dst"}``. It knows no library.
* the library adapters, one small table-driven module per library (:mod:`.pil_adapter`,
  :mod:`.numpy_adapter`, :mod:`.opencv_adapter`), listed in :mod:`.registry`. Each is a table of
  ``Patch(owner, name, handler)``: which entry point to wrap and how to turn one call of it into
  records through the recorder's small API (``node_of``, ``emit``, ``emit_chain``, ``emit_same``,
  ``emit_in_place``, ``photometric``).

These records are hints for the parent, never trusted: the model's code runs in this process and
can reach and forge them. The parent sanitizes and verifies them against the pixels
(:mod:`cv_ray.sandbox.recognize`).
"""

from __future__ import annotations

from cv_ray.sandbox.tracing.recorder import MAX_RECORDS, OpTracer

__all__ = ["MAX_RECORDS", "OpTracer"]
