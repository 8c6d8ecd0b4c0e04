"""The sandbox zygote: a warm, single-threaded process that forks one hardened child per request.

Started by :class:`cv_ray.sandbox.zygote_handle.ZygoteProcess` with an empty environment, never by hand::

    python -m cv_ray.sandbox.zygote <control fd> '<settings JSON>'

Life of the zygote:

1. isolate itself (``hardening.isolate_zygote``): new network, IPC, UTS and pid namespaces (as a
   normal user inside a new user namespace), then fork: the zygote that serves is pid 1 of its own
   pid namespace, and the process the pool started only waits for it;
2. warm up: import PIL / numpy / OpenCV single-threaded, load every PIL plugin and the modules the
   code may import, install the op tracer, run one job, compile the seccomp filter, hide host
   paths from module attributes, ``gc.freeze()`` so children do not touch (and copy) the
   zygote's objects;
3. self-test: fork one child, harden it, check from inside that each layer holds, report the
   layers to the parent (``hello``);
4. serve: keep one *spare* child already forked and hardened, blocked on its request pipe, and
   hand its pipe ends to the parent over the control socket (SCM_RIGHTS). The parent writes the
   request straight to the child and reads the response straight from it (and, with its own
   pidfd of the child, stops a session child between its calls); the zygote arms the wall-clock
   deadline (``go``), kills on expiry with SIGKILL, reaps, and reports exits.

A child tells the zygote it is *ready* (a byte on a pipe only the zygote reads) once it is
hardened and warmed up, before it reads any code: an exit before that is an infrastructure
failure, an exit after it is the code's doing, whatever status the code chose.

The zygote never runs model code and never reads a child's output. Control messages are small
JSON objects on a SOCK_SEQPACKET socket that only the parent holds.

Parent -> zygote: ``{"cmd": "go", "pid", "timeout_s"}``, ``{"cmd": "done", "pid"}`` (a session
child answered: clear its deadline, start its idle clock), ``{"cmd": "kill", "pid", "attribute"}``,
``{"cmd": "recycle", "buffer"}`` with the buffer's memfd (its child is
dead and the parent zeroed it: lend it to a later child), ``{"cmd": "quit"}``.
Zygote -> parent: ``{"msg": "hello", "layers"}``, ``{"msg": "spare", "pid", "host_pid", "buffer"}``
with four fds (request write end, response read end, the shared pixel buffer numbered
``buffer``, a pidfd of the child), ``{"msg": "exit", "pid", "reason", "code", "ready", "cpu_limit", "oom"}`` where reason
is ``timeout``, ``idle``, ``killed`` (by the parent's ``kill`` while it ran) or ``exited``, code is
the exit status (negative: signal), ``cpu_limit`` says it used up its CPU limit and ``oom`` that the
kernel's OOM killer killed something while it ran.
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
#: Exit status of a child whose set-up failed before it was ready (hardening, warm-up).
_SETUP_FAILED = 70
#: The kernel's "task is exiting" flag in /proc/<pid>/stat.
_PF_EXITING = 0x4
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
    kernel: bool = True
    """The kernel layers (``cv_ray.sandbox.protections``; off only in the escape suite's controls)."""
    python_guards: bool = True
    host_paths_hidden: bool = True


@dataclass
class _Child:
    pid: int
    pidfd: int
    ready_fd: int | None
    """Read end of the child's readiness pipe (None once read or closed)."""
    ready: bool = False
    deadline: float | None = None
    """Wall-clock deadline of the running request (monotonic seconds), None when not running."""
    idle_deadline: float | None = None
    """When an idle session child is killed (monotonic seconds)."""
    kill_reason: str | None = None
    oom_kills_at_start: int | None = None
    """The host's OOM-kill count when it was forked."""
    host_pid: int | None = None
    """Its pid in the host's /proc (the zygote's /proc is the host's)."""


def _warm_up_imports(python_guards: bool) -> Any:
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
    if python_guards:
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


def _oom_kills() -> int | None:
    """The host's count of OOM-killer kills (``/proc/vmstat``), or None where it is not readable."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Zygote:
    def __init__(self, ctrl_fd: int, settings: Settings, isolation: Any):
        """``isolation``: what ``hardening.isolate_zygote`` set up (None: kernel layers off)."""
        from cv_ray.sandbox import hardening

        self.settings = settings
        self.isolation = isolation
        self.ctrl = socket.socket(fileno=ctrl_fd)
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.layers: dict[str, dict[str, Any]] = dict(isolation.layers) if isolation is not None else {}
        self.children: dict[int, _Child] = {}
        self.spare_pid: int | None = None
        self.outbox: list[tuple[bytes, list[int]]] = []
        self.pid = os.getpid()
        self.shm_bytes = shared_buffer_bytes(settings.max_output_pixels)
        self.free_buffers: list[tuple[int, int]] = []
        """(id, memfd) of shared buffers the parent scrubbed and lent back, warmest last."""
        self.buffers_made = 0

        os.environ.pop("GLIBC_TUNABLES", None)  # read at start (see GLIBC_TUNABLES); not for children
        unexpected_env = sorted(set(os.environ) - set(ZYGOTE_ENV_NAMES))
        self.layers["clean_environment"] = {"ok": not unexpected_env,
                                            "detail": f"unexpected variables: {unexpected_env}" if unexpected_env
                                            else "only thread-count variables"}
        self.tracer = _warm_up_imports(settings.python_guards)
        from cv_ray.sandbox.runner import CodeRunner, hide_host_paths

        self.runner_args = (settings.max_output_pixels, settings.max_stdout_chars, settings.memory_mb)
        self.runner_options = {"tracer": self.tracer, "restricted_imports": settings.python_guards}
        self._warm_up_job(CodeRunner(*self.runner_args, **self.runner_options))
        self.seccomp_program: bytes | None = None
        if settings.kernel:
            try:
                self.seccomp_program = hardening.build_seccomp_program()
            except hardening.LayerUnavailable as exc:
                self.layers["seccomp"] = {"ok": False, "detail": str(exc)}
        if settings.host_paths_hidden:
            hide_host_paths()  # after the last import from files
        self.cpu_limit_s = (math.ceil(settings.timeout_s) + 1) * 64
        gc.collect()
        gc.freeze()
        self._self_test()

    # ----- children -------------------------------------------------------------------------

    def _limits(self):
        from cv_ray.sandbox.hardening import ChildLimits, virtual_size_bytes

        # The child maps its shared pixel buffer after fork, so it is added to the budget.
        return ChildLimits(address_space_bytes=virtual_size_bytes() + self.shm_bytes + self.settings.memory_mb * 2**20,
                           cpu_s=self.cpu_limit_s)

    def _take_buffer(self) -> tuple[int, int]:
        """(id, memfd) of a shared buffer for a new child: a scrubbed one the parent lent back, else a new one."""
        from cv_ray.sandbox.protocol import create_shared_buffer

        if self.free_buffers:
            return self.free_buffers.pop()
        self.buffers_made += 1
        return self.buffers_made, create_shared_buffer(self.shm_bytes)

    def _fork(self, body) -> tuple[int, int, int, int, int, int]:
        """Fork a hardened child running ``body(req_r, resp_w, ready_w, shm)``; returns the pid and
        the zygote's ends: (pid, req_w, resp_r, ready_r, buffer id, shm_fd)."""
        from cv_ray.sandbox import hardening
        from cv_ray.sandbox.protocol import map_shared_buffer

        limits = self._limits()
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        ready_r, ready_w = os.pipe()
        buffer_id, shm_fd = self._take_buffer()
        pid = os.fork()
        if pid == 0:
            code = _SETUP_FAILED
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _keep_only_fds({req_r, resp_w, ready_w, shm_fd}, self.devnull)
                shm = map_shared_buffer(shm_fd)
                os.close(shm_fd)
                if self.settings.kernel:
                    hardening.harden_child(limits, self.seccomp_program, self.pid, hardening.child_id(self.isolation),
                                           self.isolation is not None and self.isolation.setgroups)
                else:  # control runs only: no layer at all, but never outlive the zygote
                    hardening.die_with_parent(self.pid)
                code = body(req_r, resp_w, ready_w, memoryview(shm))
            finally:
                os._exit(code)
        for fd in (req_r, resp_w, ready_w):
            os.close(fd)
        return pid, req_w, resp_r, ready_r, buffer_id, shm_fd

    def _serve(self, req_r: int, resp_w: int, ready_w: int, shm: memoryview) -> int:
        """The child's request loop (runs after hardening, next to the model's code)."""
        from cv_ray.sandbox.protocol import ProtocolError, encode_response, read_request, write_frame
        from cv_ray.sandbox.runner import CodeRunner

        # Prefault, while this child is still a spare (off the critical path of its request): a
        # throwaway job touches (and so copies) the pages every call needs.
        CodeRunner(*self.runner_args, **self.runner_options).run(_PREFAULT_CODE, _warmup_image())
        runner = CodeRunner(*self.runner_args, **self.runner_options)
        os.write(ready_w, b"r")  # from here on, whatever ends this process is the code's doing
        os.close(ready_w)
        try:
            while True:
                request = read_request(req_r, shm)
                if request is None:
                    return 0
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
        from cv_ray.sandbox.hardening import host_pid_of

        pid, req_w, resp_r, ready_r, buffer_id, shm_fd = self._fork(self._serve)
        child = self.children[pid] = _Child(pid=pid, pidfd=os.pidfd_open(pid), ready_fd=ready_r,
                                            oom_kills_at_start=_oom_kills())
        child.host_pid = host_pid_of(child.pidfd)
        self.spare_pid = pid
        # The parent gets a pidfd of its own: it stops and resumes a session child itself, with no
        # round trip through this process on the call's path.
        self._send({"msg": "spare", "pid": pid, "host_pid": child.host_pid, "buffer": buffer_id},
                   [req_w, resp_r, shm_fd, os.dup(child.pidfd)])

    def _self_test(self) -> None:
        """Fork one hardened child that checks each layer from the inside and runs a warm-up job;
        meanwhile read its /proc status from the outside (no-new-privs, seccomp mode, uids)."""

        def probe(req_r: int, resp_w: int, _ready_w: int, _shm: memoryview) -> int:
            from cv_ray.sandbox.hardening import probe_layers
            from cv_ray.sandbox.runner import CodeRunner

            report = probe_layers(seccomp_expected=self.seccomp_program is not None)
            meta, _ = CodeRunner(*self.runner_args, **self.runner_options).run(_WARMUP_CODE, _warmup_image())
            report["runner"] = {"ok": bool(meta["ok"]), "detail": meta["error"] or "warm-up job ran"}
            os.write(resp_w, json.dumps(report).encode() + b"\n")
            os.read(req_r, 1)  # stay alive until the zygote has read our /proc status
            return 0

        from cv_ray.sandbox.hardening import host_pid_of, read_proc_status_layers

        pid, req_w, resp_r, ready_r, _, shm_fd = self._fork(probe)
        pidfd = os.pidfd_open(pid)
        os.close(shm_fd)
        os.close(ready_r)
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
            if self.isolation is not None:
                report.update(read_proc_status_layers(host_pid_of(pidfd), self.seccomp_program is not None,
                                                      self.isolation))
        except (UnicodeDecodeError, json.JSONDecodeError):
            report = {"self_test": {"ok": False, "detail": "the hardened test child sent no report "
                                                           "(a hardening step failed)"}}
        os.close(req_w)
        os.close(resp_r)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(pidfd)
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
        elif cmd == "done" and child is not None:  # (the parent has stopped the child already)
            child.deadline = None
            child.idle_deadline = time.monotonic() + self.settings.session_idle_s
        elif cmd == "kill" and child is not None:
            self._kill(child, "killed", attribute=bool(message.get("attribute")))
        elif cmd == "quit":
            raise SystemExit(0)

    def _kill(self, child: _Child, reason: str, attribute: bool = True) -> None:
        """SIGKILL a child. ``attribute``: its exit report will say it was our kill only if it was
        not ending already (the parent asks for this when the report decides the call's error;
        a released child's report decides nothing)."""
        if child.kill_reason is not None:
            return
        if attribute and _ending(child):
            return  # it is ending already: its exit status, not our kill, says what happened
        child.kill_reason = reason
        signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)

    def _read_ready(self, child: _Child) -> None:
        if child.ready_fd is None:
            return
        os.set_blocking(child.ready_fd, False)
        try:
            child.ready = os.read(child.ready_fd, 1) == b"r"
        except BlockingIOError:
            return
        os.close(child.ready_fd)
        child.ready_fd = None

    def _reap(self, child: _Child) -> None:
        self._read_ready(child)  # a child may write its byte and die before the zygote read it
        _, status, usage = os.wait4(child.pid, 0)
        os.close(child.pidfd)
        if child.ready_fd is not None:
            os.close(child.ready_fd)
        del self.children[child.pid]
        if child.pid == self.spare_pid:
            self.spare_pid = None
        code = os.waitstatus_to_exitcode(status)
        oom = False
        if code == -signal.SIGKILL and child.kill_reason is None and child.oom_kills_at_start is not None:
            now = _oom_kills()  # only a SIGKILL not ours needs an explanation
            oom = now is not None and now > child.oom_kills_at_start
        # A kill only explains a death by SIGKILL: a child that ended on its own while (or just
        # before) we killed it reports its own status.
        reason = child.kill_reason if child.kill_reason is not None and code == -signal.SIGKILL else "exited"
        self._send({"msg": "exit", "pid": child.pid, "reason": reason, "code": code, "ready": child.ready,
                    "cpu_limit": usage.ru_utime + usage.ru_stime >= self.cpu_limit_s - 0.05, "oom": oom})

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
                exits = {c.pidfd: c for c in self.children.values()}
                readiness = {c.ready_fd: c for c in self.children.values() if c.ready_fd is not None}
                readable, writable, _ = select.select([self.ctrl.fileno(), *exits, *readiness],
                                                      [self.ctrl.fileno()] if self.outbox else [], [], wait)
                if writable:
                    self._flush()
                for fd in readable:
                    if fd in readiness:
                        if readiness[fd].ready_fd == fd:  # not reaped (and closed) earlier in this round
                            self._read_ready(readiness[fd])
                        continue
                    if fd in exits:
                        if exits[fd].pid in self.children:
                            self._reap(exits[fd])
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


