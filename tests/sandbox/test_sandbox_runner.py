"""What the model reads: error texts and result checks of the in-child runner, run in-process here
(the runner is not a security boundary; isolation is tested against real children elsewhere)."""

from __future__ import annotations

import signal

import pytest
from PIL import Image

from cv_ray.sandbox import messages
from cv_ray.sandbox.pool import check_request, classify_exit
from cv_ray.sandbox.runner import CodeRunner


@pytest.fixture()
def run():
    image = Image.new("RGB", (40, 30), "white")

    def _run(code: str, max_pixels: int = 10_000, stdout_chars: int = 50):
        return CodeRunner(max_pixels, stdout_chars, 512, tracer=None).run(code, image.copy())

    return _run


def test_success_and_stdout_cap(run):
    meta, image = run("print('x' * 80)\nresult = img.crop((0, 0, 10, 5))")
    assert meta["ok"] and image.size == (10, 5)
    assert meta["stdout"].startswith("x" * 50) and "31 more characters" in meta["stdout"]


def test_syntax_error_names_its_line(run):
    meta, _ = run("a = 1\nb = (2 +\n")
    assert meta["error_class"] == "syntax"
    assert meta["error"].startswith("line 2: b = (2 +\nSyntaxError:")


def test_runtime_error_names_the_line_of_its_code_and_no_host_path(run):
    meta, _ = run("x = 1\nresult = img.rotate('ninety')\n")
    assert meta["error_class"] == "runtime"
    assert meta["error"].startswith("line 2: result = img.rotate('ninety')\n")
    assert "/site-packages/" not in meta["error"] and ".venv" not in meta["error"]
    assert "File " not in meta["error"]


def test_error_raised_inside_a_library_is_reported_at_the_callers_line(run):
    meta, _ = run("import numpy as np\n\nresult = np.zeros((2, 2)) @ np.zeros((3, 3))")
    assert meta["error_class"] == "runtime" and meta["error"].startswith("line 3: ")
    assert "ValueError" in meta["error"]


@pytest.mark.parametrize("code", ["import os", "import subprocess", "from os import path", "import PIL.ImageQt",
                                  "from . import x", "__import__('socket')"])
def test_imports_outside_the_allowed_set(run, code):
    meta, _ = run(code)
    assert meta["error_class"] == "import"
    assert "the code may import PIL, numpy, cv2, math" in meta["error"]


def test_allowed_imports(run):
    meta, image = run("import math, cv2, numpy as np\nfrom PIL import Image, ImageOps, ImageFilter\n"
                      "import PIL.ImageEnhance\nresult = ImageOps.mirror(image)")
    assert meta["ok"], meta["error"]


@pytest.mark.parametrize("code, error_class, fragment", [
    ("x = 1", "no_result", "did not leave an image"),
    ("result = 'a picture'", "bad_result", "is a str"),
    ("result = np.zeros((4, 4), dtype=np.float64)", "bad_result", "dtype float64"),
    ("result = np.zeros((4, 4, 2), dtype=np.uint8)", "bad_result", "shape (4, 4, 2)"),
    ("result = np.zeros((0, 4, 3), dtype=np.uint8)", "bad_image", "empty"),
    ("result = img.crop((0, 0, 0, 10))", "bad_image", "empty"),
    ("result = img.resize((400, 2))", "bad_image", "200 times"),
    ("result = img.resize((200, 100))", "bad_image", "the limit is 10000"),
    ("raise SystemExit(3)", "runtime", "SystemExit"),
    ("result = open('/nonexistent-file')", "runtime", "FileNotFoundError"),
])
def test_result_and_failure_classes(run, code, error_class, fragment):
    meta, image = run(code)
    assert (meta["error_class"], image) == (error_class, None)
    assert fragment in meta["error"]


@pytest.mark.parametrize("code, mode", [
    ("result = np.zeros((5, 6), dtype=np.uint8)", "L"),
    ("result = np.zeros((5, 6, 1), dtype=np.uint8)", "L"),
    ("result = np.asarray(img)", "RGB"),
    ("result = np.zeros((5, 6, 4), dtype=np.uint8)", "RGBA"),
    ("output = img.convert('P')", "RGB"),
    ("result = img.convert('1')", "L"),
])
def test_arrays_and_modes_are_converted(run, code, mode):
    meta, image = run(code)
    assert meta["ok"], meta["error"]
    assert image.mode == mode


def test_session_runner_keeps_variables_but_resets_result(run):
    runner = CodeRunner(10_000, 100, 512, tracer=None)
    image = Image.new("L", (8, 8))
    assert runner.run("counter = 41\nresult = image", image.copy())[0]["ok"]
    meta, _ = runner.run("counter += 1\nprint(counter)", image.copy())
    assert meta["stdout"] == "42\n" and meta["error_class"] == "no_result"


def test_check_request():
    images = [Image.new("L", (4, 4))] * 3
    assert check_request("x", images, 0, 10, 16) is None
    too_long = check_request("x" * 11, images, 0, 10, 16)
    assert too_long.error_class == "code_too_long" and "11 characters" in too_long.error
    for bad in (3, -1, "0", True):
        refused = check_request("x", images, bad, 10, 16)
        assert refused.error_class == "image_index"
        assert "valid image_index values are 0 to 2" in refused.error
    too_big = check_request("x", images, 1, 10, 15)  # 4 x 4 = 16 pixels > 15
    assert too_big.error_class == "bad_image" and "image 1 is 4x4" in too_big.error


@pytest.mark.parametrize("report, expected", [
    ({"ready": True, "reason": "timeout", "code": -signal.SIGKILL}, "timeout"),
    ({"ready": True, "reason": "exited", "code": -signal.SIGXCPU}, "timeout"),
    ({"ready": True, "reason": "exited", "code": -signal.SIGKILL, "cpu_limit": True}, "timeout"),
    ({"ready": True, "reason": "exited", "code": -signal.SIGKILL, "oom": True}, "memory"),
    # a SIGKILL that was neither ours, nor its CPU limit's, nor the OOM killer's: from outside
    ({"ready": True, "reason": "exited", "code": -signal.SIGKILL, "oom": False}, "sandbox"),
    ({"ready": True, "reason": "exited", "code": -signal.SIGSEGV}, "runtime"),
    ({"ready": True, "reason": "exited", "code": 3}, "runtime"),
    # once the child is ready, its exit status is the code's, whatever number it chose
    ({"ready": True, "reason": "exited", "code": 70}, "runtime"),
    ({"ready": True, "reason": "exited", "code": 0}, "runtime"),
    ({"ready": False, "reason": "exited", "code": 70}, "sandbox"),
    ({"ready": False, "reason": "exited", "code": 3}, "sandbox"),
    ({"ready": True, "reason": "killed", "code": -signal.SIGKILL}, "runtime"),
    ({"ready": True, "reason": "idle", "code": -signal.SIGKILL}, "sandbox"),
])
def test_classify_exit(report, expected):
    """Mutant: an exit status of 70 (the set-up failure status) read as ``sandbox`` whatever the
    readiness, or an unexplained SIGKILL read as ``memory``."""
    error_class, text = classify_exit(report, 5.0, 1024)
    assert error_class == expected and text


def test_image_size_problem():
    # 199 x 1 is the widest allowed strip (199 < 200); 200 x 1 is refused; 100 x 100 is over a 9999 limit.
    assert messages.image_size_problem(199, 1, 10**6) is None
    assert "200 times" in messages.image_size_problem(200, 1, 10**6)
    assert "limit is 9999" in messages.image_size_problem(100, 100, 9999)
    assert "empty" in messages.image_size_problem(0, 5, 10**6)
