"""An LLM judge over an OpenAI-compatible chat API, asked only when the answer rules cannot decide.

``POST {base_url}/chat/completions`` with a per-task-type prompt (``ocr``, ``math``, ``general``)
that asks for a one-digit verdict, temperature 0 (:class:`JudgeRequest`). The reference-compatible
reward also asks it which ops a piece of code uses (:class:`ToolUseRequest`), exactly when the
reference asks its tool-use LLM. This is a trust boundary (a network service we do
not control), so every failure is caught here, counted, and turned into a flagged 0
(:attr:`JudgeResult.failed`), never an exception or a hang:

* each attempt is bounded by ``timeout_s`` (httpx's own timeouts and an outer ``asyncio.wait_for``,
  since a server that trickles bytes can defeat per-read timeouts);
* transient failures (timeouts, connection errors, HTTP 429 and 5xx) are retried ``max_retries``
  times with exponential backoff (``backoff_s``, doubling); other HTTP errors and malformed replies
  are not retried (at temperature 0 the same request gets the same reply);
* at most ``max_concurrency`` requests are in flight per client (an asyncio semaphore, not held
  during backoff);
* replies are cached (verdicts by question, answer and ground truth; tool use by code and
  description); identical requests in flight at once share one HTTP request. Failures are not
  cached, so a later batch may succeed.

The API key is read from the environment variable named by ``api_key_env`` (sent as a Bearer token
when set; local servers usually need none).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from cv_ray.reward.config import JudgeConfig

log = logging.getLogger(__name__)

_SYSTEM = "You are a strict grader. You compare a model's answer with the ground truth and reply with one digit."
_PROMPTS = {
    "ocr": (
        "The task is to read text in an image.\nQuestion: {question}\nGround truth text: {truth}\n"
        "Model's answer: {answer}\n"
        "Reply 1 if the model's answer contains the same text as the ground truth (ignore case, spacing and "
        "surrounding punctuation; any other character difference is wrong), otherwise reply 0. Reply with 1 or 0 only."
    ),
    "math": (
        "Question: {question}\nGround truth answer: {truth}\nModel's answer: {answer}\n"
        "Reply 1 if the model's final answer is mathematically equivalent to the ground truth (same value, "
        "any equivalent form or notation), otherwise reply 0. Reply with 1 or 0 only."
    ),
    "general": (
        "Question: {question}\nGround truth answer: {truth}\nModel's answer: {answer}\n"
        "Reply 1 if the model's answer means the same as the ground truth, otherwise reply 0. "
        "Reply with 1 or 0 only."
    ),
}
_VERDICT = re.compile(r"\s*(?:verdict\s*[:=]\s*)?\**([01])\**\s*\.?\s*", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
#: Enough for "1"/"0" plus a stray token; reasoning judges need their own prompt and budget.
_MAX_TOKENS = 8
#: A JSON object naming a few ops and boxes (the reference allows its tool-use LLM 200 tokens).
_TOOL_USE_MAX_TOKENS = 200
_TOOL_USE_SYSTEM = (
    "You read Python code that edits a PIL image and say which image operations it applies. Known names: "
    "crop, rotate_90, rotate_180, rotate_270 (counter-clockwise degrees; only turns close to a quarter turn), "
    "flip_horizontal, flip_vertical; for any other operation give a short specific name such as contrast_up, "
    "brightness_down or resize. For every rectangular crop (zoom in) give its box as [x_min, y_min, x_max, y_max]. "
    'Reply with one compact JSON object and nothing else: {"transforms": [...], "crop_boxes": [[...], ...]}'
)


class JudgeReplyError(ValueError):
    """The judge answered, but not with a verdict we can read."""


@dataclass(frozen=True)
class JudgeRequest:
    """Is ``answer`` right? A 0/1 verdict."""

    task_type: str
    question: str
    answer: str
    ground_truth: str

    max_tokens = _MAX_TOKENS

    @property
    def cache_key(self) -> tuple[str, ...]:
        return ("verdict", self.question, self.answer, self.ground_truth)

    def messages(self) -> list[dict[str, str]]:
        return build_messages(self)

    def parse(self, payload: Any) -> bool:
        return parse_verdict(payload)

    def describe(self) -> str:
        return f"a {self.task_type} answer"


@dataclass(frozen=True)
class ToolUseRequest:
    """Which image ops does this code use? Asked only by the reference-compatible reward, exactly
    when the reference asks its LLM: the code's text names no op its heuristics know. The reply is
    returned as text; ``reference_tools.merge_judge_reading`` reads it the reference's way."""

    code: str
    description: str

    max_tokens = _TOOL_USE_MAX_TOKENS

    @property
    def cache_key(self) -> tuple[str, ...]:
        return ("tool_use", self.code, self.description)

    def messages(self) -> list[dict[str, str]]:
        user = f"Code:\n{self.code}\n\n" + (f"Description:\n{self.description}" if self.description else "")
        return [{"role": "system", "content": _TOOL_USE_SYSTEM}, {"role": "user", "content": user}]

    def parse(self, payload: Any) -> str:
        return reply_content(payload)

    def describe(self) -> str:
        return "a tool call's ops"


@dataclass(frozen=True)
class JudgeResult:
    correct: bool
    """The verdict; False when the judge failed."""
    failed: bool = False
    """The judge could not give a verdict (timeouts, HTTP errors, malformed replies)."""
    cached: bool = False
    """Answered from the cache or by an identical request already in flight."""
    error: str = ""
    value: Any = None
    """The parsed reply: the verdict, or a tool-use question's reply text (None when failed)."""


