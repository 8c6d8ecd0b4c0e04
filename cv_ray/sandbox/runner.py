"""Running one piece of model-written code in a (hardened) sandbox child, and describing the outcome.

This module runs *inside* the child, next to untrusted code, after the kernel layers are in
place: nothing here is a security boundary. Its job is the model's experience: the names the code
sees, the imports it may make, the captured ``print`` output, the result image, and an error text
that names the line of the model's own code and never a host path.

``CodeRunner.run`` returns ``(meta, image)`` where ``meta`` is the JSON-able dict the child sends
to the parent (``ok``, ``error``, ``error_class``, ``stdout``, ``traced``, ``tracer_errors``).
"""

from __future__ import annotations

import builtins
import errno
import io
import math
import os
import re
import sys
import traceback
from typing import Any

import cv2
import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from cv_ray.sandbox import messages
from cv_ray.sandbox.protocol import wire_image

CODE_FILENAME = "<code>"

#: Top-level modules the code may import; their already-loaded submodules come along.
IMPORTABLE_ROOTS = ("PIL", "numpy", "cv2", "math")
#: PIL submodules loaded in the zygote so that ``from PIL import X`` works without file access.
PRELOADED_PIL_MODULES = ("Image", "ImageChops", "ImageColor", "ImageDraw", "ImageEnhance", "ImageFilter",
                         "ImageFont", "ImageMath", "ImageOps", "ImageStat", "ImageTransform", "ImageSequence")
#: numpy submodules numpy would otherwise import lazily (from files) on first attribute access.
PRELOADED_NUMPY_MODULES = ("random", "linalg", "fft")

_MAX_ERROR_CHARS = 1500
_PERMISSION_ERRNOS = frozenset({errno.EPERM, errno.EACCES, errno.ENOSYS})
_CV2_MEMORY = re.compile(r"insufficient memory|failed to allocate|out of memory", re.IGNORECASE)


class CappedText(io.TextIOBase):
    """A write-only text stream that keeps the first ``limit`` characters and counts the rest."""

    def __init__(self, limit: int):
        self._limit = limit
        self._parts: list[str] = []
        self._kept = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        text = str(text)
        room = self._limit - self._kept
        if room > 0:
            self._parts.append(text[:room])
            self._kept += min(room, len(text))
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def getvalue(self) -> str:
        text = "".join(self._parts)
        if self.dropped:
            text += f"\n... ({self.dropped} more characters not shown)"
        return text


def _restricted_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0):
    """``__import__`` that serves only preloaded modules under IMPORTABLE_ROOTS (never the filesystem)."""
    allowed = ", ".join(IMPORTABLE_ROOTS)
    if level != 0:
        raise ImportError(f"relative imports are not available; the code may import {allowed}")
    root = name.partition(".")[0]
    module = sys.modules.get(name)
    if root not in IMPORTABLE_ROOTS or module is None:
        raise ImportError(f"module '{name}' is not available; the code may import {allowed}")
    if fromlist:
        for attr in fromlist:
            sub = f"{name}.{attr}"
            if not hasattr(module, attr) and sub not in sys.modules:
                raise ImportError(f"cannot import '{attr}' from '{name}'; the code may import {allowed}")
        return module
    return sys.modules[root]


def _audit_os_system(event: str, args: tuple) -> None:
    # os.system() reports a failed fork as a -1 return value, not an exception; seccomp already
    # stops the fork, this only turns the silent -1 into an error the model can read.
    if event == "os.system":
        raise PermissionError(errno.EPERM, messages.FORBIDDEN_TEXT)


def _safe_builtins() -> dict[str, Any]:
    table = dict(vars(builtins))
    table["__import__"] = _restricted_import
    return table


def _clean(text: str) -> str:
    text = messages.redact_host_paths(text)
    if len(text) > _MAX_ERROR_CHARS:
        text = text[:_MAX_ERROR_CHARS] + " ..."
    return text


def _code_line(code_lines: list[str], lineno: int | None) -> str:
    if lineno and 0 < lineno <= len(code_lines):
        return code_lines[lineno - 1].strip()
    return ""


def _located(code_lines: list[str], lineno: int | None, text: str) -> str:
    line = _code_line(code_lines, lineno)
    if lineno is None:
        return text
    return f"line {lineno}: {line}\n{text}" if line else f"line {lineno}\n{text}"


