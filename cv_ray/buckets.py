"""Split a stream of named items into consecutive buckets under a size limit (pure)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def size_buckets(named: Iterable[tuple[str, T]], limit: int, size_of: Callable[[T], int]
                 ) -> Iterator[list[tuple[str, T]]]:
    """Consecutive ``(name, item)`` lists whose ``size_of`` sums stay within ``limit`` (a larger item goes alone).

    The learner buckets parameters by element count (``cv_ray.learner.weights.full_numel``: a ZeRO-3
    partitioned parameter's full size); the vLLM engine buckets tensors by bytes for its weight update
    (cv_ray.rollout.vllm_engine).
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
