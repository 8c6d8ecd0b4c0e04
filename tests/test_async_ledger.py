"""The asynchronous loop's bookkeeping (cv_ray/async_rl.py), without Ray.

A simulated driver starts groups whenever the ledger has room, finishes them in random orders
(some groups very slow, some filtered out, partial rollouts whose oldest token may come from any
version between the group's start and now), takes batches and advances the version, over thousands
of interleavings. Every consumed trajectory must be at most ``k`` versions stale, no group may be
consumed twice or lost, and the loop must never stall.
"""

from __future__ import annotations

import pickle
import random

import pytest

from cv_ray.async_rl import (
    GroupLedger,
    ScoredGroup,
    Ticket,
    cut_by_token_budget,
    is_flat_group,
    staleness_counts,
)
from cv_ray.types import RewardBreakdown, Task, Trajectory


def trajectory(versions: list[int], stop_reason: str = "answer") -> Trajectory:
    n = len(versions)
    return Trajectory(uid="t", sample_index=0, prompt_ids=[1], response_ids=[2] * n,
                      response_mask=[int(v >= 0) for v in versions], rollout_logprobs=[0.0] * n, images=[],
                      model_images=[], image_to_origin=[], image_parent=[], stop_reason=stop_reason,
                      token_versions=versions)


def scored(ticket: Ticket, oldest: int, newest: int | None = None, rewards=(1.0, 0.0)) -> ScoredGroup:
    """A finished group whose first sample started under ``oldest`` and whose other one ended under ``newest``."""
    newest = oldest if newest is None else newest
    trajs = [trajectory([oldest, -1, -1, newest]), trajectory([newest, newest])]
    task = Task(uid=f"task{ticket.task_index}", data_source="test", question="?", images=[], answer="a")
    return ScoredGroup(ticket, task, trajs, [RewardBreakdown(total=r) for r in rewards])


class Simulation:
    """The driver's use of the ledger, with random completion orders instead of Ray."""

    def __init__(self, ledger: GroupLedger, rng: random.Random, filter_rate: float):
        self.ledger, self.rng, self.filter_rate = ledger, rng, filter_rate
        self.speed: dict[int, float] = {}
        self.next_task = 0
        self.consumed: list[tuple[int, int]] = []  # (seq, staleness of the group's oldest token)

    def start_all(self) -> None:
        while self.ledger.room() > 0:
            ticket = self.ledger.start(self.next_task)
            self.next_task += 1
            # one group in ten is a straggler: it almost never finishes while others are in flight
            self.speed[ticket.seq] = 0.01 if self.rng.random() < 0.1 else 1.0

    def finish_one(self) -> None:
        in_flight = sorted(self.ledger.in_flight)
        seq = self.rng.choices(in_flight, weights=[self.speed[s] for s in in_flight])[0]
        ticket = self.ledger.in_flight[seq]
        # partial rollout: the first token under >= the start version, later turns under newer weights
        oldest = self.rng.randint(ticket.version, self.ledger.version)
        newest = self.rng.randint(oldest, self.ledger.version)
        flat = self.rng.random() < self.filter_rate
        self.ledger.finish(scored(ticket, oldest, newest), keep=not flat)

    def step(self) -> list[ScoredGroup]:
        for _ in range(100_000):
            self.start_all()
            batch = self.ledger.take_batch()
            if batch is not None:
                break
            assert self.ledger.in_flight, "stalled: no batch and nothing in flight"
            self.finish_one()
        else:
            raise AssertionError("stalled: no batch after 100000 events")
        v = self.ledger.version
        self.consumed += [(g.ticket.seq, v - g.oldest_version()) for g in batch]
        for _ in range(self.rng.randint(0, 4)):  # groups finishing while the learner updates
            if self.ledger.in_flight:
                self.finish_one()
            if self.rng.random() < 0.3:  # a driver that starts groups again before the new version
                self.start_all()
        self.ledger.advance()
        return batch


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_staleness_never_exceeds_k_over_random_interleavings(k):
    """Mutants: a step that takes the B groups that finished first (AReaL's budget alone: stragglers
    pass their deadline); earliest deadlines first without the check of what stays outstanding; a
    budget of (k + 2) * B; a budget that forgets the batch already taken at this version (groups
    started between a step's batch and its weight push)."""
    for seed in range(150):
        rng = random.Random(seed * 10 + k)
        batch_groups, steps = rng.randint(1, 4), rng.randint(3, 12)
        sim = Simulation(GroupLedger(batch_groups, k, steps), rng, filter_rate=rng.choice([0.0, 0.3]))
        for _ in range(steps):
            assert len(sim.step()) == batch_groups
        staleness = [s for _, s in sim.consumed]
        assert max(staleness) <= k, (seed, staleness)
        seqs = [seq for seq, _ in sim.consumed]
        assert len(seqs) == len(set(seqs)) == steps * batch_groups  # none twice
        counts = sim.ledger.counts
        assert counts.stale_dropped == 0
        assert sim.ledger.outstanding == 0  # nothing started that no step consumed
        assert counts.started == counts.consumed + counts.filtered  # none lost