def _syntax_error(code_lines: list[str], exc: SyntaxError) -> str:
    return _located(code_lines, exc.lineno, f"SyntaxError: {exc.msg}")


def _exception_line(exc: BaseException) -> int | None:
    """The line of the model's code where ``exc`` surfaced (the deepest frame in <code>)."""
    lineno = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == CODE_FILENAME:
            lineno = frame.lineno
    return lineno


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as inner:  # the code may define an exception whose __str__ itself fails
        return f"<unprintable {type(exc).__name__}: {type(inner).__name__}>"


def classify_exception(exc: BaseException) -> str:
    """The error class of an exception raised by the model's code."""
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, ImportError):
        return "import"
    if isinstance(exc, OSError) and exc.errno in _PERMISSION_ERRNOS:
        return "forbidden"
    if isinstance(exc, RuntimeError) and "can't start new thread" in _safe_str(exc):
        return "forbidden"
    if isinstance(exc, cv2.error) and _CV2_MEMORY.search(_safe_str(exc)):
        return "memory"
    return "runtime"


def describe_exception(code_lines: list[str], exc: BaseException, memory_mb: int) -> tuple[str, str]:
    """``(error_class, text)`` for an exception raised while running the code."""
    error_class = classify_exception(exc)
    lineno = _exception_line(exc)
    if error_class == "memory":
        return error_class, _located(code_lines, lineno, messages.memory_error(memory_mb))
    if error_class == "forbidden":
        return error_class, _located(code_lines, lineno, f"{type(exc).__name__}: {messages.FORBIDDEN_TEXT}")
    if isinstance(exc, SystemExit):
        return "runtime", _located(code_lines, lineno, "SystemExit: the code called exit() before leaving a result")
    message = _safe_str(exc)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return error_class, _located(code_lines, lineno, _clean(text))


def _array_to_image(array: np.ndarray) -> tuple[Image.Image | None, str | None, str | None]:
    """``(image, error_class, error)`` for a uint8 array (HxW, HxWx1, HxWx3, HxWx4, read as RGB/RGBA)."""
    if array.dtype != np.uint8:
        return None, "bad_result", messages.bad_result_error(
            f"a numpy array of dtype {array.dtype} (convert it with .astype(np.uint8))")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        mode = "RGB" if array.shape[2] == 3 else "RGBA"
    else:
        return None, "bad_result", messages.bad_result_error(f"a numpy array of shape {tuple(array.shape)}")
    if array.size == 0:
        return None, "bad_image", f"the result image is empty (array of shape {tuple(array.shape)})"
    return Image.fromarray(np.ascontiguousarray(array), mode), None, None


def normalize_result(value: Any, max_pixels: int) -> tuple[Image.Image | None, str | None, str | None]:
    """``(image, error_class, error)`` for what the code left in ``result``.

    The image comes back in a protocol mode (L, RGB, RGBA) and within the size limits.
    """
    if value is None:
        return None, "no_result", messages.no_result_error()
    if isinstance(value, np.ndarray):
        value, error_class, error = _array_to_image(value)
        if value is None:
            return None, error_class, error
    if not isinstance(value, Image.Image):
        return None, "bad_result", messages.bad_result_error(f"a {type(value).__name__}")
    width, height = value.size
    problem = messages.image_size_problem(width, height, max_pixels)
    if problem:
        return None, "bad_image", problem
    return wire_image(value), None, None


