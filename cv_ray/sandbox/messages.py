"""The error texts the model reads, and the checks on result images shared by child and parent.

Each failure has a class (counted in metrics; see ``ExecResult.error_class``) and a text that is
exactly what the model sees after ``Error:``. Texts never contain host paths or sandbox internals;
they say what went wrong and, where useful, how to fix it.
"""

from __future__ import annotations

import os
import re
import sys

ERROR_CLASSES = frozenset({
    "syntax", "runtime", "timeout", "memory", "forbidden", "import", "no_result", "bad_result",
    "bad_image", "image_index", "code_too_long", "sandbox",
})

#: Images whose long side is at least this many times the short side are refused (the reference's rule).
MAX_ASPECT_RATIO = 200

FORBIDDEN_TEXT = "file, network and process access are not available"


def timeout_error(timeout_s: float) -> str:
    return f"the code ran longer than the {timeout_s:g} s limit and was stopped"


def memory_error(memory_mb: int) -> str:
    return f"the code used more than the {memory_mb} MB memory limit and was stopped"


def code_too_long_error(length: int, limit: int) -> str:
    return f"the code is {length} characters long; the limit is {limit}"


def image_index_error(image_index: object, num_images: int) -> str:
    if num_images == 1:
        valid = "the only valid image_index is 0"
    else:
        valid = f"valid image_index values are 0 to {num_images - 1}"
    return f"image_index {image_index!r} does not exist: {valid}"


def no_result_error() -> str:
    return "the code did not leave an image in `result` (or `output`)"


def bad_result_error(description: str) -> str:
    return (f"`result` is {description}; expected a PIL image or a uint8 numpy array "
            "of shape HxW, HxWx3 or HxWx4")


def sandbox_error() -> str:
    return "the code could not be run because of an internal problem of the tool; please try again"


def image_size_problem(width: int, height: int, max_pixels: int) -> str | None:
    """Why a result image of ``width x height`` is refused, or None when it is acceptable."""
    if width <= 0 or height <= 0:
        return f"the result image is empty ({width}x{height})"
    if max(width, height) >= MAX_ASPECT_RATIO * min(width, height):
        return (f"the result image is {width}x{height}: the long side must be less than "
                f"{MAX_ASPECT_RATIO} times the short side")
    if width * height > max_pixels:
        return f"the result image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
    return None


def _host_roots() -> list[str]:
    """Directories whose paths the model must not see: the Python installation, the virtualenv,
    every directory modules are imported from (``sys.path``), and the checkout cv_ray is imported
    from; each as named and as resolved (any of them may be a symlink)."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, package_root,
             *(p for p in sys.path if os.path.isabs(p))}
    roots |= {os.path.realpath(r) for r in roots}
    return sorted((r for r in roots if r and r != "/"), key=len, reverse=True)


#: Any absolute path under one of the host roots (computed at import: the zygote scrubs ``sys``
#: afterwards, see ``runner.hide_host_paths``).
HOST_PATH = re.compile("(?:" + "|".join(re.escape(r) for r in _host_roots()) + r")(?:/[^\s'\"]*|(?=[\s'\"]|$))")
HOST_PATH_PLACEHOLDER = "<lib>"


def redact_host_paths(text: str) -> str:
    """``text`` with every host path replaced by ``<lib>`` (the parent applies it to everything
    the model reads: a child can print whatever paths it finds)."""
    return HOST_PATH.sub(HOST_PATH_PLACEHOLDER, text)