def _ending(child: _Child) -> bool:
    """Whether a child has exited or is exiting (PF_EXITING, or a SIGKILL already pending): a
    child whose pipe the parent saw close because it was dying was not killed by us."""
    if os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
        return True
    try:
        with open(f"/proc/{child.host_pid}/stat") as f:
            flags = int(f.read().rsplit(")", 1)[1].split()[6])
        with open(f"/proc/{child.host_pid}/status") as f:
            pending = [int(line.split()[1], 16) for line in f if line.startswith(("ShdPnd:", "SigPnd:"))]
    except FileNotFoundError:  # gone already
        return True
    return bool(flags & _PF_EXITING) or any(p & (1 << (signal.SIGKILL - 1)) for p in pending)


def shared_buffer_bytes(max_pixels: int) -> int:
    """Size of a child's shared pixel buffer: the largest image (RGBA) either way."""
    return 4 * max_pixels


def _warmup_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.arange(48 * 40 * 3, dtype=np.uint8).reshape(48, 40, 3), "RGB")


def main(argv: list[str]) -> None:
    from cv_ray.sandbox import hardening

    ctrl_fd, settings = int(argv[1]), Settings(**json.loads(argv[2]))
    isolation = None
    if settings.kernel:
        try:
            isolation = hardening.isolate_zygote()  # returns in a new process: pid 1 of a new pid namespace
        except hardening.LayerUnavailable as exc:
            isolation = hardening.without_namespaces(str(exc))
    Zygote(ctrl_fd, settings, isolation).serve()


if __name__ == "__main__":
    main(sys.argv)