class CodeRunner:
    """Runs code strings against an input image; in session mode one runner keeps its variables."""

    def __init__(self, max_output_pixels: int, max_stdout_chars: int, memory_mb: int, tracer: Any | None,
                 restricted_imports: bool = True):
        """``tracer``: an installed ``OpTracer`` (its ``begin(image)`` / ``ops()`` bracket each call).
        ``restricted_imports``: serve ``import`` from preloaded modules only (off only in the escape
        suite's control runs, see ``cv_ray.sandbox.protections``)."""
        self._builtins = _safe_builtins() if restricted_imports else dict(vars(builtins))
        self._max_output_pixels = max_output_pixels
        self._max_stdout_chars = max_stdout_chars
        self._memory_mb = memory_mb
        self._tracer = tracer
        self._namespace: dict[str, Any] = {}

    def _prepare_namespace(self, image: Image.Image) -> None:
        ns = self._namespace
        # Session variables survive; the tool's own names are reset for every call.
        for name in ("result", "output"):
            ns.pop(name, None)
        ns.update({
            "__builtins__": dict(self._builtins), "__name__": "__main__",
            "image": image, "img": image, "draw": ImageDraw.Draw(image),
            "PIL": PIL, "Image": Image, "ImageEnhance": ImageEnhance, "ImageFilter": ImageFilter,
            "ImageOps": ImageOps, "ImageDraw": ImageDraw, "ImageFont": ImageFont,
            "np": np, "numpy": np, "cv2": cv2, "cv": cv2, "math": math,
        })

    def run(self, code: str, image: Image.Image) -> tuple[dict[str, Any], Image.Image | None]:
        """Run ``code`` on ``image`` (the child's own copy) and describe the outcome."""
        code_lines = code.splitlines()
        stdout = CappedText(self._max_stdout_chars)
        meta: dict[str, Any] = {"ok": False, "error": None, "error_class": None, "stdout": "", "traced": [],
                                "tracer_errors": 0}
        try:
            compiled = compile(code, CODE_FILENAME, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:  # ValueError: NUL bytes in the source
            meta["error_class"] = "syntax"
            meta["error"] = (_syntax_error(code_lines, exc) if isinstance(exc, SyntaxError)
                             else f"SyntaxError: {_clean(str(exc))}")
            return meta, None
        self._prepare_namespace(image)
        if self._tracer is not None:
            self._tracer.begin(image)
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = stdout
        try:
            exec(compiled, self._namespace)
            value = self._namespace.get("result")
            if value is None:
                value = self._namespace.get("output")
            result, error_class, error = normalize_result(value, self._max_output_pixels)
            if result is not None and self._tracer is not None:
                meta["traced"] = self._tracer.ops(result=value)
        except BaseException as exc:  # trust boundary: anything the model's code raises becomes its error text
            result = None
            error_class, error = describe_exception(code_lines, exc, self._memory_mb)
        finally:
            sys.stdout, sys.stderr = saved
        meta["stdout"] = stdout.getvalue()
        if self._tracer is not None:
            meta["tracer_errors"] = self._tracer.errors
        meta["ok"] = result is not None
        meta["error_class"], meta["error"] = error_class, error
        return meta, result


def install_audit_hook() -> None:
    """Install the os.system hook (once per zygote; children inherit it)."""
    sys.addaudithook(_audit_os_system)


def hide_host_paths() -> None:
    """Replace host paths in what the code can easily print: module ``__file__``, ``__path__``,
    specs and loaders, ``sys.path``, ``sys.prefix`` & co, ``sys.argv``, and the environment
    (``PYTHONPATH`` is dropped).

    Run once in the zygote after the last import from files (children import nothing from files).
    Not a boundary: paths remain in memory (code objects, the dynamic linker's tables), so the
    parent also redacts every host path from what the model reads (``messages.redact_host_paths``).
    """
    hide = messages.redact_host_paths
    for module in list(sys.modules.values()):
        attributes = getattr(module, "__dict__", None)
        if not isinstance(attributes, dict):
            continue
        for name in ("__file__", "__cached__"):
            if isinstance(attributes.get(name), str):
                attributes[name] = hide(attributes[name])
        if "__path__" in attributes:
            attributes["__path__"] = [hide(p) for p in attributes["__path__"] if isinstance(p, str)]
        spec = attributes.get("__spec__")
        if spec is not None:
            if isinstance(getattr(spec, "origin", None), str):
                spec.origin = hide(spec.origin)
            if spec.submodule_search_locations is not None:
                spec.submodule_search_locations = [hide(p) for p in spec.submodule_search_locations]
            spec.cached = None
        loader = attributes.get("__loader__")
        if isinstance(getattr(loader, "path", None), str):
            loader.path = hide(loader.path)
    sys.path[:] = [hide(p) for p in sys.path]
    sys.path_importer_cache.clear()
    for name in ("prefix", "base_prefix", "exec_prefix", "base_exec_prefix", "executable", "_base_executable"):
        if isinstance(getattr(sys, name, None), str):
            setattr(sys, name, hide(getattr(sys, name)))
    sys.argv[:] = [hide(a) for a in sys.argv]
    sys.orig_argv[:] = [hide(a) for a in sys.orig_argv]
    os.environ.pop("PYTHONPATH", None)
    for name, value in list(os.environ.items()):  # e.g. LD_LIBRARY_PATH, which cv2 sets on import
        os.environ[name] = hide(value)
