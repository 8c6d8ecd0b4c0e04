"""SandboxPool with real zygotes and hardened children: results, error classes, threads, sessions,
recovery. Pixels are compared with what PIL computes in this process."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from cv_ray.sandbox import SandboxPool, SandboxUnavailable
from cv_ray.sandbox.config import SandboxConfig


def test_layers_reported_and_all_active(pool):
    expected = {"network_namespace", "seccomp", "seccomp_mode", "unprivileged_uid", "no_new_privs", "rlimits",
                "clean_environment", "runner"}
    assert expected <= set(pool.layers)
    assert all(info["ok"] for info in pool.layers.values()), pool.layers


@pytest.mark.parametrize("code, expected", [
    ("result = image.rotate(90, expand=True)", lambda im: im.transpose(Image.Transpose.ROTATE_90)),
    ("result = img.crop((10, 20, 110, 90))", lambda im: im.crop((10, 20, 110, 90))),
    ("from PIL import ImageEnhance, ImageFilter\n"
     "result = ImageEnhance.Contrast(image).enhance(1.8).filter(ImageFilter.SHARPEN)",
     lambda im: ImageEnhance.Contrast(im).enhance(1.8).filter(ImageFilter.SHARPEN)),
    ("a = np.array(image)[5:50, 7:77]\nresult = Image.fromarray(np.flipud(a))",
     lambda im: im.crop((7, 5, 77, 50)).transpose(Image.Transpose.FLIP_TOP_BOTTOM)),
    ("result = cv2.rotate(np.asarray(img), cv2.ROTATE_90_CLOCKWISE)", lambda im: im.transpose(Image.Transpose.ROTATE_270)),
])
def test_image_code_returns_the_right_pixels(pool, photo, code, expected):
    r = pool.run(code, [photo])
    assert r.ok, r.error
    want = expected(photo.copy())
    assert r.image.size == want.size
    assert np.array_equal(np.asarray(r.image), np.asarray(want))
    assert r.seconds > 0 and r.error is None and r.error_class is None


def test_image_index_selects_the_trajectory_image(pool, photo):
    small = photo.resize((64, 48))
    r = pool.run("result = image", [photo, small], image_index=1)
    assert r.ok and r.image.size == (64, 48)
    refused = pool.run("result = image", [photo, small], image_index=2)
    assert refused.error_class == "image_index" and "0 to 1" in refused.error


def test_the_input_image_is_a_copy(pool, photo):
    before = np.asarray(photo).copy()
    r = pool.run("draw.rectangle((0, 0, 50, 50), fill='red')\nresult = image", [photo])
    assert r.ok and tuple(np.asarray(r.image)[10, 10]) == (255, 0, 0)
    assert np.array_equal(np.asarray(photo), before)


@pytest.mark.parametrize("code, error_class, fragment", [
    ("result = image.rotate(90,", "syntax", "line 1"),
    ("y = 2\nresult = image.rotat(90)", "runtime", "line 2: result = image.rotat(90)\nAttributeError"),
    ("while True:\n    pass", "timeout", "2 s limit"),
    ("import time\ntime.sleep(30)", "import", "module 'time' is not available"),
    ("blob = bytearray(50 * 2**30)", "memory", "512 MB"),
    ("chunks = []\nwhile True:\n    chunks.append(np.empty(10**7))", "memory", "512 MB"),
    ("result = open('/etc/hostname').read()", "forbidden", "file, network and process access are not available"),
    ("import socket", "import", "may import PIL, numpy, cv2, math"),
    ("x = 1", "no_result", "`result`"),
    ("result = [1, 2]", "bad_result", "a list"),
    ("result = Image.new('L', (3000, 3000))", "bad_image", "the limit is 4194304"),
    ("result = image.resize((1000, 4))", "bad_image", "200 times"),
    ("result = image.crop((0, 0, 0, 0))", "bad_image", "empty"),
])
def test_error_classes_from_real_children(pool, photo, code, error_class, fragment):
    r = pool.run(code, [photo])
    assert not r.ok and r.image is None
    assert r.error_class == error_class, r.error
    assert fragment in r.error
    assert "/work/" not in r.error and "site-packages" not in r.error


def test_code_too_long_is_refused_before_running(pool, photo):
    r = pool.run("#" * 5000, [photo])
    assert r.error_class == "code_too_long" and "limit is 2048" in r.error


def test_timeout_is_wall_clock_even_when_blocked_in_c(pool, photo):
    """One huge matrix product is a single C call that never returns to the interpreter: only the
    zygote's clock can stop it (the deadline is armed after the call began, hence the lower bound;
    no upper bound: the time a loaded machine takes to deliver the kill is not the sandbox's)."""
    code = "a = np.random.rand(3000, 3000)\nfor _ in range(1000):\n    a = a @ a.T"
    r = pool.run(code, [photo])
    assert r.error_class == "timeout" and r.seconds >= pool.cfg.timeout_s


