"""Deciding each sample's answer verdict before the (pure) dense reward runs.

Order per sample: the cheap rules (:func:`rule_verdict`); for an undecided ``math`` answer,
math-verify in a helper process; for an answer still undecided, the LLM judge when enabled;
otherwise wrong. Judge calls of all samples (and of all groups scored at once) run concurrently.

math-verify runs in a one-process pool because its timeouts are SIGALRM-based and only work on a
process's main thread, which a Ray async actor's event loop is not; a model-written
``9^{9^{9^9}}`` would otherwise hang the worker. The pool is rebuilt if its process dies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from cv_ray.reward.answer import extract_answer, math_equivalent, rule_verdict
from cv_ray.reward.judge import JudgeClient, JudgeRequest
from cv_ray.reward.outcome import SampleOutcome
from cv_ray.types import Task

log = logging.getLogger(__name__)


class VerdictResolver:
    """Fills in ``SampleOutcome.correct`` (and ``judge_failed``) for samples that lack it."""

    def __init__(self, judge: JudgeClient | None, math_timeout_s: int):
        self.judge = judge
        self.math_timeout_s = math_timeout_s
        self._math_pool: ProcessPoolExecutor | None = None
        self.stats: Counter[str] = Counter()
        """Verdicts by deciding rule (``rule/<name>``), and math-verify failures."""

    async def resolve(self, task: Task, outcomes: Sequence[SampleOutcome]) -> list[SampleOutcome]:
        """Copies of ``outcomes`` with every ``correct`` decided."""
        return list(await asyncio.gather(*(self._resolve_one(task, o) for o in outcomes)))

    async def _resolve_one(self, task: Task, outcome: SampleOutcome) -> SampleOutcome:
        if outcome.correct is not None:
            return outcome
        answer = extract_answer(outcome.response_text)
        verdict = rule_verdict(answer, task.answer, task.task_type, task.choices)
        if verdict.correct is not None:
            self.stats[f"rule/{verdict.rule}"] += 1
            return dataclasses.replace(outcome, correct=verdict.correct)
        assert answer is not None  # a missing answer is decided (wrong) by the rules
        if task.task_type == "math":
            same = await self._math_equivalent(answer, task.answer)
            if same is not None:
                self.stats["rule/math_verify" if same else "rule/mismatch"] += 1
                return dataclasses.replace(outcome, correct=same)
        if self.judge is None:
            self.stats["rule/undecided"] += 1
            return dataclasses.replace(outcome, correct=False)
        result = await self.judge.judge(JudgeRequest(task.task_type, task.question, answer, task.answer))
        self.stats["judge/failed" if result.failed else "judge/decided"] += 1
        return dataclasses.replace(outcome, correct=result.correct, judge_failed=result.failed)

    async def _math_equivalent(self, answer: str, truth: str) -> bool | None:
        if self._math_pool is None:
            # spawn, not fork: forking a multi-threaded Ray worker can deadlock the child.
            self._math_pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        loop = asyncio.get_running_loop()
        # math-verify bounds parsing and comparing separately; the outer bound also covers start-up.
        deadline = 2 * self.math_timeout_s + 30
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._math_pool, math_equivalent, answer, truth, self.math_timeout_s), deadline)
        except (BrokenProcessPool, asyncio.TimeoutError) as exc:
            self.stats["math_verify/failed"] += 1
            log.warning("math-verify failed on a %d-character answer (%r); rebuilding its process", len(answer), exc)
            self.close()
            return None

    def close(self) -> None:
        if self._math_pool is not None:
            self._math_pool.shutdown(wait=False, cancel_futures=True)
            self._math_pool = None
