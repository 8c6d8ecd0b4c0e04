"""Reward actors: :class:`RewardWorker` (one Ray actor) and :class:`RewardGroup` (``num_workers`` of them).

Thin shells: a worker decides the verdicts the rules cannot (math-verify, the LLM judge; see
``verdicts.py``), then calls the pure :func:`score_group`. Workers are async actors, so the
groups sent to one worker are scored concurrently and a slow judge reply stalls only its own group.

The group reduces trajectories to :class:`SampleOutcome`s on the caller's side and sends tasks
without their images: the reward reads neither tokens nor pixels, and shipping them costs more
than scoring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ray

from cv_ray.actor_group import ActorGroup, GroupShell
from cv_ray.reward.config import RewardConfig
from cv_ray.reward.dense import mean_breakdown, score_group, term_weights
from cv_ray.reward.judge import JudgeClient
from cv_ray.reward.outcome import SampleOutcome, outcome_from_trajectory
from cv_ray.reward.verdicts import VerdictResolver
from cv_ray.types import RewardBreakdown, Task, Trajectory


@ray.remote
class RewardWorker:
    """Scores GRPO groups. ``stats()`` returns cumulative judge and verdict counters."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.judge = JudgeClient(cfg.judge) if cfg.judge.enabled else None
        self.resolver = VerdictResolver(self.judge, cfg.math_timeout_s)

    async def score(self, task: Task, trajectories: Sequence[Trajectory]) -> list[RewardBreakdown]:
        """The reward of each trajectory of one task's group, in order."""
        return await self.score_outcomes(task, [outcome_from_trajectory(t) for t in trajectories])

    async def score_outcomes(self, task: Task, outcomes: Sequence[SampleOutcome]) -> list[RewardBreakdown]:
        """Like :meth:`score`, for samples already reduced to outcomes."""
        resolved = await self.resolver.resolve(task, outcomes, self.cfg.reference_compat)
        return score_group(task, resolved, self.cfg)

    def weights(self) -> dict[str, float]:
        """The signed weight of every term this worker scores with (``term_weights`` of its config)."""
        return term_weights(self.cfg)

    def stats(self) -> dict[str, int]:
        stats = {f"verdict/{k}": v for k, v in self.resolver.stats.items()}
        if self.judge is not None:
            stats.update({f"judge/{k}": v for k, v in self.judge.stats.items()})
        return stats


class RewardGroup(GroupShell):
    """``cfg.num_workers`` reward actors; scores a batch of groups spread over them."""

    def __init__(self, cfg: RewardConfig):
        self.actors = ActorGroup(RewardWorker, cfg.num_workers, args=(cfg,), name="reward workers",
                                 options=lambda i: {"num_cpus": cfg.cpus_per_worker})
        self._last_stats: dict[str, int] = {}
        self._submitted = 0

    def submit(self, task: Task, trajectories: Sequence[Trajectory], worker: int | None = None) -> ray.ObjectRef:
        """Score one task's group on worker ``worker`` (default: the next one, round robin); the ref
        resolves to its breakdowns. The streaming RL loop scores each group as soon as its samples are done."""
        workers = self.actors.actors
        if worker is None:
            worker, self._submitted = self._submitted % len(workers), self._submitted + 1
        outcomes = [outcome_from_trajectory(t) for t in trajectories]
        return workers[worker].score_outcomes.remote(dataclasses.replace(task, images=[]), outcomes)

    def score(self, groups: Sequence[tuple[Task, Sequence[Trajectory]]]
              ) -> tuple[list[list[RewardBreakdown]], dict[str, float]]:
        """Breakdowns per group (in the order given) and metrics: the mean of every component
        (``reward/<name>``) and this call's judge and verdict counters. Group ``i`` goes to worker
        ``i % num_workers`` in every call, whatever was submitted before."""
        n = len(self.actors)
        results: list[list[RewardBreakdown]] = ray.get([self.submit(task, trajs, i % n)
                                                        for i, (task, trajs) in enumerate(groups)])
        return results, self.metrics(results)

    def metrics(self, results: Sequence[Sequence[RewardBreakdown]]) -> dict[str, float]:
        """The mean of every component over ``results`` (``reward/<name>``) and the judge and verdict
        counters since the previous call."""
        totals: dict[str, int] = {}
        for worker_stats in self.actors.get(self.actors.each(lambda worker: worker.stats.remote())):
            for key, value in worker_stats.items():
                totals[key] = totals.get(key, 0) + value
        metrics = {f"reward/{k}": v for k, v in mean_breakdown([b for r in results for b in r]).items()}
        metrics.update({f"reward/{k}": float(v - self._last_stats.get(k, 0)) for k, v in totals.items()})
        self._last_stats = totals
        return metrics

    def weights(self) -> dict[str, float]:
        """The term weights the actors score with, read back from them (they all hold the same config)."""
        reported = self.actors.get(self.actors.each(lambda worker: worker.weights.remote()))
        if any(w != reported[0] for w in reported):
            raise RuntimeError(f"reward workers disagree on their weights: {reported}")
        return reported[0]

    def shutdown(self) -> None:
        """End the reward actors (idempotent)."""
        self.actors.shutdown()