def test_stdout_is_captured_and_capped(photo):
    with SandboxPool(SandboxConfig(workers_per_executor=1, timeout_s=2.0, memory_mb=512, max_stdout_chars=20)) as small:
        r = small.run("for i in range(100):\n    print(i)\nresult = image", [photo])
    assert r.ok and r.stdout.startswith("0\n1\n2\n") and "more characters not shown" in r.stdout


def test_many_threads_spread_over_workers(pool, photo):
    images = [photo.rotate(angle) for angle in range(0, 360, 30)]

    def one(k: int):
        r = pool.run("result = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)", [images[k % len(images)]])
        return k, r

    served_before = [slot.zygote.served for slot in pool._slots]
    with ThreadPoolExecutor(max_workers=12) as ex:
        results = list(ex.map(one, range(36)))
    for k, r in results:
        assert r.ok, r.error
        want = images[k % len(images)].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert np.array_equal(np.asarray(r.image), np.asarray(want))
    served = [slot.zygote.served - before for slot, before in zip(pool._slots, served_before)]
    assert sum(served) == 36 and min(served) > 0


def test_a_killed_zygote_is_replaced(photo):
    with SandboxPool(SandboxConfig(workers_per_executor=1, timeout_s=2.0, memory_mb=512)) as small:
        old = small._slots[0].zygote.proc
        os.kill(old.pid, signal.SIGKILL)
        old.wait()
        r = small.run("result = image.rotate(180)", [photo])
        assert r.ok and small._slots[0].zygote.proc.pid != old.pid


def test_zygote_is_recycled_after_n_calls(photo):
    with SandboxPool(SandboxConfig(workers_per_executor=1, timeout_s=2.0, memory_mb=512, recycle_after=3)) as small:
        first = small._slots[0].zygote.proc.pid
        for _ in range(3):
            assert small.run("result = image", [photo]).ok
        assert small._slots[0].zygote.proc.pid != first
        assert small.run("result = image", [photo]).ok


def test_sessions_keep_variables_and_stay_isolated(photo):
    with SandboxPool(SandboxConfig(workers_per_executor=2, timeout_s=2.0, memory_mb=512, session="trajectory", session_idle_s=1.0)) as p:
        assert p.run("secret_a = 'alpha'\nresult = image", [photo], session_id="a").ok
        assert p.run("result = image.crop((0, 0, 10, 10))", [photo], session_id="b").ok
        same = p.run("print(secret_a)\nresult = image", [photo], session_id="a")
        assert same.ok and same.stdout == "alpha\n"
        other = p.run("print(secret_a)", [photo], session_id="b")
        assert other.error_class == "runtime" and "NameError" in other.error
        # a session's timeout ends its child: the next call starts fresh
        assert p.run("while True: pass", [photo], session_id="a").error_class == "timeout"
        fresh = p.run("print(secret_a)", [photo], session_id="a")
        assert "NameError" in fresh.error
        assert p.run("kept = 1\nresult = image", [photo], session_id="c").ok
        p.close_session("c")
        assert "NameError" in p.run("print(kept)", [photo], session_id="c").error
        assert p.run("idle = 1\nresult = image", [photo], session_id="d").ok
        _wait_for_exit(p, "d")  # past session_idle_s the zygote ends the idle child and reports it
        assert "NameError" in p.run("print(idle)", [photo], session_id="d").error
        # per-call pools ignore session ids
    with SandboxPool(SandboxConfig(workers_per_executor=1, timeout_s=2.0, memory_mb=512)) as call_pool:
        assert call_pool.run("v = 1\nresult = image", [photo], session_id="x").ok
        assert "NameError" in call_pool.run("print(v)", [photo], session_id="x").error