def _result(value: Any, cached: bool = False) -> JudgeResult:
    return JudgeResult(correct=value is True, cached=cached, value=value)


def build_messages(request: JudgeRequest) -> list[dict[str, str]]:
    """The chat messages for one request (the task type picks the prompt; others use ``general``)."""
    template = _PROMPTS.get(request.task_type, _PROMPTS["general"])
    user = template.format(question=request.question, truth=request.ground_truth, answer=request.answer)
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def reply_content(payload: Any) -> str:
    """The text of a chat-completions reply body; raises JudgeReplyError if there is none."""
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise JudgeReplyError(f"no choices[0].message.content in the reply ({exc!r})") from exc
    if not isinstance(content, str):
        raise JudgeReplyError(f"message content is {type(content).__name__}, not text")
    return content


def parse_verdict(payload: Any) -> bool:
    """The 0/1 verdict of a chat-completions reply body; raises JudgeReplyError if there is none."""
    content = reply_content(payload)
    match = _VERDICT.fullmatch(_THINK_BLOCK.sub("", content))
    if not match:
        raise JudgeReplyError(f"reply is not a 0/1 verdict: {content[:80]!r}")
    return match.group(1) == "1"


class _Transient(Exception):
    """A failure worth retrying."""


class JudgeClient:
    """Asynchronous judge client with a cache and counters (``stats``). Usable from any event loop."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        api_key = os.environ.get(cfg.api_key_env, "")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._cache: dict[tuple[str, ...], Any] = {}
        self.stats: dict[str, int] = {
            "calls": 0, "requests": 0, "retries": 0, "failures": 0, "cache_hits": 0, "timeouts": 0, "malformed": 0,
        }
        # Loop-bound state, rebuilt when used from a new event loop (asyncio.run in tests and tools).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._inflight: dict[tuple[str, ...], asyncio.Future[JudgeResult]] = {}
        self._sleep = asyncio.sleep
        """Waits out the retry backoff (a seam: tests record the delays instead of timing them)."""

    def _bind_loop(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client is None or self._semaphore is None:
            self._loop = loop
            timeout = httpx.Timeout(self.cfg.timeout_s)
            limits = httpx.Limits(max_connections=self.cfg.max_concurrency)
            self._client = httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers)
            self._semaphore = asyncio.Semaphore(self.cfg.max_concurrency)
            self._inflight = {}
        return self._client, self._semaphore

    async def aclose(self) -> None:
        """Close the HTTP connections of the current loop (the cache and counters stay)."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None

    async def judge_many(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """Verdicts for many requests, concurrently, in order."""
        return list(await asyncio.gather(*(self.judge(r) for r in requests)))

    async def judge(self, request: JudgeRequest) -> JudgeResult:
        """One verdict: from the cache, from an identical request in flight, or from the server."""
        return await self._fetch(request)

    async def read_tool_use(self, code: str, description: str) -> str | None:
        """The judge's reply text to "which ops does this code use?", or None when it failed."""
        return (await self._fetch(ToolUseRequest(code, description))).value

    async def _fetch(self, request: JudgeRequest | ToolUseRequest) -> JudgeResult:
        key = request.cache_key
        if key in self._cache:
            self.stats["cache_hits"] += 1
            return _result(self._cache[key], cached=True)
        client, semaphore = self._bind_loop()
        if key in self._inflight:
            self.stats["cache_hits"] += 1
            shared = await asyncio.shield(self._inflight[key])
            return dataclasses.replace(shared, cached=True)
        future: asyncio.Future[JudgeResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            reply = await self._ask(client, semaphore, request)
        except BaseException:  # cancelled: the requests sharing this one must not wait forever
            future.cancel()
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(reply)
        return reply

    async def _ask(self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore,
                   request: JudgeRequest | ToolUseRequest) -> JudgeResult:
        self.stats["calls"] += 1
        body = {"model": self.cfg.model, "messages": request.messages(), "temperature": 0.0,
                "max_tokens": request.max_tokens}
        error = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await self._sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                async with semaphore:
                    value = await asyncio.wait_for(self._post(client, body, request), self.cfg.timeout_s)
            except _Transient as exc:
                error = str(exc)
                continue
            except (asyncio.TimeoutError, httpx.TimeoutException):
                self.stats["timeouts"] += 1
                error = f"no reply within {self.cfg.timeout_s} s"
                continue
            except httpx.RequestError as exc:
                error = f"request error: {exc!r}"
                continue
            except JudgeReplyError as exc:
                self.stats["malformed"] += 1
                error = str(exc)
                break
            except httpx.HTTPStatusError as exc:
                error = f"HTTP {exc.response.status_code}"
                break
            self._cache[request.cache_key] = value
            return _result(value)
        self.stats["failures"] += 1
        log.warning("judge failed for %s: %s", request.describe(), error)
        return JudgeResult(correct=False, failed=True, error=error)

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any], request: JudgeRequest | ToolUseRequest
                    ) -> Any:
        self.stats["requests"] += 1
        response = await client.post(self._url, json=body)
        if response.status_code == 429 or response.status_code >= 500:
            raise _Transient(f"HTTP {response.status_code}")
        response.raise_for_status()
        try:
            payload = response.json()
        except ValueError as exc:
            raise JudgeReplyError(f"reply is not JSON: {response.text[:80]!r}") from exc
        return request.parse(payload)
