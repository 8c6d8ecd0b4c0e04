"""The three actor groups that play and score episodes: sandbox executors, rollout workers, reward workers.

The driver's RL stage, the evaluator and the learning demo all need the same trio, built in the same
order (the rollout workers hold a handle on the sandbox group) and ended in the reverse order, also
when building one of them fails half-way::

    with EpisodeGroups.start(model, cfg.rollout, cfg.sandbox, cfg.reward) as groups:
        trajectories, metrics = groups.rollout.rollout(tasks)          # the RL step's timed phases
        breakdowns, reward_metrics = groups.reward.score(group_by_task(tasks, trajectories))
        scored = groups.play(tasks, n_samples=1, temperature=0.0)      # validation / evaluation

``play`` is rollout then reward in one call, for callers that do not time the two apart.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

from cv_ray.actor_group import GroupShell
from cv_ray.models import ModelRef
from cv_ray.reward.config import RewardConfig
from cv_ray.reward.reward_worker import RewardGroup
from cv_ray.rollout.config import RolloutConfig
from cv_ray.rollout.rollout_worker import RolloutGroup
from cv_ray.sandbox.config import SandboxConfig
from cv_ray.sandbox.executor import SandboxGroup
from cv_ray.types import RewardBreakdown, Task, Trajectory


def group_by_task(tasks: list[Task], trajectories: list[Trajectory]) -> list[tuple[Task, list[Trajectory]]]:
    """(task, its samples) per task, in task order (trajectories carry their task's uid)."""
    by_uid: dict[str, list[Trajectory]] = {}
    for traj in trajectories:
        by_uid.setdefault(traj.uid, []).append(traj)
    return [(task, by_uid.get(task.uid, [])) for task in tasks]


@dataclass
class ScoredEpisodes:
    """Episodes of a batch of tasks with their rewards, grouped by task in task order."""

    groups: list[tuple[Task, list[Trajectory]]]
    breakdowns: list[list[RewardBreakdown]]
    """Per group, one breakdown per trajectory, in order."""
    rollout_metrics: dict[str, float]
    reward_metrics: dict[str, float]

    def triples(self) -> list[tuple[Task, Trajectory, RewardBreakdown]]:
        """(task, trajectory, breakdown) of every episode, task-major."""
        return [(task, traj, b) for (task, trajs), bs in zip(self.groups, self.breakdowns)
                for traj, b in zip(trajs, bs)]


@dataclass
class EpisodeGroups(GroupShell):
    sandbox: SandboxGroup
    rollout: RolloutGroup
    reward: RewardGroup

    @classmethod
    def start(cls, model: ModelRef, rollout: RolloutConfig, sandbox: SandboxConfig,
              reward: RewardConfig) -> EpisodeGroups:
        """Start the sandbox executors, then the rollout workers (which call them), then the reward
        workers. If one fails to start, those already up are shut down before the error propagates."""
        with ExitStack() as started:
            sandbox_group = started.enter_context(SandboxGroup(sandbox))
            rollout_group = started.enter_context(RolloutGroup(model, rollout, sandbox_group))
            reward_group = started.enter_context(RewardGroup(reward))
            started.pop_all()
        return cls(sandbox_group, rollout_group, reward_group)

    def play(self, tasks: list[Task], n_samples: int | None = None, temperature: float | None = None,
             use_tools: bool = True) -> ScoredEpisodes:
        """Roll out ``n_samples`` episodes per task (see ``RolloutGroup.rollout``) and score each task's group."""
        trajectories, rollout_metrics = self.rollout.rollout(tasks, n_samples, temperature=temperature,
                                                             use_tools=use_tools)
        groups = group_by_task(tasks, trajectories)
        breakdowns, reward_metrics = self.reward.score(groups)
        return ScoredEpisodes(groups, breakdowns, rollout_metrics, reward_metrics)

    def shutdown(self) -> None:
        """End the reward workers, the rollout workers, then the sandbox executors (idempotent)."""
        for group in (self.reward, self.rollout, self.sandbox):
            group.shutdown()