def _wait_for_exit(pool: SandboxPool, session_id: str, timeout: float = 60.0) -> None:
    """Block on the zygote's reports (not on a clock) until the session's child is reported dead."""
    slot = pool._session_slot[session_id]
    child = slot.sessions[session_id]
    deadline = time.monotonic() + timeout
    while child.pid not in slot.zygote._exits and time.monotonic() < deadline:
        slot.zygote._receive(0.1)
    assert child.pid in slot.zygote._exits


def test_the_least_recently_used_session_is_evicted(photo):
    """``max_sessions_per_worker``: a third session on a worker that holds two ends the least
    recently used one (its variables are gone); the other two keep theirs.

    Mutant: eviction of the most recently used session (``next(reversed(slot.sessions))``).
    """
    cfg = SandboxConfig(workers_per_executor=1, timeout_s=5.0, memory_mb=512, session="trajectory",
                        max_sessions_per_worker=2)
    with SandboxPool(cfg) as p:
        assert p.run("v = 'a'\nresult = image", [photo], session_id="a").ok
        assert p.run("v = 'b'\nresult = image", [photo], session_id="b").ok
        assert p.run("print(v)\nresult = image", [photo], session_id="a").stdout == "a\n"  # b is now the oldest use
        assert p.run("v = 'c'\nresult = image", [photo], session_id="c").ok
        assert list(p._slots[0].sessions) == ["a", "c"]
        assert p.run("print(v)\nresult = image", [photo], session_id="a").stdout == "a\n"
        assert p.run("print(v)\nresult = image", [photo], session_id="c").stdout == "c\n"
        evicted = p.run("print(v)", [photo], session_id="b")
        assert evicted.error_class == "runtime" and "NameError" in evicted.error


def test_missing_seccomp_is_refused_unless_degraded_is_allowed(tmp_path, monkeypatch, photo):
    # A real host without pyseccomp: the zygote's import of it fails.
    (tmp_path / "pyseccomp.py").write_text("raise ImportError('libseccomp is not installed on this host')\n")
    from cv_ray.sandbox import zygote_handle

    real_env = zygote_handle.zygote_env

    def env_without_seccomp() -> dict[str, str]:
        env = real_env()
        env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
        return env

    monkeypatch.setattr(zygote_handle, "zygote_env", env_without_seccomp)
    with pytest.raises(SandboxUnavailable, match="seccomp .*libseccomp is not installed.*allow_degraded"):
        SandboxPool(SandboxConfig(workers_per_executor=1, timeout_s=2.0, memory_mb=512))
    with SandboxPool(SandboxConfig(workers_per_executor=1, timeout_s=2.0, memory_mb=512, allow_degraded=True)) as degraded:
        assert not degraded.layers["seccomp"]["ok"] and degraded.layers["network_namespace"]["ok"]
        r = degraded.run("result = image.rotate(90, expand=True)", [photo])
        assert r.ok


@pytest.mark.parametrize("code, ops, to_input_corner", [
    # rotate_90 (CCW) of a W x H = 256 x 192 image: result pixel (0, 0) is input pixel (256, 0).
    ("result = image.rotate(90, expand=True)", ["rotate_90"], (256.0, 0.0)),
    ("result = Image.fromarray(np.rot90(np.asarray(img)))", ["rotate_90"], (256.0, 0.0)),
    # a NumPy-slice crop starting at column 7, row 5: result (0, 0) is input (7, 5).
    ("result = Image.fromarray(np.array(img)[5:50, 7:77])", ["crop"], (7.0, 5.0)),
])
def test_ops_are_traced_and_verified_by_the_parent(pool, photo, code, ops, to_input_corner):
    from cv_ray.geometry import apply

    r = pool.run(code, [photo])
    assert r.ok, r.error
    assert [op["op"] for op in r.ops] == ops
    assert r.to_input is not None
    assert apply(r.to_input, 0.0, 0.0) == pytest.approx(to_input_corner)


def test_photometric_ops_have_no_geometric_map(pool, photo):
    r = pool.run("from PIL import ImageEnhance\nresult = ImageEnhance.Contrast(image).enhance(1.8)", [photo])
    assert r.ok and any(op["op"].startswith("contrast") for op in r.ops), r.ops


