"""Bookkeeping of the asynchronous RL loop: which groups may start, which ones a step trains on, how stale.

Pure (no Ray, no I/O): the driver's streaming loop (cv_ray/driver.py, ``AsyncRollouts`` and
``rl_async_step``) feeds a :class:`GroupLedger` its events (a group started, a group scored, a step
done); tests drive it through thousands of random interleavings without Ray
(tests/test_async_ledger.py). The two sample filters of the RL step live here too
(:func:`is_flat_group`, :func:`cut_by_token_budget`), since both loops apply them.

Vocabulary. The learner's policy *version* ``v`` is the number of RL steps done. A *group* is one
task's ``n`` samples; it is *started* under version ``s`` (``Ticket.version``), meaning the rollout
worker samples its first token under weights of version ``>= s`` (the driver submits it with
``min_version=s``). Each step consumes exactly ``B`` groups. A consumed trajectory's *staleness* is
``v`` minus the oldest weight version among its sampled tokens; the bound is ``k`` (``max_staleness``).

How the bound holds by construction. A group started under ``s`` must be consumed by step
``s + k`` (its *deadline*). Two rules keep every deadline reachable:

* **Budget** (AReaL's): at most ``(k + 1) * B`` groups are outstanding (started, not yet consumed or
  filtered out), ``k * B`` once step ``v`` has taken its batch. Step ``v`` and the ``k`` after it
  consume ``(k + 1) * B`` groups, so a new group's deadline ``v + k`` is reachable *if* the earlier
  ones do not take its place.
* **Earliest deadline first**: a step takes the ``B`` ready groups with the earliest deadlines, and
  only when what stays outstanding still fits: for every ``w`` in ``v .. v + k - 1``, at most
  ``(w - v) * B`` remaining groups may have a deadline ``<= w``. Otherwise the step waits for more
  groups to finish. The budget alone is not enough when groups finish out of order: taking the ``B``
  groups that finished first lets a slow group's deadline pass (tests/test_async_ledger.py shows
  the counter-example on this very mutant).

Invariant (kept by both rules, checked by the property test): before step ``v``, for every ``w >= v``,
at most ``(w - v + 1) * B`` outstanding groups have a deadline ``<= w``. Hence the groups due at step
``v`` always fit in its batch, taking the earliest deadlines never breaks the invariant, and, when
every outstanding group has finished, a batch is always possible (no deadlock). A group whose oldest
token is nevertheless older than ``v - k`` (an engine that reported a wrong version) is dropped at
consumption and counted (``stale_dropped``); with correct engines that count stays 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cv_ray.types import RewardBreakdown, Task, Trajectory


@dataclass(frozen=True)
class Ticket:
    """One group started by the driver."""

    seq: int
    """Start order (unique within a run, resumes included)."""
    task_index: int
    """The task's row in the training set (what a resume regenerates when the group was in flight)."""
    version: int
    """The policy version it was started under: every token it samples comes from weights >= this."""


@dataclass
class ScoredGroup:
    """A finished, scored group waiting for the learner."""

    ticket: Ticket
    task: Task
    trajectories: list[Trajectory]
    breakdowns: list[RewardBreakdown]
    """One per trajectory, in order."""

    def oldest_version(self) -> int:
        """The oldest weight version that sampled any token of the group."""
        return min(t.oldest_version() for t in self.trajectories)


@dataclass
class LedgerCounts:
    """Cumulative counts of a run (restored on resume)."""

    started: int = 0
    consumed: int = 0
    filtered: int = 0
    """Groups dropped by the dynamic-sampling filter (all rewards equal)."""
    stale_dropped: int = 0
    """Groups dropped at consumption for exceeding the staleness bound (0 unless an engine misreports)."""


