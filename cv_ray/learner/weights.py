"""Full weights out of a (possibly ZeRO-3-partitioned) model, one bucket at a time.

Under ZeRO-3 each rank holds a shard of every parameter and ``param.numel()`` is 0; the real size is
``param.ds_numel``. Gathering the whole model at once needs the whole model's memory on every rank,
so parameters are gathered in buckets of at most ``bucket_numel`` elements with
``deepspeed.zero.GatheredParameters`` (a collective: every rank must walk the same buckets), copied
to CPU on the receiving rank, and released before the next bucket.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


def full_numel(param: torch.nn.Parameter) -> int:
    """Number of elements of the whole parameter, partitioned (ZeRO-3) or not."""
    return int(getattr(param, "ds_numel", param.numel()))


def size_buckets(named: Iterable[tuple[str, T]], limit: int, size_of: Callable[[T], int] = full_numel
                 ) -> Iterator[list[tuple[str, T]]]:
    """Consecutive ``(name, item)`` lists whose ``size_of`` sums stay within ``limit`` (a larger item goes alone).

    The learner buckets parameters by element count (``full_numel``); the vLLM engine buckets tensors
    by bytes for its weight update (cv_ray.rollout.vllm_engine).
    """
    bucket: list[tuple[str, T]] = []
    size = 0
    for name, item in named:
        n = size_of(item)
        if bucket and size + n > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, item))
        size += n
    if bucket:
        yield bucket


def iter_full_weights(module: torch.nn.Module, partitioned: bool, keep: bool, bucket_numel: int
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor on CPU)`` for every parameter of ``module``; yields only where ``keep``.

    Every rank must consume the whole iterator (the gathers are collective); ranks with ``keep``
    false get nothing. Names are ``module.named_parameters`` names (the Hugging Face state-dict names
    of the ``*ForConditionalGeneration`` model); tied parameters appear under each of their names.
    """
    named = list(module.named_parameters(remove_duplicate=False))
    for bucket in size_buckets(named, bucket_numel):
        params = [p for _, p in bucket]
        if partitioned:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list({id(p): p for p in params}.values()), modifier_rank=None)
        else:
            gather = contextlib.nullcontext()
        with gather:
            copies = [(name, p.detach().to("cpu", copy=True)) for name, p in bucket] if keep else []
        yield from copies