def test_tracer_errors_are_reported_to_the_pool(pool, photo):
    """The child counts traced calls whose bookkeeping failed; the parent adds them to its stats.

    Mutant: the runner leaves ``tracer_errors`` out of its metadata (the count stays in the child).
    """
    before = pool.stats().get("tracer_errors", 0)
    # ImageOps.crop takes a (left, top) border; the tracer's handler reads one width only and fails
    r = pool.run("result = ImageOps.crop(image, (1, 2))", [photo])
    assert r.ok, r.error
    assert r.image.size == (photo.width - 2, photo.height - 4)  # the call itself ran
    assert pool.stats().get("tracer_errors", 0) == before + 1


def test_a_crop_reports_the_box_the_code_passed_in_its_own_frame(pool, photo):
    """``frame_box``: a crop of a turned image keeps the box as passed, in the turned image's pixels,
    while ``box`` is mapped to the call's input (the reward's reference mode scores the literal box).

    Mutant: ``frame_box`` set from the input-frame box (the mapped one) instead of the hint's own.
    """
    # rotate_90 of the 256 x 192 photo gives 192 x 256; rotated pixel (x', y') shows input pixel
    # (256 - y', x'), so the rotated frame's [10.4, 20, 60, 70] (PIL crops at x = 10) covers input
    # x in [256 - 70, 256 - 20] = [186, 236] and y in [10, 60].
    r = pool.run("result = image.rotate(90, expand=True).crop((10.4, 20, 60, 70))", [photo])
    assert r.ok, r.error
    crop = next(op for op in r.ops if op["op"] == "crop")
    assert crop["frame_box"] == [10.4, 20, 60, 70]
    assert crop["box"] == [186.0, 10.0, 236.0, 60.0]
    assert [op["op"] for op in r.ops] == ["rotate_90", "crop"]


def test_a_fractional_resize_box_is_verified_without_a_crash(pool):
    """Class 7 through the pool: an honest resize with a half-pixel box and an odd width, then a
    gray conversion (compared with a tolerance), on an image whose columns are all alike (so the
    result is an exact view). The old full check compared arrays one pixel apart in width and
    ``pool.run`` raised.

    Mutant: the old ``recognize._exact_everywhere`` (the map's box rounded before slicing).
    """
    gradient = np.repeat(np.arange(0, 192, 3, dtype=np.uint8)[:, None], 96, axis=1)
    image = Image.fromarray(np.stack([gradient, gradient // 2, 255 - gradient], -1))
    r = pool.run("result = image.resize((7, 8), box=(0.5, 0, 7.5, 8)).convert('L')", [image])
    assert r.ok, r.error
    assert [op["op"] for op in r.ops] == ["crop", "resize", "grayscale"]
    assert r.ops[0]["frame_box"] == [0.5, 0, 7.5, 8] and not any(op.get("unverified") for op in r.ops)


def test_a_crafted_pair_of_calls_is_verified_within_its_budget(pool):
    """Class 6 through the pool: the first call draws an input on which the second call's result
    makes the unbudgeted search quadratic; the second call returns, its verification stopped by
    the work budget and counted.

    Mutant: ``SandboxPool._verify`` calling reconcile with an unlimited budget.
    """
    first = pool.run("a = np.zeros((512, 512), np.uint8)\n"
                     "a[[5, 90, 170, 260, 333, 480], [400, 17, 250, 88, 301, 222]] = 200\n"
                     "result = Image.fromarray(a)", [Image.new("L", (8, 8))])
    assert first.ok, first.error
    before = pool.stats().get("unverified_budget", 0)
    # the odd pixel is off the 24 x 24 probe grid, so every probe sees zeros
    second = pool.run("b = np.zeros((100, 100), np.uint8)\nb[45, 45] = 7\nresult = b", [first.image])
    assert second.ok and second.ops == [] and second.to_input is None
    assert pool.stats().get("unverified_budget", 0) == before + 1


def test_text_from_the_child_is_valid_unicode(pool, photo):
    """A lone surrogate printed (or forged) by the code crosses JSON but no UTF-8 encoder: the
    rollout's tokenizer would raise on it downstream. The pool hands on valid text only.

    Mutant: ``_text`` returning the child's string as is.
    """
    r = pool.run("print('a\\ud800b')\nraise ValueError('c\\udfffd')", [photo])
    assert r.error_class == "runtime"
    for text in (r.stdout, r.error):
        text.encode("utf-8")  # raises on a lone surrogate
    assert r.stdout == "a?b\n" and "c?d" in r.error