class GroupLedger:
    """Outstanding groups of the asynchronous loop: in flight (rollout or reward) or ready (scored).

    ``batch_groups`` (``B``): groups per step; ``max_staleness`` (``k``); ``total_steps``: the run's RL
    steps (nothing is started that no remaining step would consume); ``version``: the policy version
    now (the step a resumed run continues at).
    """

    def __init__(self, batch_groups: int, max_staleness: int, total_steps: int, version: int = 0) -> None:
        if batch_groups < 1 or max_staleness < 0:
            raise ValueError(f"batch_groups >= 1 and max_staleness >= 0, got {batch_groups}, {max_staleness}")
        self.batch_groups, self.max_staleness, self.total_steps = batch_groups, max_staleness, total_steps
        self.version = version
        self.next_seq = 0
        self.in_flight: dict[int, Ticket] = {}
        self.ready: dict[int, ScoredGroup] = {}
        self.counts = LedgerCounts()
        self.taken = False
        """Whether this version's step has taken its batch (until :meth:`advance`)."""

    # --------------------------------------------------------------------------------- starting

    @property
    def outstanding(self) -> int:
        return len(self.in_flight) + len(self.ready)

    def room(self) -> int:
        """How many groups may be started now: the staleness budget, and no more than the remaining
        steps will consume (the current step's batch no longer counts once it is taken)."""
        b, k = self.batch_groups, self.max_staleness
        steps_left = self.total_steps - self.version - self.taken
        budget = (k + 1 - self.taken) * b - self.outstanding
        return max(0, min(budget, steps_left * b - self.outstanding))

    def start(self, task_index: int) -> Ticket:
        """Record a group started now, under the current version. Raises when there is no room."""
        if self.room() < 1:
            raise RuntimeError(f"no room to start a group: {self.outstanding} outstanding for a budget of "
                               f"{(self.max_staleness + 1) * self.batch_groups} at version {self.version}")
        ticket = Ticket(self.next_seq, task_index, self.version)
        self.next_seq += 1
        self.in_flight[ticket.seq] = ticket
        self.counts.started += 1
        return ticket

    def finish(self, group: ScoredGroup, keep: bool = True) -> None:
        """A group in flight was scored: it joins the queue, or (``keep=False``: filtered out) leaves the
        books, which makes room for another."""
        if group.ticket.seq not in self.in_flight:
            raise KeyError(f"group {group.ticket} is not in flight (finished twice, or never started)")
        del self.in_flight[group.ticket.seq]
        if keep:
            self.ready[group.ticket.seq] = group
        else:
            self.counts.filtered += 1

    # -------------------------------------------------------------------------------- consuming

    def deadline(self, ticket: Ticket) -> int:
        """The last step that may consume the group."""
        return ticket.version + self.max_staleness

    def take_batch(self) -> list[ScoredGroup] | None:
        """The step's ``B`` groups (earliest deadline first), removed from the queue; None while the
        groups that must go first are still in flight (see the module docstring)."""
        v, b, k = self.version, self.batch_groups, self.max_staleness
        if self.taken:
            raise RuntimeError(f"version {v}'s batch was already taken; advance() first")
        for seq in [s for s, g in self.ready.items() if g.oldest_version() < v - k]:
            del self.ready[seq]  # cannot happen with engines that report their versions right
            self.counts.stale_dropped += 1
        if len(self.ready) < b:
            return None
        order = sorted(self.ready.values(), key=lambda g: (self.deadline(g.ticket), g.ticket.seq))
        batch = order[:b]
        remaining = [self.deadline(t) for t in self.in_flight.values()] + \
                    [self.deadline(g.ticket) for g in order[b:]]
        for w in range(v, v + k):
            if sum(d <= w for d in remaining) > (w - v) * b:
                return None
        for group in batch:
            del self.ready[group.ticket.seq]
        self.counts.consumed += b
        self.taken = True
        return batch

    def advance(self) -> None:
        """The step's update is done: the policy is one version newer."""
        self.version += 1
        self.taken = False

    # ------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: the queue (scored groups, kept whole), the tickets in flight (to
        regenerate), the version, the sequence counter and the counts. Picklable."""
        return {"batch_groups": self.batch_groups, "max_staleness": self.max_staleness, "version": self.version,
                "taken": self.taken, "next_seq": self.next_seq,
                "in_flight": [asdict(t) for t in self.in_flight.values()],
                "ready": list(self.ready.values()), "counts": asdict(self.counts)}

    @classmethod
    def from_state(cls, state: dict[str, Any], total_steps: int) -> GroupLedger:
        """A ledger that continues where ``state`` stopped; its in-flight tickets must be submitted again."""
        ledger = cls(state["batch_groups"], state["max_staleness"], total_steps, state["version"])
        ledger.next_seq, ledger.taken = state["next_seq"], state["taken"]
        ledger.in_flight = {t["seq"]: Ticket(**t) for t in state["in_flight"]}
        ledger.ready = {g.ticket.seq: g for g in state["ready"]}
        ledger.counts = LedgerCounts(**state["counts"])
        return ledger


# ------------------------------------------------------------------------------------- metrics


def staleness_counts(batch: Sequence[ScoredGroup], version: int) -> Counter:
    """How many trajectories of ``batch`` (consumed at ``version``) are 0, 1, 2, ... versions stale
    (measured from each trajectory's oldest sampled token)."""
    return Counter(version - t.oldest_version() for g in batch for t in g.trajectories)


# ------------------------------------------------------------------------------ sample filters


def is_flat_group(rewards: Sequence[float]) -> bool:
    """True when every reward of a group is the same: GRPO gives all its samples advantage 0, so the
    group carries no signal (DAPO's dynamic sampling drops it and samples another)."""
    return len(rewards) > 0 and max(rewards) == min(rewards)


def cut_by_token_budget(trajectory: Trajectory) -> bool:
    """True when the episode was stopped by a token limit (a turn cut at ``max_new_tokens_per_turn``, or
    the episode's ``max_response_tokens``) rather than ending itself: with ``trainer.rl.mask_overlong``
    its tokens leave the loss (DAPO's over-long filtering), so the policy is not punished for an
    answer it was not allowed to finish."""
    return trajectory.stop_reason == "max_tokens"
