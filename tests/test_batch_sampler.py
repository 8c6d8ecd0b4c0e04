"""The driver's BatchSampler: deterministic epoch-shuffled batches whose position survives a checkpoint."""

from __future__ import annotations

import itertools

import pytest

from cv_ray.driver import BatchSampler
from cv_ray.learner.checkpoint import DataPosition


def _batches(sampler: BatchSampler, count: int) -> list[list[int]]:
    return [sampler.next() for _ in range(count)]


def test_an_epoch_is_disjoint_batches_of_one_permutation():
    sampler = BatchSampler(10, 3, seed=4)  # 3 batches per epoch; one item is left out of each epoch
    epoch = _batches(sampler, 3)
    flat = [i for batch in epoch for i in batch]
    assert len(flat) == len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert sampler.position == DataPosition(1, 0)


def test_epochs_roll_over_and_reshuffle():
    """Mutant: the shuffle ignores the epoch (every epoch repeats the first epoch's order)."""
    sampler = BatchSampler(8, 2, seed=1)
    first, second = _batches(sampler, 4), _batches(sampler, 4)
    assert sorted(i for b in first for i in b) == sorted(i for b in second for i in b) == list(range(8))
    assert first != second
    assert sampler.position == DataPosition(2, 0)


@pytest.mark.parametrize("stop", [1, 3, 4, 7])  # mid-epoch, the epoch's last batch, the boundary, later
def test_a_sampler_restored_at_its_position_continues_like_an_uninterrupted_one(stop):
    """Mutant: the restored sampler restarts at the epoch's first batch (the position is not applied)."""
    uninterrupted = BatchSampler(8, 2, seed=5)
    expected = _batches(uninterrupted, 10)
    first = BatchSampler(8, 2, seed=5)
    head = _batches(first, stop)
    resumed = BatchSampler(8, 2, seed=5, position=DataPosition(first.position.epoch, first.position.batch))
    assert head + _batches(resumed, 10 - stop) == expected


def test_fewer_items_than_a_batch_wrap_within_the_epoch():
    sampler = BatchSampler(3, 5, seed=0)
    batch = sampler.next()
    assert len(batch) == 5 and set(batch) == {0, 1, 2}
    assert batch[3:] == batch[:2]  # the wrap repeats the epoch's order from its start
    assert sampler.position == DataPosition(1, 0)


def test_the_order_is_a_function_of_the_seed():
    a, b, c = (list(itertools.chain(*_batches(BatchSampler(12, 4, seed=s), 6))) for s in (0, 0, 1))
    assert a == b and a != c


def test_an_empty_dataset_is_refused_with_the_cause():
    with pytest.raises(ValueError, match="dataset is empty"):
        BatchSampler(0, 2, seed=0)
