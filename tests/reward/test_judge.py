"""The LLM judge client against a real local HTTP server (tools/judge_stub_server.py)."""

from __future__ import annotations

import asyncio

import pytest

from cv_ray.reward.config import JudgeConfig
from cv_ray.reward.judge import JudgeClient, JudgeReplyError, JudgeRequest, build_messages, parse_verdict
from cv_ray.reward.outcome import SampleOutcome
from cv_ray.reward.verdicts import VerdictResolver

RIGHT = JudgeRequest("ocr", "What does the sign say?", "The sign says STOP", "stop")
WRONG = JudgeRequest("ocr", "What does the sign say?", "GO", "stop")


def _client(server, **overrides) -> JudgeClient:
    fields = {"enabled": True, "base_url": server.base_url, "model": "stub-judge", "timeout_s": 2.0,
              "max_retries": 2, "backoff_s": 0.01, "max_concurrency": 4}
    return JudgeClient(JudgeConfig(**{**fields, **overrides}))


async def _judge(client: JudgeClient, *requests: JudgeRequest):
    try:
        return await client.judge_many(requests)
    finally:
        await client.aclose()


@pytest.mark.parametrize("content, verdict", [("1", True), (" 0\n", False), ("Verdict: 1", True), ("**1**", True),
                                              ("<think>hmm, 0 or 1</think>1", True)])
def test_parse_verdict(content, verdict):
    assert parse_verdict({"choices": [{"message": {"content": content}}]}) is verdict


@pytest.mark.parametrize("payload", [{}, {"choices": []}, {"choices": [{"message": {"content": None}}]},
                                     {"choices": [{"message": {"content": "yes"}}]},
                                     {"choices": [{"message": {"content": "1 or 0"}}]}, ["1"]])
def test_parse_verdict_rejects_malformed(payload):
    with pytest.raises(JudgeReplyError):
        parse_verdict(payload)


def test_prompts_per_task_type():
    for task_type, phrase in [("ocr", "read text"), ("math", "mathematically equivalent"), ("general", "means the same")]:
        messages = build_messages(JudgeRequest(task_type, "q?", "a", "t"))
        assert phrase in messages[1]["content"] and "Model's answer: a" in messages[1]["content"]
    assert build_messages(JudgeRequest("count", "q", "a", "t")) == build_messages(JudgeRequest("general", "q", "a", "t"))


def test_success_request_shape_and_api_key(judge_server, monkeypatch):
    monkeypatch.setenv("CV_RAY_JUDGE_API_KEY", "secret-key")
    server = judge_server("ok")
    client = _client(server)
    right, wrong = asyncio.run(_judge(client, RIGHT, WRONG))
    assert (right.correct, right.failed, wrong.correct, wrong.failed) == (True, False, False, False)
    assert server.requests == 2
    assert server.last_body["temperature"] == 0 and server.last_body["model"] == "stub-judge"
    assert server.last_headers["Authorization"] == "Bearer secret-key"
    assert client.stats["calls"] == 2 and client.stats["failures"] == 0


def test_cache_hits_avoid_requests(judge_server):
    server = judge_server("ok")
    client = _client(server)
    asyncio.run(_judge(client, RIGHT))
    assert server.requests == 1
    # a later batch (a new event loop): answered from the cache
    (again,) = asyncio.run(_judge(client, RIGHT))
    assert again.correct and again.cached
    assert server.requests == 1
    # identical requests in flight together share one HTTP request
    results = asyncio.run(_judge(client, WRONG, WRONG, WRONG))
    assert [r.correct for r in results] == [False] * 3
    assert server.requests == 2
    assert client.stats["cache_hits"] == 3  # one from the cache, two shared in flight


def test_slow_reply_times_out_and_is_retried(judge_server):
    """The server holds every request until the test ends; the client gives up on its own timeouts.
    Mutant: no timeout on an attempt (the client would wait for the held reply)."""
    server = judge_server("slow", delay_s=600.0)
    client = _client(server, timeout_s=0.2, max_retries=1)
    (result,) = asyncio.run(_judge(client, RIGHT))
    assert result.failed and result.correct is False and "no reply within" in result.error
    assert server.requests == 2  # the first try and one retry
    assert server.replies == 0   # it returned before the server answered anything: bounded by its timeouts
    assert client.stats["timeouts"] == 2 and client.stats["failures"] == 1


