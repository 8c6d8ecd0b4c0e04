"""The parent's handle on one zygote process: start it, take hardened children, run requests on them.

A ``ZygoteProcess`` is used by one thread at a time (the pool's slot lock guarantees it). It holds
the control socket to its zygote and, for every child it was handed, the child's request-write and
response-read pipe ends, so request and response bytes go straight between this process and the
child. See :mod:`cv_ray.sandbox.zygote` for the control messages.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cv_ray.sandbox import protocol
from cv_ray.sandbox.zygote import GLIBC_TUNABLES, ZYGOTE_ENV_NAMES

log = logging.getLogger(__name__)

#: Extra seconds the parent waits past a call's deadline before it declares the zygote broken.
DEADLINE_GRACE_S = 2.0
_START_TIMEOUT_S = 120.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class ZygoteError(RuntimeError):
    """The zygote died or stopped answering (an infrastructure failure, never the model's)."""


#: A buffer holding more bytes of data than this once its child is gone is dropped (its pages
#: freed) instead of scrubbed and lent again; a 2048 x 2048 RGBA image each way fits.
RECYCLE_MAX_DIRTY_BYTES = 32 << 20


class SharedBuffer:
    """The parent's side of one shared pixel buffer: its memfd and one mapping, kept while the
    zygote lends the buffer to child after child (each loan starts from zeros, see :meth:`scrub`)."""

    def __init__(self, buffer_id: int, fd: int):
        self.id, self.fd = buffer_id, fd
        self._map = protocol.map_shared_buffer(fd)
        self.view = memoryview(self._map)

    def scrub(self) -> bool:
        """Zero every page holding data (call only once no child maps it); False: too big to keep."""
        return protocol.scrub_shared_buffer(self.fd, self.view, RECYCLE_MAX_DIRTY_BYTES)

    def close(self) -> None:
        self.view.release()
        self._map.close()
        os.close(self.fd)


class ChildHandle:
    """The parent's ends of one child: its request and response pipes and the buffer it was lent."""

    def __init__(self, pid: int, host_pid: int, req_w: int, resp_r: int, pidfd: int, buffer: SharedBuffer):
        self.pid, self.host_pid, self.req_w, self.resp_r, self.buffer = pid, host_pid, req_w, resp_r, buffer
        """``pid``: in the zygote's pid namespace (what the zygote's messages use); ``host_pid``: the
        same process in this process's namespace (diagnostics and tests)."""
        self.pidfd = pidfd
        """Signals this very process (never another that reused its pid)."""
        self.stopped = False
        """A session child stopped (SIGSTOP) between two of its calls."""
        self.closed = False

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child; a child already gone is no error (its call reports how it ended)."""
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    @property
    def shm(self) -> memoryview:
        return self.buffer.view

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for fd in (self.req_w, self.resp_r, self.pidfd):
                os.close(fd)


@dataclass
class Outcome:
    """What happened to one request: a response, or how the child ended without one."""

    response: protocol.Response | None = None
    exit: dict[str, Any] | None = None
    """The zygote's exit report when there is no response: ``reason`` (``timeout``, ``idle``,
    ``killed`` -- by us, because the child closed its result channel and went on running --, or
    ``exited``), ``code`` (the exit status, negative: the signal), ``ready`` (whether the child
    had finished its set-up: only then can the code have caused the exit), ``cpu_limit``, ``oom``."""
    protocol_error: str | None = None
    """Set when the child wrote a malformed frame (it has been killed)."""


def zygote_env() -> dict[str, str]:
    """The whole environment a zygote starts with: thread counts and where to import cv_ray from.

    Nothing of the caller's environment (API keys, cloud or wandb credentials) is passed on.
    """
    env = {name: "1" for name in ZYGOTE_ENV_NAMES if name.endswith("_THREADS")}
    env["PYTHONPATH"] = _PACKAGE_ROOT
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUTF8"] = "1"
    env["PYTHONCOERCECLOCALE"] = "0"  # else CPython sets LC_CTYPE in its own environment
    env["GLIBC_TUNABLES"] = GLIBC_TUNABLES  # the zygote removes it once glibc has read it
    return env


class ZygoteProcess:
    def __init__(self, settings: dict[str, Any], inherit_environment: bool = False):
        """Launch a zygote (returns at once; :meth:`wait_ready` waits for its start-up report).

        ``inherit_environment``: start it with this process's environment (the escape suite's
        control runs only; see ``cv_ray.sandbox.protections``).
        """
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, **zygote_env()} if inherit_environment else zygote_env()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cv_ray.sandbox.zygote", str(theirs.fileno()), json.dumps(settings)],
            env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, cwd="/", start_new_session=True,
        )
        theirs.close()
        self.layers: dict[str, dict[str, Any]] | None = None
        self._spares: list[ChildHandle] = []
        self._tracked: dict[int, ChildHandle] = {}
        """Children handed out and not yet released: their exit reports are kept."""
        self._exits: dict[int, dict[str, Any]] = {}
        self._buffers: dict[int, SharedBuffer] = {}
        """Every shared buffer this zygote lent out, by its id: mapped once, scrubbed between loans."""
        self._awaiting_exit: dict[int, ChildHandle] = {}
        """Released children whose exit is not reported yet (they may still map their buffer)."""
        self.served = 0

    # ----- control channel --------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.send(json.dumps(message).encode())
        except OSError as exc:
            raise ZygoteError(f"the sandbox zygote is gone ({exc})") from None

    def _receive(self, timeout: float | None) -> bool:
        """Handle one control message; False when none came within ``timeout`` (0: poll)."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return False
        data, fds, _, _ = socket.recv_fds(self.sock, 65536, 4, socket.MSG_CMSG_CLOEXEC)
        if not data:
            raise ZygoteError(f"the sandbox zygote exited (status {self.proc.poll()})")
        message = json.loads(data)
        kind = message["msg"]
        if kind == "spare":
            req_w, resp_r, shm_fd, pidfd = fds
            buffer = self._buffers.get(message["buffer"])
            if buffer is None:
                buffer = self._buffers[message["buffer"]] = SharedBuffer(message["buffer"], shm_fd)
            else:  # a buffer we lent before: its mapping is kept
                os.close(shm_fd)
            self._spares.append(ChildHandle(message["pid"], message["host_pid"], req_w, resp_r, pidfd, buffer))
        elif kind == "exit":
            pid = message["pid"]
            if pid in self._tracked:
                self._exits[pid] = message
            elif pid in self._awaiting_exit:
                self._recycle(self._awaiting_exit.pop(pid).buffer)
            for spare in [s for s in self._spares if s.pid == pid]:  # a spare that died unused
                self._spares.remove(spare)
                spare.close()
                self._recycle(spare.buffer)
        elif kind == "hello":
            self.layers = message["layers"]
        return True

    def _receive_until(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._receive(remaining):
                if self.proc.poll() is not None:
                    raise ZygoteError(f"the sandbox zygote exited with status {self.proc.returncode} "
                                      f"while waiting for {what}")
                raise ZygoteError(f"the sandbox zygote sent no {what} within {timeout:g} s")

    def drain(self) -> None:
        """Handle every control message already waiting (spares, exit reports)."""
        while self._receive(0):
            pass

    # ----- lifecycle ----------------------------------------------------------------------------

    def wait_ready(self, timeout: float = _START_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        """Block until the zygote reports its isolation layers; returns them."""
        self._receive_until(lambda: self.layers is not None, timeout, "start-up report")
        assert self.layers is not None
        return self.layers

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Stop the zygote and every child it holds (idempotent)."""
        if self.proc.poll() is None:
            try:
                self.sock.send(b'{"cmd": "quit"}')
            except OSError as exc:  # the zygote is exiting already; the wait/kill below covers it
                log.debug("zygote %d did not take the quit command: %s", self.proc.pid, exc)
            try:
                self.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        for child in [*self._spares, *self._tracked.values()]:
            child.close()
        self._spares.clear()
        self._tracked.clear()
        for buffer in self._buffers.values():
            buffer.close()
        self._buffers.clear()
        self._awaiting_exit.clear()

    # ----- children -----------------------------------------------------------------------------

    def take_child(self, timeout: float = 30.0) -> ChildHandle:
        """A hardened child blocked on its request pipe (the zygote forks the next spare on ``go``)."""
        self.drain()
        self._receive_until(lambda: bool(self._spares), timeout, "spare child")
        child = self._spares.pop(0)
        self._tracked[child.pid] = child
        return child

    def exited(self, child: ChildHandle) -> bool:
        """Whether a tracked (session) child has ended since it was handed out."""
        self.drain()
        return child.pid in self._exits

    def release(self, child: ChildHandle, kill: bool = True) -> None:
        """Forget a child and end it: it is killed now, whatever it is doing (a call is over the
        moment its reply is read); our pipe ends close, and its buffer goes back to the zygote,
        scrubbed, once the child is reported dead. ``kill=False`` (the escape suite's control runs
        only) leaves a child that goes on running to its deadline."""
        exited = child.pid in self._exits
        if kill and not exited:
            self._send({"cmd": "kill", "pid": child.pid})
        self._tracked.pop(child.pid, None)
        self._exits.pop(child.pid, None)
        child.close()
        if exited:
            self._recycle(child.buffer)
        else:
            self._awaiting_exit[child.pid] = child

    def _recycle(self, buffer: SharedBuffer) -> None:
        """Scrub a buffer no live child maps and lend it back to the zygote (it keeps our mapping),
        or drop it when it holds too much data to keep warm."""
        if not buffer.scrub():
            del self._buffers[buffer.id]
            buffer.close()
            return
        message = json.dumps({"cmd": "recycle", "buffer": buffer.id}).encode()
        try:
            socket.send_fds(self.sock, [message], [buffer.fd])
        except OSError as exc:  # the zygote is exiting: the next take_child reports it; nothing to lend to
            log.debug("zygote %d did not take back buffer %d: %s", self.proc.pid, buffer.id, exc)

    def execute(self, child: ChildHandle, code: str, image, timeout_s: float, keep_alive: bool,
                max_pixels: int, max_meta_bytes: int, guards: bool = True) -> Outcome:
        """Run ``code`` on ``image`` in ``child`` under a wall-clock deadline the zygote enforces.

        A reply is parsed under limits; a malformed one gets the child killed. No reply (the child
        closed its end): the child is killed if it still runs, and the zygote's exit report says
        how it ended. A session child (``keep_alive``) that replied is frozen until its next call.
        ``guards=False`` (the escape suite's control runs only) neither kills nor freezes.
        """
        frame = protocol.encode_request(code, image, keep_alive, child.shm)
        self._send({"cmd": "go", "pid": child.pid, "timeout_s": timeout_s})
        if child.stopped:
            child.signal(signal.SIGCONT)
            child.stopped = False
        self.served += 1
        try:
            protocol.write_frame(child.req_w, frame)
            response = protocol.read_response(child.resp_r, time.monotonic() + timeout_s + DEADLINE_GRACE_S,
                                              max_pixels, child.shm, max_meta_bytes)
        except BrokenPipeError:
            response = None
        except TimeoutError:
            raise ZygoteError("the sandbox zygote did not stop a child at its deadline") from None
        except protocol.ProtocolError as exc:
            self._send({"cmd": "kill", "pid": child.pid})
            return Outcome(protocol_error=str(exc))
        if response is not None:
            if keep_alive:
                if guards:
                    # Between its calls a session child gets no CPU at all: whatever the code left
                    # running after its reply (a forged reply, then a loop) waits for the next
                    # call, whose deadline bounds it again.
                    child.signal(signal.SIGSTOP)
                    child.stopped = True
                self._send({"cmd": "done", "pid": child.pid})
            return Outcome(response=response)
        if guards:  # the call is over without a reply: whatever still runs in the child ends now
            self._send({"cmd": "kill", "pid": child.pid, "attribute": True})
        self._receive_until(lambda: child.pid in self._exits, DEADLINE_GRACE_S, "exit report")
        return Outcome(exit=self._exits[child.pid])
