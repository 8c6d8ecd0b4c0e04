"""An LLM judge over an OpenAI-compatible chat API, asked only when the answer rules cannot decide.

``POST {base_url}/chat/completions`` with a per-task-type prompt (``ocr``, ``math``, ``general``)
that asks for a one-digit verdict, temperature 0. This is a trust boundary (a network service we do
not control), so every failure is caught here, counted, and turned into a flagged 0
(:attr:`JudgeResult.failed`), never an exception or a hang:

* each attempt is bounded by ``timeout_s`` (httpx's own timeouts and an outer ``asyncio.wait_for``,
  since a server that trickles bytes can defeat per-read timeouts);
* transient failures (timeouts, connection errors, HTTP 429 and 5xx) are retried ``max_retries``
  times with exponential backoff (``backoff_s``, doubling); other HTTP errors and malformed replies
  are not retried (at temperature 0 the same request gets the same reply);
* at most ``max_concurrency`` requests are in flight per client (an asyncio semaphore, not held
  during backoff);
* verdicts are cached by (question, answer, ground truth); identical requests in flight at once
  share one HTTP request. Failures are not cached, so a later batch may succeed.

The API key is read from the environment variable named by ``api_key_env`` (sent as a Bearer token
when set; local servers usually need none).
"""

from __future__ import annotations

import asyncio
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


class JudgeReplyError(ValueError):
    """The judge answered, but not with a verdict we can read."""


@dataclass(frozen=True)
class JudgeRequest:
    task_type: str
    question: str
    answer: str
    ground_truth: str

    @property
    def cache_key(self) -> tuple[str, str, str]:
        return (self.question, self.answer, self.ground_truth)


@dataclass(frozen=True)
class JudgeResult:
    correct: bool
    """The verdict; False when the judge failed."""
    failed: bool = False
    """The judge could not give a verdict (timeouts, HTTP errors, malformed replies)."""
    cached: bool = False
    """Answered from the cache or by an identical request already in flight."""
    error: str = ""


def build_messages(request: JudgeRequest) -> list[dict[str, str]]:
    """The chat messages for one request (the task type picks the prompt; others use ``general``)."""
    template = _PROMPTS.get(request.task_type, _PROMPTS["general"])
    user = template.format(question=request.question, truth=request.ground_truth, answer=request.answer)
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(payload: Any) -> bool:
    """The 0/1 verdict of a chat-completions reply body; raises JudgeReplyError if there is none."""
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise JudgeReplyError(f"no choices[0].message.content in the reply ({exc!r})") from exc
    if not isinstance(content, str):
        raise JudgeReplyError(f"message content is {type(content).__name__}, not text")
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
        self._cache: dict[tuple[str, str, str], bool] = {}
        self.stats: dict[str, int] = {
            "calls": 0, "requests": 0, "retries": 0, "failures": 0, "cache_hits": 0, "timeouts": 0, "malformed": 0,
        }
        # Loop-bound state, rebuilt when used from a new event loop (asyncio.run in tests and tools).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._inflight: dict[tuple[str, str, str], asyncio.Future[JudgeResult]] = {}

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
        key = request.cache_key
        if key in self._cache:
            self.stats["cache_hits"] += 1
            return JudgeResult(correct=self._cache[key], cached=True)
        client, semaphore = self._bind_loop()
        if key in self._inflight:
            self.stats["cache_hits"] += 1
            shared = await asyncio.shield(self._inflight[key])
            return JudgeResult(correct=shared.correct, failed=shared.failed, cached=True, error=shared.error)
        future: asyncio.Future[JudgeResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._ask(client, semaphore, request)
        except BaseException:  # cancelled: the requests sharing this one must not wait forever
            future.cancel()
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(result)
        return result

    async def _ask(self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore, request: JudgeRequest) -> JudgeResult:
        self.stats["calls"] += 1
        body = {"model": self.cfg.model, "messages": build_messages(request), "temperature": 0.0,
                "max_tokens": _MAX_TOKENS}
        error = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                async with semaphore:
                    verdict = await asyncio.wait_for(self._post(client, body), self.cfg.timeout_s)
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
            self._cache[request.cache_key] = verdict
            return JudgeResult(correct=verdict)
        self.stats["failures"] += 1
        log.warning("judge failed for a %s answer: %s", request.task_type, error)
        return JudgeResult(correct=False, failed=True, error=error)

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any]) -> bool:
        self.stats["requests"] += 1
        response = await client.post(self._url, json=body)
        if response.status_code == 429 or response.status_code >= 500:
            raise _Transient(f"HTTP {response.status_code}")
        response.raise_for_status()
        try:
            payload = response.json()
        except ValueError as exc:
            raise JudgeReplyError(f"reply is not JSON: {response.text[:80]!r}") from exc
        return parse_verdict(payload)
