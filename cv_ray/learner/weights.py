"""Full weights out of a (possibly ZeRO-3-partitioned) model, one bucket at a time.

Under ZeRO-3 each rank holds a shard of every parameter and ``param.numel()`` is 0; the real size is
``param.ds_numel``. Gathering the whole model at once needs the whole model's memory on every rank,
so parameters are gathered in buckets of at most ``bucket_numel`` elements with
``deepspeed.zero.GatheredParameters`` (a collective: every rank must walk the same buckets), copied
to CPU on the receiving rank, and released before the next bucket.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cv_ray.buckets import size_buckets


def full_numel(param: torch.nn.Parameter) -> int:
    """Number of elements of the whole parameter, partitioned (ZeRO-3) or not."""
    return int(getattr(param, "ds_numel", param.numel()))


def full_shape(param: torch.nn.Parameter) -> list[int]:
    """Shape of the whole parameter, partitioned (ZeRO-3: ``ds_shape``) or not."""
    return list(getattr(param, "ds_shape", param.shape))


def iter_full_weights(module: torch.nn.Module, partitioned: bool, keep: bool, bucket_numel: int,
                      trainable_only: bool = False, device: torch.device | str = "cpu"
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor on device)`` for every parameter of ``module``; yields only where ``keep``.

    Every rank must consume the whole iterator (the gathers are collective); ranks with ``keep``
    false get nothing. Names are ``module.named_parameters`` names (the Hugging Face state-dict names
    of the ``*ForConditionalGeneration`` model); tied parameters appear under each of their names.
    ``trainable_only``: only parameters with ``requires_grad`` (a weight sync; the frozen vision tower
    never changes). ``device``: where the copies go (CPU for the object store, the rank's GPU for NCCL).
    """
    named = [(name, p) for name, p in module.named_parameters(remove_duplicate=False)
             if p.requires_grad or not trainable_only]
    for bucket in size_buckets(named, bucket_numel, full_numel):
        params = [p for _, p in bucket]
        if partitioned:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list({id(p): p for p in params}.values()), modifier_rank=None)
        else:
            gather = contextlib.nullcontext()
        with gather:
            copies = [(name, p.detach().to(device, copy=True)) for name, p in bucket] if keep else []
        yield from copies
