"""The sandbox zygote: a warm, single-threaded process that forks one hardened child per request.

Started by :class:`cv_ray.sandbox.zygote_handle.ZygoteProcess` with an empty environment, never by hand::

    python -m cv_ray.sandbox.zygote <control fd> '<settings JSON>'

Life of the zygote:

1. isolate itself: a new network namespace (as a normal user, inside a new user namespace);
2. warm up: import PIL / numpy / OpenCV single-threaded, load every PIL plugin and the modules the
   code may import, install the op tracer, run one job, compile the seccomp filter, ``gc.freeze()``
   so children do not touch (and copy) the zygote's objects;
3. self-test: fork one child, harden it, check from inside that each layer holds, report the
   layers to the parent (``hello``);
4. serve: keep one *spare* child already forked and hardened, blocked on its request pipe, and
   hand its pipe ends to the parent over the control socket (SCM_RIGHTS). The parent writes the
   request straight to the child and reads the response straight from it; the zygote only arms
   the wall-clock deadline (``go``), kills on expiry with SIGKILL, reaps, and reports exits.

The zygote never runs model code and never reads a child's output. Control messages are small
JSON objects on a SOCK_SEQPACKET socket that only the parent holds.

Parent -> zygote: ``{"cmd": "go", "pid", "timeout_s"}``, ``{"cmd": "done", "pid"}`` (a session
child went idle), ``{"cmd": "kill", "pid"}``, ``{"cmd": "recycle", "buffer"}`` with the buffer's
memfd (its child is dead and the parent zeroed it: lend it to a later child), ``{"cmd": "quit"}``.
Zygote -> parent: ``{"msg": "hello", "layers"}``, ``{"msg": "spare", "pid", "buffer"}`` with three
fds (request write end, response read end, the shared pixel buffer numbered ``buffer``),
``{"msg": "exit", "pid", "reason", "code"}`` where reason is ``timeout``, ``idle``, ``killed`` or
``exited`` and code is the exit status (negative: signal).
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

_ENV_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
#: The only environment variables a zygote (and so a child) is started with.
ZYGOTE_ENV_NAMES = _ENV_THREADS + ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONCOERCECLOCALE", "PYTHONUTF8")
#: glibc reads this when the zygote starts; the zygote then drops it, so children never see it.
#: Transparent huge pages for malloc's memory: a fresh child's first touch of each 4 KiB page of a
#: decoded image is most of a per-call child's extra cost on a VM (measured 3-5 us per page), and
#: one 2 MiB page is about five times cheaper than the 512 small pages it replaces.
GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"

_SELF_TEST_TIMEOUT_S = 30.0
_WARMUP_CODE = """
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
import numpy as np, cv2, math
im = image.crop((2, 2, 30, 30)).rotate(90, expand=True).transpose(Image.FLIP_LEFT_RIGHT)
im = ImageEnhance.Contrast(im).enhance(1.5).filter(ImageFilter.SHARPEN)
im = ImageOps.autocontrast(ImageOps.grayscale(im)).convert("RGB").resize((40, 40))
a = cv2.GaussianBlur(cv2.rotate(np.array(im), cv2.ROTATE_90_CLOCKWISE), (3, 3), 0)
a = np.flipud(np.rot90(a))[1:30, 2:31]
draw.rectangle((1, 1, 5, 5), outline="red")
print(math.pi, a.shape)
result = Image.fromarray(a)
"""
_PREFAULT_CODE = "result = image.crop((0, 0, 8, 8)).transpose(Image.ROTATE_90)\nprint(np.asarray(result).shape)"


@dataclass
class Settings:
    memory_mb: int
    timeout_s: float
    max_output_pixels: int
    max_stdout_chars: int
    session_idle_s: float


@dataclass
class _Child:
    pid: int
    pidfd: int
    deadline: float | None = None
    """Wall-clock deadline of the running request (monotonic seconds), None when not running."""
    idle_deadline: float | None = None
    """When an idle session child is killed (monotonic seconds)."""
    kill_reason: str | None = None


def _warm_up_imports() -> Any:
    """Import and initialise everything a child may use, then return the installed tracer."""
    import cv2
    import PIL
    from PIL import Image

    from cv_ray.sandbox import runner

    cv2.setNumThreads(1)
    Image.init()  # loads every format plugin now: children cannot open plugin files later
    for name in runner.PRELOADED_PIL_MODULES:
        __import__(f"{PIL.__name__}.{name}")
    for name in runner.PRELOADED_NUMPY_MODULES:
        __import__(f"numpy.{name}")
    # Codecs load lazily from files; without idna a blocked socket call would surface as an
    # unclear "unknown encoding" instead of the kernel's refusal.
    import encodings.idna  # noqa: F401
    runner.install_audit_hook()
    from cv_ray.sandbox.tracing import OpTracer

    tracer = OpTracer()
    tracer.install()
    return tracer


def _keep_only_fds(keep: set[int], devnull: int) -> None:
    """Point 0-2 at /dev/null and close every other descriptor except ``keep``."""
    for std in (0, 1, 2):
        os.dup2(devnull, std)
    low = 3
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


class Zygote:
    def __init__(self, ctrl_fd: int, settings: Settings):
        from cv_ray.sandbox import hardening

        self.settings = settings
        self.ctrl = socket.socket(fileno=ctrl_fd)
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.layers: dict[str, dict[str, Any]] = {}
        self.children: dict[int, _Child] = {}
        self.spare_pid: int | None = None
        self.outbox: list[tuple[bytes, list[int]]] = []
        self.pid = os.getpid()
        self.shm_bytes = shared_buffer_bytes(settings.max_output_pixels)
        self.free_buffers: list[tuple[int, int]] = []
        """(id, memfd) of shared buffers the parent scrubbed and lent back, warmest last."""
        self.buffers_made = 0

        try:
            detail = hardening.enter_network_isolation()
            self.layers["network_namespace"] = {"ok": _only_loopback(), "detail": detail}
        except hardening.LayerUnavailable as exc:
            self.layers["network_namespace"] = {"ok": False, "detail": str(exc)}
        os.environ.pop("GLIBC_TUNABLES", None)  # read at start (see GLIBC_TUNABLES); not for children
        unexpected_env = sorted(set(os.environ) - set(ZYGOTE_ENV_NAMES))
        self.layers["clean_environment"] = {"ok": not unexpected_env,
                                            "detail": f"unexpected variables: {unexpected_env}" if unexpected_env
                                            else "only thread-count variables"}
        self.tracer = _warm_up_imports()
        from cv_ray.sandbox.runner import CodeRunner

        self.runner_args = (settings.max_output_pixels, settings.max_stdout_chars, settings.memory_mb)
        self._warm_up_job(CodeRunner(*self.runner_args, tracer=self.tracer))
        try:
            self.seccomp_program: bytes | None = hardening.build_seccomp_program()
        except hardening.LayerUnavailable as exc:
            self.seccomp_program = None
            self.layers["seccomp"] = {"ok": False, "detail": str(exc)}
        gc.collect()
        gc.freeze()
        self._self_test()

    # ----- children -------------------------------------------------------------------------

    def _limits(self):
        from cv_ray.sandbox.hardening import ChildLimits, virtual_size_bytes

        per_call_cpu = math.ceil(self.settings.timeout_s) + 1
        # The child maps its shared pixel buffer after fork, so it is added to the budget.
        return ChildLimits(address_space_bytes=virtual_size_bytes() + self.shm_bytes + self.settings.memory_mb * 2**20,
                           # a session child gets a CPU budget of many calls over its life
                           cpu_hard_s=per_call_cpu * 64)

    def _take_buffer(self) -> tuple[int, int]:
        """(id, memfd) of a shared buffer for a new child: a scrubbed one the parent lent back, else a new one."""
        from cv_ray.sandbox.protocol import create_shared_buffer

        if self.free_buffers:
            return self.free_buffers.pop()
        self.buffers_made += 1
        return self.buffers_made, create_shared_buffer(self.shm_bytes)

    def _fork(self, body) -> tuple[int, int, int, int, int]:
        """Fork a hardened child running ``body(req_r, resp_w, shm)``; returns the pid and the
        parent's ends: (pid, req_w, resp_r, buffer id, shm_fd)."""
        from cv_ray.sandbox.protocol import map_shared_buffer

        limits = self._limits()
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        buffer_id, shm_fd = self._take_buffer()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                from cv_ray.sandbox.hardening import harden_child

                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _keep_only_fds({req_r, resp_w, shm_fd}, self.devnull)
                shm = map_shared_buffer(shm_fd)
                os.close(shm_fd)
                harden_child(limits, self.seccomp_program, self.pid)
                code = body(req_r, resp_w, memoryview(shm))
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(resp_w)
        return pid, req_w, resp_r, buffer_id, shm_fd

    def _serve(self, req_r: int, resp_w: int, shm: memoryview) -> int:
        """The child's request loop (runs after hardening, next to the model's code)."""
        from cv_ray.sandbox.protocol import ProtocolError, encode_response, read_request, write_frame
        from cv_ray.sandbox.runner import CodeRunner

        # Prefault, while this child is still a spare (off the critical path of its request): a
        # throwaway job touches (and so copies) the pages every call needs.
        CodeRunner(*self.runner_args, tracer=self.tracer).run(_PREFAULT_CODE, _warmup_image())
        runner = CodeRunner(*self.runner_args, tracer=self.tracer)
        try:
            while True:
                request = read_request(req_r, shm)
                if request is None:
                    return 0
                _set_cpu_budget(request.timeout_ms / 1000.0)
                meta, image = runner.run(request.code, request.image)
                try:
                    frame = encode_response(meta, image, shm)
                except (TypeError, ValueError):  # traced ops the model's code made unserialisable
                    meta["traced"] = []
                    frame = encode_response(meta, image, shm)
                write_frame(resp_w, frame)
                if not request.keep_alive:
                    return 0
        except (ProtocolError, BrokenPipeError):
            return 71

    def _make_spare(self) -> None:
        pid, req_w, resp_r, buffer_id, shm_fd = self._fork(self._serve)
        self.children[pid] = _Child(pid=pid, pidfd=os.pidfd_open(pid))
        self.spare_pid = pid
        self._send({"msg": "spare", "pid": pid, "buffer": buffer_id}, [req_w, resp_r, shm_fd])

    def _self_test(self) -> None:
        """Fork one hardened child that checks each layer from the inside and runs a warm-up job;
        meanwhile read its /proc status from the outside (no-new-privs, seccomp mode, uids)."""

        def probe(req_r: int, resp_w: int, _shm: memoryview) -> int:
            from cv_ray.sandbox.hardening import probe_layers
            from cv_ray.sandbox.runner import CodeRunner

            report = probe_layers(seccomp_expected=self.seccomp_program is not None)
            meta, _ = CodeRunner(*self.runner_args, tracer=self.tracer).run(_WARMUP_CODE, _warmup_image())
            report["runner"] = {"ok": bool(meta["ok"]), "detail": meta["error"] or "warm-up job ran"}
            os.write(resp_w, json.dumps(report).encode() + b"\n")
            os.read(req_r, 1)  # stay alive until the zygote has read our /proc status
            return 0

        from cv_ray.sandbox.hardening import read_proc_status_layers

        pid, req_w, resp_r, _, shm_fd = self._fork(probe)
        os.close(shm_fd)
        deadline = time.monotonic() + _SELF_TEST_TIMEOUT_S
        data = b""
        while not data.endswith(b"\n") and time.monotonic() < deadline:
            if not select.select([resp_r], [], [], deadline - time.monotonic())[0]:
                break
            chunk = os.read(resp_r, 65536)
            if not chunk:
                break
            data += chunk
        try:
            report = json.loads(data.decode())
            report.update(read_proc_status_layers(pid, seccomp_expected=self.seccomp_program is not None))
        except (UnicodeDecodeError, json.JSONDecodeError):
            report = {"self_test": {"ok": False, "detail": "the hardened test child sent no report "
                                                           "(a hardening step failed)"}}
        os.close(req_w)
        os.close(resp_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for name, value in report.items():
            self.layers.setdefault(name, value)

    def _warm_up_job(self, runner) -> None:
        meta, _ = runner.run(_WARMUP_CODE, _warmup_image())
        if not meta["ok"]:
            raise RuntimeError(f"the zygote's warm-up job failed: {meta['error']}")

    # ----- control channel --------------------------------------------------------------------

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        self.outbox.append((json.dumps(message).encode(), fds or []))
        self._flush()

    def _flush(self) -> None:
        while self.outbox:
            data, fds = self.outbox[0]
            try:
                if fds:
                    socket.send_fds(self.ctrl, [data], fds)
                else:
                    self.ctrl.send(data)
            except BlockingIOError:
                return
            for fd in fds:
                os.close(fd)
            self.outbox.pop(0)

    def _handle(self, message: dict[str, Any], fds: list[int]) -> None:
        cmd, pid = message.get("cmd"), message.get("pid")
        if cmd == "recycle" and len(fds) == 1 and os.fstat(fds[0]).st_size == self.shm_bytes:
            self.free_buffers.append((int(message["buffer"]), fds[0]))
            return
        for fd in fds:  # only a recycle message carries a descriptor
            os.close(fd)
        child = self.children.get(pid) if isinstance(pid, int) else None
        if cmd == "go" and child is not None:
            child.deadline = time.monotonic() + float(message["timeout_s"])
            child.idle_deadline = None
            if pid == self.spare_pid:
                self._make_spare()
        elif cmd == "done" and child is not None:
            child.deadline = None
            child.idle_deadline = time.monotonic() + self.settings.session_idle_s
        elif cmd == "kill" and child is not None:
            self._kill(child, "killed")
        elif cmd == "quit":
            raise SystemExit(0)

    def _kill(self, child: _Child, reason: str) -> None:
        if child.kill_reason is None:
            child.kill_reason = reason
            signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)

    def _reap(self, child: _Child) -> None:
        _, status = os.waitpid(child.pid, 0)
        os.close(child.pidfd)
        del self.children[child.pid]
        if child.pid == self.spare_pid:
            self.spare_pid = None
        self._send({"msg": "exit", "pid": child.pid, "reason": child.kill_reason or "exited",
                    "code": os.waitstatus_to_exitcode(status)})

    def serve(self) -> None:
        self._send({"msg": "hello", "pid": self.pid, "layers": self.layers})
        self.ctrl.setblocking(False)
        self._make_spare()
        try:
            while True:
                now = time.monotonic()
                for child in list(self.children.values()):
                    if child.deadline is not None and now >= child.deadline:
                        self._kill(child, "timeout")
                    elif child.idle_deadline is not None and now >= child.idle_deadline:
                        self._kill(child, "idle")
                if self.spare_pid is None:
                    self._make_spare()
                timers = [t for c in self.children.values() for t in (c.deadline, c.idle_deadline)
                          if t is not None and c.kill_reason is None]
                wait = max(0.0, min(timers) - now) if timers else None
                by_fd = {c.pidfd: c for c in self.children.values()}
                readable, writable, _ = select.select([self.ctrl.fileno(), *by_fd],
                                                      [self.ctrl.fileno()] if self.outbox else [], [], wait)
                if writable:
                    self._flush()
                for fd in readable:
                    if fd in by_fd:
                        self._reap(by_fd[fd])
                        continue
                    try:
                        data, fds, _, _ = socket.recv_fds(self.ctrl, 65536, 1)
                    except BlockingIOError:
                        continue
                    if not data:  # the parent is gone
                        raise SystemExit(0)
                    self._handle(json.loads(data), fds)
        finally:
            for child in self.children.values():
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)


def shared_buffer_bytes(max_pixels: int) -> int:
    """Size of a child's shared pixel buffer: the largest image (RGBA) either way."""
    return 4 * max_pixels


def _only_loopback() -> bool:
    with open("/proc/self/net/dev") as f:
        names = {line.split(":")[0].strip() for line in f.readlines()[2:]}
    return names == {"lo"}


def _set_cpu_budget(timeout_s: float) -> None:
    """Soft RLIMIT_CPU = CPU used so far + this request's budget (a backstop to the wall clock)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = min(hard, math.ceil(usage.ru_utime + usage.ru_stime + timeout_s) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _warmup_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.arange(48 * 40 * 3, dtype=np.uint8).reshape(48, 40, 3), "RGB")


def main(argv: list[str]) -> None:
    ctrl_fd, settings = int(argv[1]), Settings(**json.loads(argv[2]))
    zygote = Zygote(ctrl_fd, settings)
    zygote.serve()


if __name__ == "__main__":
    main(sys.argv)
