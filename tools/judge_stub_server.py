"""A local stand-in for an LLM judge: an OpenAI-compatible ``/v1/chat/completions`` HTTP server.

Used by the reward tests and ``tools/bench_reward.py`` to exercise the real judge client over real
HTTP, and handy for trying ``reward.judge.enabled=true`` without a model server:

    .venv/bin/python tools/judge_stub_server.py --port 8000 [--mode ok|slow|error500|malformed|flaky]
    # then: reward.judge.enabled=true reward.judge.base_url=http://127.0.0.1:8000/v1

Its verdict is a rule, not a model: 1 when the prompt's "Model's answer" line contains the ground
truth line (case-insensitive), else 0; a tool-use question (the reference-compatible reward's) is
always answered ``TOOL_USE_REPLY``. Modes: ``ok``; ``slow`` (holds each request until ``release()``
or for ``delay_s``, whichever comes first; leaving the server releases it);
``error500`` (always HTTP 500); ``malformed`` (HTTP 200 with a reply that holds no verdict);
``flaky`` (HTTP 500 for the first ``fail_first`` requests, then ``ok``). The server counts requests
(``requests``), replies sent (``replies``), the most it served at once (``max_in_flight``), and keeps
the last request body and headers, so tests can check retries, cache hits and timeouts by events,
not by the clock.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

_ANSWER_LINE = re.compile(r"Model's answer: (.*)")
_TRUTH_LINE = re.compile(r"Ground truth(?: answer| text)?: (.*)")
MODES = ("ok", "slow", "error500", "malformed", "flaky")
#: The reply to a tool-use question (its prompt shows the code after "Code:"): a crop of [0, 0, 10, 10].
TOOL_USE_REPLY = '{"transforms": ["crop"], "crop_boxes": [[0, 0, 10, 10]]}'


def rule_verdict(prompt: str) -> str:
    answer = _ANSWER_LINE.search(prompt)
    truth = _TRUTH_LINE.search(prompt)
    if not answer or not truth:
        return "0"
    return "1" if truth.group(1).strip().casefold() in answer.group(1).casefold() else "0"


def completion(content: str) -> dict[str, Any]:
    return {"id": "stub", "object": "chat.completion", "model": "stub",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}


class _Handler(BaseHTTPRequestHandler):
    server: JudgeStubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real model servers do (every reply sets Content-Length)
    disable_nagle_algorithm = True  # headers and body are separate writes; no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        with self.server._lock:
            self.server.replies += 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        mode, delay_s, number = self.server.record(body, dict(self.headers))
        try:
            self._answer(mode, delay_s, number, body)
        finally:
            self.server.done()

    def _answer(self, mode: str, delay_s: float, number: int, body: dict[str, Any]) -> None:
        if not self.path.endswith("/chat/completions"):
            self._reply(404, {"error": f"no route {self.path}"})
        elif mode == "error500" or (mode == "flaky" and number <= self.server.fail_first):
            self._reply(500, {"error": "internal error"})
        elif mode == "malformed":
            self._reply(200, completion("I am not sure, it could be either."))
        else:
            if mode == "slow":
                self.server.gate.wait(delay_s)
            prompt = "\n".join(m.get("content", "") for m in body.get("messages", []))
            self._reply(200, completion(TOOL_USE_REPLY if prompt.count("Code:\n") else rule_verdict(prompt)))


class JudgeStubServer(ThreadingHTTPServer):
    """The stub judge on ``127.0.0.1`` (port 0: an ephemeral port), served from a daemon thread."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, mode: str = "ok", port: int = 0, delay_s: float = 1.0, fail_first: int = 1):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        super().__init__(("127.0.0.1", port), _Handler)
        self.mode = mode
        self.delay_s = delay_s
        self.fail_first = fail_first
        self.requests = 0
        self.replies = 0
        self.client_errors = 0
        self.gate = threading.Event()
        """Set by ``release()``: ``slow`` requests stop waiting."""
        self.in_flight = 0
        self.max_in_flight = 0
        self.last_body: dict[str, Any] = {}
        self.last_headers: dict[str, str] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="judge-stub",
                                        daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def record(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[str, float, int]:
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.last_body, self.last_headers = body, headers
            return self.mode, self.delay_s, self.requests

    def done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out closes its socket before a slow reply: expected here, so counted, not printed.
        with self._lock:
            self.client_errors += 1

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def release(self) -> None:
        """Let every held ``slow`` request reply now."""
        self.gate.set()

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.shutdown()
        self.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--delay-s", type=float, default=1.0)
    args = parser.parse_args()
    with JudgeStubServer(args.mode, args.port, args.delay_s) as server:
        print(f"stub judge ({args.mode}) at {server.base_url}; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(f"stopped after {server.requests} requests", flush=True)


if __name__ == "__main__":
    main()