def test_a_step_waits_for_a_straggler_whose_deadline_comes_first():
    """The counter-example to the budget alone (k = 2, B = 1): three groups start under version 0 and
    one finishes first (step 0). If step 1 took group 3 (started under version 1, finished early), the
    two version-0 stragglers would both be due at step 2, whose batch holds one. The ledger refuses
    that step-1 batch and waits. Mutant: take_batch without the check of what stays outstanding."""
    ledger = GroupLedger(batch_groups=1, max_staleness=2, total_steps=10)
    t0, t1, t2 = (ledger.start(i) for i in range(3))
    assert ledger.room() == 0
    ledger.finish(scored(t2, 0))
    assert [g.ticket for g in ledger.take_batch()] == [t2]
    ledger.advance()
    t3 = ledger.start(3)  # version 1, deadline 3
    ledger.finish(scored(t3, 1))
    assert ledger.take_batch() is None  # t0 and t1 (deadline 2) would not both fit in step 2's batch
    ledger.finish(scored(t1, 0))
    assert [g.ticket for g in ledger.take_batch()] == [t1]
    ledger.advance()
    assert ledger.take_batch() is None  # t0 is due now: it goes before t3, which can wait a step
    ledger.finish(scored(t0, 1))
    assert [g.ticket for g in ledger.take_batch()] == [t0]
    ledger.advance()
    assert [g.ticket for g in ledger.take_batch()] == [t3]


def test_budget_room_and_misuse():
    """Room is (k + 1) * B outstanding, capped by what the remaining steps consume; starting without room
    or finishing a group twice is a bug that raises. Mutant: room ignoring the filtered-out groups."""
    ledger = GroupLedger(batch_groups=2, max_staleness=1, total_steps=3)
    assert ledger.room() == 4
    tickets = [ledger.start(i) for i in range(4)]
    with pytest.raises(RuntimeError, match="no room"):
        ledger.start(9)
    ledger.finish(scored(tickets[0], 0, rewards=(1.0, 1.0)), keep=False)  # filtered: its slot is free again
    assert ledger.room() == 1 and ledger.counts.filtered == 1
    with pytest.raises(KeyError, match="not in flight"):
        ledger.finish(scored(tickets[0], 0))
    ledger = GroupLedger(batch_groups=2, max_staleness=3, total_steps=1)
    assert ledger.room() == 2  # one step left: two groups, not the budget's eight
    ledger = GroupLedger(batch_groups=1, max_staleness=1, total_steps=5)
    first, second = ledger.start(0), ledger.start(1)
    ledger.finish(scored(first, 0))
    assert ledger.take_batch() is not None and ledger.room() == 0  # budget k * B = 1, held by `second`
    with pytest.raises(RuntimeError, match="already taken"):
        ledger.take_batch()
    ledger.advance()
    assert ledger.room() == 1 and second.seq in ledger.in_flight