def test_http_500_is_retried_with_backoff(judge_server):
    """Mutant: a constant backoff (the recorded waits would be [0.05, 0.05])."""
    server = judge_server("error500")
    client = _client(server, max_retries=2, backoff_s=0.05)
    waits: list[float] = []

    async def record(delay: float) -> None:  # the backoff schedule, without waiting for it
        waits.append(delay)

    client._sleep = record
    (result,) = asyncio.run(_judge(client, RIGHT))
    assert result.failed and result.error == "HTTP 500"
    assert server.requests == 3 and client.stats["retries"] == 2
    assert waits == [0.05, 0.1]  # backoff 0.05 s, then doubled


def test_a_transient_error_then_success(judge_server):
    server = judge_server("flaky", fail_first=1)
    client = _client(server)
    (result,) = asyncio.run(_judge(client, RIGHT))
    assert result.correct and not result.failed
    assert server.requests == 2 and client.stats["retries"] == 1


def test_malformed_reply_is_a_flagged_failure_without_retry(judge_server):
    server = judge_server("malformed")
    client = _client(server)
    (result,) = asyncio.run(_judge(client, RIGHT))
    assert result.failed and "not a 0/1 verdict" in result.error
    assert server.requests == 1 and client.stats["malformed"] == 1


def test_failures_are_not_cached(judge_server):
    server = judge_server("error500")
    client = _client(server, max_retries=0)
    assert asyncio.run(_judge(client, RIGHT))[0].failed
    server.mode = "ok"
    (result,) = asyncio.run(_judge(client, RIGHT))
    assert result.correct and not result.failed and not result.cached
    assert server.requests == 2


def test_unreachable_server_fails_cleanly(judge_server):
    server = judge_server("ok")
    url = server.base_url
    server.__exit__(None, None, None)  # nothing listens there now
    client = JudgeClient(JudgeConfig(enabled=True, base_url=url, timeout_s=1.0, max_retries=1, backoff_s=0.01))
    (result,) = asyncio.run(_judge(client, RIGHT))
    assert result.failed and "request error" in result.error


def test_concurrency_limit(judge_server):
    """Mutant: no semaphore (all 6 requests in flight at once)."""
    server = judge_server("ok")
    client = _client(server, max_concurrency=2)
    active, most = 0, 0
    post = client._post

    async def counted_post(*args):
        # All six tasks start in the same event-loop pass, before any reply can arrive, so every request
        # the limit lets through is in flight here at once: exactly the limit.
        nonlocal active, most
        active += 1
        most = max(most, active)
        try:
            return await post(*args)
        finally:
            active -= 1

    client._post = counted_post
    requests = [JudgeRequest("general", f"q{i}", "a", "a") for i in range(6)]
    results = asyncio.run(_judge(client, *requests))
    assert all(r.correct for r in results)
    assert server.requests == 6 and most == 2 and server.max_in_flight <= 2


def test_resolver_asks_the_judge_only_when_rules_fail(judge_server):
    from reward_testlib import task, text

    server = judge_server("ok")
    client = _client(server)
    resolver = VerdictResolver(client, math_timeout_s=1)
    t = task(answer="stop", task_type="ocr", question="What does the sign say?")
    outcomes = [SampleOutcome(text("STOP")),                     # rule: text match
                SampleOutcome(text("the sign says stop")),       # rules undecided -> judge says 1
                SampleOutcome(text("go")),                       # rules undecided -> judge says 0
                SampleOutcome("no answer tags"),                 # rule: no answer, wrong
                SampleOutcome(text("whatever"), correct=True)]   # already decided
    resolved = asyncio.run(resolver.resolve(t, outcomes))
    assert [o.correct for o in resolved] == [True, True, False, False, True]
    assert server.requests == 2
    assert resolver.stats == {"rule/text": 1, "rule/no_answer": 1, "judge/decided": 2}
