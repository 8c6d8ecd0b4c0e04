"""SandboxPool: run model-written image code safely and fast, from many threads at once.

Usage::

    from cv_ray.sandbox import SandboxPool
    from cv_ray.sandbox.config import SandboxConfig

    with SandboxPool(SandboxConfig(workers_per_executor=2, timeout_s=5.0)) as pool:
        r = pool.run(code, images=[img0, img1], image_index=0)
        # r.ok, r.image, r.error, r.error_class, r.ops, r.to_input, r.stdout, r.seconds

Each worker is a warm zygote process (see :mod:`cv_ray.sandbox.zygote`) that keeps one hardened
child ready; a call takes that child, sends it the code and the image, and reads back the result.
This process is the trusted side: it validates every byte a child sends (and kills a child whose
reply is malformed), kills every call's child as soon as the call is over, checks the result image,
and turns the child's traced ops into verified ops with ``cv_ray.sandbox.recognize.reconcile``
(within a time and work budget, after the worker is free for the next call).

``session="trajectory"`` keeps one child per ``session_id`` so variables survive between the
calls of a trajectory (other trajectories never see them); between its calls the child is stopped
(SIGSTOP: it gets no CPU); ``close_session`` ends it, and idle sessions end after ``session_idle_s``.
With the default ``session="call"`` every call gets a fresh child and ``session_id`` is ignored.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import signal
import threading
import time
from typing import Any

from PIL import Image

from cv_ray.sandbox import messages, protocol
from cv_ray.sandbox.config import SandboxConfig
from cv_ray.sandbox.protections import Protections
from cv_ray.sandbox.recognize import VerificationBudget, reconcile, unverified
from cv_ray.sandbox.zygote_handle import ChildHandle, Outcome, ZygoteError, ZygoteProcess
from cv_ray.types import ExecResult

log = logging.getLogger(__name__)

#: Error classes a child may report for itself; anything else it claims is counted as `runtime`.
_CHILD_ERROR_CLASSES = frozenset({"syntax", "runtime", "memory", "forbidden", "import", "no_result",
                                  "bad_result", "bad_image"})
_CRASH_SIGNALS = {signal.SIGSEGV: "SIGSEGV", signal.SIGBUS: "SIGBUS", signal.SIGABRT: "SIGABRT",
                  signal.SIGILL: "SIGILL", signal.SIGFPE: "SIGFPE", signal.SIGSYS: "SIGSYS"}
_MAX_ERROR_CHARS = 4000
#: Most tracer errors one call may add to the pool's count (the child's number is not trusted).
_MAX_TRACER_ERRORS = 1000


class SandboxUnavailable(RuntimeError):
    """This host lacks an isolation layer and ``allow_degraded`` is off; the message names it."""


def check_request(code: str, images: list[Image.Image], image_index: Any, max_code_chars: int,
                  max_pixels: int) -> ExecResult | None:
    """The refusal for a call that must not run (code too long, no such image, input too big), or None."""
    if len(code) > max_code_chars:
        return ExecResult(ok=False, error=messages.code_too_long_error(len(code), max_code_chars),
                          error_class="code_too_long")
    if isinstance(image_index, bool) or not isinstance(image_index, int) or not 0 <= image_index < len(images):
        return ExecResult(ok=False, error=messages.image_index_error(image_index, len(images)),
                          error_class="image_index")
    width, height = images[image_index].size
    if width * height > max_pixels:
        return ExecResult(ok=False, error_class="bad_image",
                          error=f"image {image_index} is {width}x{height}, larger than the tool's limit of "
                                f"{max_pixels} pixels; crop or resize it in an earlier call")
    return None


def classify_exit(report: dict[str, Any], timeout_s: float, memory_mb: int) -> tuple[str, str]:
    """``(error_class, text)`` for a child that ended without a response, from the zygote's exit report.

    Only what happened *after* the child was ready can be the code's doing; before that, and for
    causes outside the child (a SIGKILL that was not the OOM killer's, nor ours), the failure is
    the infrastructure's (``sandbox``, retried once on a fresh zygote). Nothing the code can do
    produces a ``sandbox`` verdict: it runs only once the child is ready, and it can neither
    send a signal nor choose the zygote's report.
    """
    reason, code = report.get("reason"), report.get("code")
    if not report.get("ready"):
        return "sandbox", messages.sandbox_error()
    if reason == "timeout" or report.get("cpu_limit") or code == -signal.SIGXCPU:
        return "timeout", messages.timeout_error(timeout_s)
    if reason == "killed":  # by the parent: the child closed its result channel and went on running
        return "runtime", "the code closed the tool's result channel before leaving a result"
    if reason == "idle":  # a session child that ended idle before this call reached it
        return "sandbox", messages.sandbox_error()
    if code == -signal.SIGKILL:  # not by us, not by its CPU limit: the OOM killer, or someone outside
        return ("memory", messages.memory_error(memory_mb)) if report.get("oom") else \
            ("sandbox", messages.sandbox_error())
    if isinstance(code, int) and -code in _CRASH_SIGNALS:
        return "runtime", (f"the code crashed the Python interpreter ({_CRASH_SIGNALS[-code]}); "
                           "it may have run out of memory or misused a low-level library")
    if isinstance(code, int):
        return "runtime", f"the code ended the process (exit status {code}) before leaving a result"
    return "sandbox", messages.sandbox_error()


def _text(value: Any, limit: int) -> str:
    """A child's string, cut to ``limit`` and made valid Unicode (a lone surrogate, which JSON
    allows and every UTF-8 encoder downstream refuses, becomes ``?``)."""
    if not isinstance(value, str):
        return ""
    return value[:limit].encode("utf-8", "replace").decode("utf-8")


@dataclasses.dataclass
class _Slot:
    """One worker: a zygote and the session children it holds. Used by one thread at a time."""

    index: int
    zygote: ZygoteProcess | None = None
    busy: bool = False
    last_used: float = 0.0
    sessions: collections.OrderedDict[str, ChildHandle] = dataclasses.field(default_factory=collections.OrderedDict)


class SandboxPool:
    def __init__(self, cfg: SandboxConfig, *, _protections: Protections | None = None):
        """Start ``cfg.workers_per_executor`` zygotes with the limits of ``cfg`` (validated here).

        Tests and tools override a few fields: ``SandboxPool(SandboxConfig(workers_per_executor=1,
        timeout_s=2.0))``. Raises SandboxUnavailable when an isolation layer is missing and
        ``cfg.allow_degraded`` is off. ``_protections``: the escape suite's control runs only
        (``cv_ray.sandbox.protections``); no configuration reaches it.
        """
        cfg.validate()
        self.cfg = cfg
        self.protections = _protections or Protections()
        self._meta_cap = protocol.meta_bytes_cap(cfg.max_stdout_chars)
        self._cond = threading.Condition()
        self._slots = [_Slot(index=i) for i in range(cfg.workers_per_executor)]
        self._session_slot: dict[str, _Slot] = {}
        self._closed = False
        self.counts: collections.Counter[str] = collections.Counter()
        """Calls by outcome (``ok`` or the error class); ``zygote_restarts``; ``tracer_errors``
        (traced library calls whose bookkeeping failed in the child: ops the trace missed);
        ``unverified_budget`` (results whose verification ran out of its budget) and
        ``verify_errors`` (verification that failed on a child's data)."""
        self.layers: dict[str, dict[str, Any]] = {}
        """The isolation layers the zygotes reported at start-up: ``{name: {"ok", "detail"}}``."""
        zygotes = [self._new_zygote() for _ in self._slots]
        try:
            for slot, zygote in zip(self._slots, zygotes):
                slot.zygote = zygote
                self._check_layers(zygote.wait_ready())
        except BaseException:
            for zygote in zygotes:
                zygote.close()
            raise

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- start-up -----------------------------------------------------------------------------

    def _new_zygote(self) -> ZygoteProcess:
        cfg = self.cfg
        settings = {"memory_mb": cfg.memory_mb, "timeout_s": cfg.timeout_s, "max_output_pixels": cfg.max_output_pixels,
                    "max_stdout_chars": cfg.max_stdout_chars, "session_idle_s": cfg.session_idle_s,
                    **self.protections.zygote_settings()}
        return ZygoteProcess(settings, inherit_environment=not self.protections.clean_environment)

    def _check_layers(self, layers: dict[str, dict[str, Any]]) -> None:
        missing = [f"{name} ({info.get('detail')})" for name, info in sorted(layers.items()) if not info.get("ok")]
        if not self.protections.all_on:
            log.warning("sandbox CONTROL RUN with protections off (%s): not for untrusted code", self.protections)
        elif missing and not self.cfg.allow_degraded:
            raise SandboxUnavailable(
                "sandbox isolation layers missing on this host: " + "; ".join(missing)
                + ". Fix the host (see docs/sandbox.md), or accept weaker isolation explicitly with "
                  "sandbox.allow_degraded=true (SandboxConfig(allow_degraded=True))")
        elif missing and not self.layers:
            log.warning("sandbox running DEGRADED (allow_degraded=true); missing: %s", "; ".join(missing))
        self.layers = layers

    # ----- scheduling ---------------------------------------------------------------------------

    def _acquire(self, session_id: str | None) -> _Slot:
        """Wait for a free worker: the session's own worker, else the least recently used free one."""
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the SandboxPool is closed")
                slot = self._session_slot.get(session_id) if session_id is not None else None
                if slot is None:
                    free = [s for s in self._slots if not s.busy]
                    if free:
                        key = (lambda s: (len(s.sessions), s.last_used)) if session_id else (lambda s: s.last_used)
                        slot = min(free, key=key)
                if slot is not None and not slot.busy:
                    slot.busy = True
                    if session_id is not None:
                        self._session_slot[session_id] = slot
                    return slot
                self._cond.wait()

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            slot.busy = False
            slot.last_used = time.monotonic()
            self._cond.notify_all()

    def _forget_session(self, slot: _Slot, session_id: str) -> None:
        """End a session: its child is killed and forgotten."""
        child = slot.sessions.pop(session_id)
        if slot.zygote is not None:
            slot.zygote.release(child)
        with self._cond:
            if self._session_slot.get(session_id) is slot:
                del self._session_slot[session_id]

    # ----- calls --------------------------------------------------------------------------------

    def run(self, code: str, images: list[Image.Image], image_index: int = 0,
            session_id: str | None = None) -> ExecResult:
        """Run ``code`` on a copy of ``images[image_index]``; thread-safe, never raises for bad code."""
        start = time.monotonic()
        result = check_request(code, images, image_index, self.cfg.max_code_chars, self.cfg.max_output_pixels)
        if result is None:
            image = protocol.wire_image(images[image_index])
            session = session_id if self.cfg.session == "trajectory" and session_id is not None else None
            slot = self._acquire(session)
            try:
                result, traced = self._run_on_slot(slot, code, image, session)
            finally:
                self._release(slot)
            if result.ok:  # after the worker is free: verification must never hold up the next call
                result = self._verify(result, image, traced)
        result.seconds = time.monotonic() - start
        self._count("ok" if result.ok else str(result.error_class))
        return result

    def _run_on_slot(self, slot: _Slot, code: str, image: Image.Image, session: str | None,
                     ) -> tuple[ExecResult, Any]:
        """The call's result (not yet verified) and the child's traced hints.

        An infrastructure failure (the zygote broke, or a child failed before it was ready) is
        retried once on a fresh zygote; a session child found ended (idle timeout) is replaced once.
        """
        for attempt in range(2):
            try:
                outcome = self._attempt(slot, code, image, session)
            except ZygoteError as exc:
                log.warning("sandbox worker %d failed (%s); restarting it", slot.index, exc)
                self._count("zygote_restarts")
                self._restart(slot)
                continue
            if outcome.exit is not None and outcome.exit.get("reason") == "idle" and attempt == 0:
                continue
            result, traced = self._classify(outcome)
            if result.error_class == "sandbox" and attempt == 0:
                log.warning("sandbox worker %d lost a child (%s); retrying on a fresh zygote", slot.index, outcome.exit)
                self._count("zygote_restarts")
                self._restart(slot)
                continue
            zygote = slot.zygote
            if zygote is not None and zygote.served >= self.cfg.recycle_after and not slot.sessions:
                self._restart(slot)
            return result, traced
        return ExecResult(ok=False, error=messages.sandbox_error(), error_class="sandbox"), None

    def _attempt(self, slot: _Slot, code: str, image: Image.Image, session: str | None) -> Outcome:
        zygote = self._ensure_zygote(slot)
        self._sweep_sessions(slot)
        child = None
        if session is not None:
            child = slot.sessions.get(session)
            if child is not None:
                slot.sessions.move_to_end(session)
            elif len(slot.sessions) >= self.cfg.max_sessions_per_worker:
                self._forget_session(slot, next(iter(slot.sessions)))  # the least recently used
        if child is None:
            child = zygote.take_child()
            if session is not None:
                slot.sessions[session] = child
        guards = self.protections.parent_guards
        try:
            outcome = zygote.execute(child, code, image, self.cfg.timeout_s, keep_alive=session is not None,
                                     max_pixels=self.cfg.max_output_pixels, max_meta_bytes=self._meta_cap,
                                     guards=guards)
        except BaseException:
            # Whatever went wrong here, the child must not outlive its call (a dead zygote takes its
            # children with it; the restart closes our ends).
            if session is not None:
                slot.sessions.pop(session, None)
            if zygote.alive():
                try:
                    zygote.release(child)
                except ZygoteError:
                    child.close()
            raise
        if session is None:
            zygote.release(child, kill=guards)  # the call is over: the child ends now, whatever it runs
        elif outcome.response is None:
            self._forget_session(slot, session)
        return outcome

    def _sweep_sessions(self, slot: _Slot) -> None:
        """Drop sessions whose child has ended (idle timeout) so their pipes are closed."""
        zygote = slot.zygote
        for session_id, child in list(slot.sessions.items()):
            if zygote is not None and zygote.exited(child):
                self._forget_session(slot, session_id)

    def _ensure_zygote(self, slot: _Slot) -> ZygoteProcess:
        if slot.zygote is None or not slot.zygote.alive():
            self._restart(slot)
        assert slot.zygote is not None
        return slot.zygote

    def _restart(self, slot: _Slot) -> None:
        """Replace a worker's zygote; its sessions end (their children die with it)."""
        if self._closed:
            raise RuntimeError("the SandboxPool is closed")
        if slot.zygote is not None:
            slot.zygote.close()  # closes our ends of every child it handed out, sessions included
        for session_id in list(slot.sessions):
            slot.sessions.pop(session_id)
            with self._cond:
                self._session_slot.pop(session_id, None)
        slot.zygote = self._new_zygote()
        self._check_layers(slot.zygote.wait_ready())

    def _classify(self, outcome: Outcome) -> tuple[ExecResult, Any]:
        """Turn what came back from the child (untrusted) into an ExecResult (ops not yet verified)
        and the child's traced hints."""
        if outcome.protocol_error is not None:
            log.warning("sandbox child broke the protocol: %s", outcome.protocol_error)
            return ExecResult(ok=False, error_class="runtime",
                              error="the code interfered with the tool's result channel"), None
        if outcome.response is None:
            error_class, error = classify_exit(outcome.exit or {}, self.cfg.timeout_s, self.cfg.memory_mb)
            return ExecResult(ok=False, error=error, error_class=error_class), None
        meta, image = outcome.response.meta, outcome.response.image
        tracer_errors = meta.get("tracer_errors")
        if isinstance(tracer_errors, int) and not isinstance(tracer_errors, bool) and tracer_errors > 0:
            # the child's count (forgeable, like all it sends): a diagnostic, not a verdict
            self._count("tracer_errors", min(tracer_errors, _MAX_TRACER_ERRORS))
        # The child caps stdout itself; allow for its "... more characters" note.
        stdout = self._readable(_text(meta.get("stdout"), self.cfg.max_stdout_chars + 100))
        if meta.get("ok") is not True or image is None:
            error_class = meta.get("error_class")
            if error_class not in _CHILD_ERROR_CLASSES:
                error_class = "runtime"
            error = self._readable(_text(meta.get("error"), _MAX_ERROR_CHARS)) or messages.no_result_error()
            return ExecResult(ok=False, error=error, error_class=error_class, stdout=stdout), None
        problem = messages.image_size_problem(image.width, image.height, self.cfg.max_output_pixels)
        if problem:
            return ExecResult(ok=False, error=problem, error_class="bad_image", stdout=stdout), None
        return ExecResult(ok=True, image=image, stdout=stdout), meta.get("traced")

    def _readable(self, text: str) -> str:
        """What the model may read of a child's text: no host paths (whatever the child printed)."""
        return messages.redact_host_paths(text) if self.protections.host_paths_hidden else text

    def _verify(self, result: ExecResult, input_image: Image.Image, traced: Any) -> ExecResult:
        """Ops checked against the pixels. The traced ops are hints the model's code could forge:
        ``reconcile`` sanitizes them and verifies them within its budget."""
        budget = VerificationBudget(seconds=self.cfg.verify_budget_s)
        try:
            result.ops, result.to_input = reconcile(input_image, result.image, traced, budget=budget)
        except Exception:  # trust boundary: the child's pixels and hints; logged and counted
            log.exception("sandbox verification failed on a child's result; its ops are reported unverified")
            self._count("verify_errors")
            result.ops, result.to_input = unverified(traced), None
        if budget.exhausted:
            self._count("unverified_budget")
        return result

    def _count(self, what: str, n: int = 1) -> None:
        with self._cond:
            self.counts[what] += n

    # ----- sessions and shutdown ----------------------------------------------------------------

    def close_session(self, session_id: str) -> None:
        """End a trajectory's session (its child and variables); unknown ids are ignored."""
        with self._cond:
            if session_id not in self._session_slot:
                return
        slot = self._acquire(session_id)
        try:
            if session_id in slot.sessions:
                self._forget_session(slot, session_id)
            else:
                with self._cond:
                    self._session_slot.pop(session_id, None)
        finally:
            self._release(slot)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return dict(self.counts)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        for slot in self._slots:
            if slot.zygote is not None:
                slot.zygote.close()