def test_a_group_older_than_the_bound_is_dropped_and_counted():
    """An engine that misreports (a token older than the group's start) cannot slip past the bound.
    Mutant: the drop check compares against v - k - 1."""
    ledger = GroupLedger(batch_groups=1, max_staleness=1, total_steps=5, version=3)
    bad, good = ledger.start(0), ledger.start(1)
    ledger.finish(scored(bad, 1))  # 3 - 1 = 2 > k
    ledger.finish(scored(good, 2))
    assert [g.ticket for g in ledger.take_batch()] == [good]
    assert ledger.counts.stale_dropped == 1


def test_saved_and_restored_ledger_continues_exactly():
    """A checkpoint mid-run (queue, tickets in flight, counts), pickled and restored, consumes the same
    groups in the same order as the run that never stopped: nothing lost, nothing twice. Mutant: a
    state_dict without the queued groups (a resumed run would skip them)."""
    def run(save_at: int | None) -> list[tuple[int, int]]:
        rng = random.Random(7)
        sim = Simulation(GroupLedger(3, 2, 10), rng, filter_rate=0.2)
        for step in range(10):
            if step == save_at:
                assert sim.ledger.ready and sim.ledger.in_flight  # the checkpoint holds both kinds
                state = pickle.loads(pickle.dumps(sim.ledger.state_dict()))
                sim.ledger = GroupLedger.from_state(state, total_steps=10)
            sim.step()
        return sim.consumed

    uninterrupted = run(None)
    for save_at in (2, 5):
        assert run(save_at) == uninterrupted


def test_staleness_counts_per_trajectory():
    """Consumed at version 5: trajectories whose oldest tokens came from 5, 4 and 3 (tool tokens, -1,
    ignored). Mutant: staleness measured from the newest token."""
    groups = [scored(Ticket(0, 0, 3), oldest=3, newest=5), scored(Ticket(1, 1, 4), oldest=4)]
    # group 0: [3, -1, -1, 5] -> 2 stale, [5, 5] -> 0; group 1: [4, ..., 4] -> 1, [4, 4] -> 1
    assert staleness_counts(groups, 5) == {2: 1, 0: 1, 1: 2}
    with pytest.raises(ValueError, match="no token"):
        trajectory([-1, -1]).oldest_version()


def test_flat_group_filter_and_over_long_predicate():
    """DAPO's filter: a group carries signal when its rewards differ; over-long: stopped by a token limit.
    Mutants: a filter on the mean reward (== 0); over-long read from num_turns."""
    assert is_flat_group([1.0, 1.0, 1.0]) and is_flat_group([0.0, 0.0]) and is_flat_group([2.5])
    assert not is_flat_group([1.0, 0.0]) and not is_flat_group([0.0, 0.0, 0.5]) and not is_flat_group([])
    assert cut_by_token_budget(trajectory([0], "max_tokens"))
    assert not any(cut_by_token_budget(trajectory([0], reason)) for reason in ("answer", "no_tool_call", "max_turns"))


def test_over_long_trajectories_train_no_token_but_keep_their_advantage():
    """``trainer.rl.mask_overlong``: the sample of a trajectory stopped by the token budget keeps its
    advantage (it still counted in its group's mean) and trains no token; the others are untouched; the
    count is a metric. Off, nothing changes. Mutant: the mask applied to every sample of the group."""
    from cv_ray.config import Config
    from cv_ray.driver import _train_samples

    cfg = Config()
    trajs = [trajectory([0, 0, -1, 0], "answer"), trajectory([0, 0, 0], "max_tokens")]
    samples, metrics = _train_samples(cfg, trajs, [0.5, -0.5])
    assert metrics == {} and [s.loss_mask.sum() for s in samples] == [3.0, 3.0]
    cfg.trainer.rl.mask_overlong = True
    samples, metrics = _train_samples(cfg, trajs, [0.5, -0.5])
    assert metrics == {"rollout/overlong_masked": 1.0}
    assert [s.loss_mask.sum() for s in samples] == [3.0, 0.0]
    assert samples[1].advantages[1:].tolist() == [-0.5] * 3
