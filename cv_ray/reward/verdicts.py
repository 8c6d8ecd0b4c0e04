"""Deciding each sample's answer verdict before the (pure) dense reward runs.

Fixed reward, per sample: the cheap rules (:func:`rule_verdict`); for an undecided ``math`` answer,
math-verify in a helper process; for an answer still undecided, the LLM judge when enabled;
otherwise wrong. Judge calls of all samples (and of all groups scored at once) run concurrently.

Reference-compatible reward (``reward.reference_compat=true``), exactly as the reference's
``compute_score``: no answer -> wrong; its rules match -> right; otherwise the judge decides (wrong
without one). With a judge it also reads tool use the reference's way: a handled call whose code the
heuristics read no op from is described by the judge (``reference_tools``).

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

from cv_ray.reward import reference
from cv_ray.reward.answer import extract_answer, math_equivalent, rule_verdict
from cv_ray.reward.judge import JudgeClient, JudgeRequest
from cv_ray.reward.outcome import SampleOutcome
from cv_ray.reward.reference_tools import ReferenceToolUse, ToolUseReader, handled_calls, merge_judge_reading
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

    async def resolve(self, task: Task, outcomes: Sequence[SampleOutcome], reference_compat: bool = False
                      ) -> list[SampleOutcome]:
        """Copies of ``outcomes`` with every ``correct`` decided (by the reference's procedure when
        ``reference_compat``, which with a judge also fills ``tool_use``)."""
        return list(await asyncio.gather(*(self._resolve_one(task, o, reference_compat) for o in outcomes)))

    async def _resolve_one(self, task: Task, outcome: SampleOutcome, reference_compat: bool) -> SampleOutcome:
        if not reference_compat:
            return await self._fixed_verdict(task, outcome)
        outcome = await self._reference_verdict(task, outcome)
        if self.judge is not None and outcome.tool_use is None and outcome.calls:
            outcome = dataclasses.replace(outcome, tool_use=await self._reference_tool_use(outcome))
        return outcome

    async def _reference_verdict(self, task: Task, outcome: SampleOutcome) -> SampleOutcome:
        if outcome.correct is not None:
            return outcome
        answer = reference.extract_answer(outcome.response_text)
        if answer is None or reference.answers_match(answer, reference.reference_ground_truth(task)):
            self.stats["rule/reference_no_answer" if answer is None else "rule/reference"] += 1
            return dataclasses.replace(outcome, correct=answer is not None)
        if self.judge is None:
            self.stats["rule/undecided"] += 1
            return dataclasses.replace(outcome, correct=False)
        request = JudgeRequest(reference.judge_task_type(task.data_source), task.question, answer, task.answer)
        result = await self.judge.judge(request)
        self.stats["judge/failed" if result.failed else "judge/decided"] += 1
        return dataclasses.replace(outcome, correct=result.correct, judge_failed=result.failed)

    async def _reference_tool_use(self, outcome: SampleOutcome) -> ReferenceToolUse:
        """The reference's reading of the calls, asking the judge where its heuristics read nothing."""
        assert self.judge is not None
        reader = ToolUseReader(handled_calls(outcome.calls))
        asked = reader.needs_judge()
        replies = await asyncio.gather(*(self.judge.read_tool_use(reader.calls[i].code, reader.calls[i].description)
                                         for i in asked))
        for index, reply in zip(asked, replies):
            self.stats["tool_judge/failed" if reply is None else "tool_judge/read"] += 1
            # A failed judge leaves the heuristic reading, as the reference falls back to it.
            reader.readings[index] = merge_judge_reading(reply, reader.heuristic(index))
        return reader.tool_use()

    async def _fixed_verdict(self, task: Task, outcome: SampleOutcome) -> SampleOutcome:
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
