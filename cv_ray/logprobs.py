"""Token log-probabilities of the policy, computed the same way by the rollout engine and the learner.

The importance ratio of the policy loss compares these two numbers for the same token, so both sides
must apply the same temperature and the same banned-token mask. Pure functions of tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mask_banned(logits: torch.Tensor, banned_token_ids: Sequence[int]) -> torch.Tensor:
    """Return ``logits`` with the banned ids set to -inf (image/video placeholders are never sampled).

    logits: ``[..., vocab]``. Ids beyond the vocabulary are ignored.
    """
    if not banned_token_ids:
        return logits
    vocab = logits.shape[-1]
    ids = [i for i in banned_token_ids if 0 <= i < vocab]
    if not ids:
        return logits
    logits = logits.clone()
    logits[..., ids] = float("-inf")
    return logits


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0, banned_token_ids: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of each chosen token under ``softmax(mask(logits) / temperature)``.

    logits: ``[..., vocab]`` (float); token_ids: ``[...]`` (long), the same leading shape.
    Returns ``(logprobs [...], entropy [...])`` in float32. Temperature 0 (greedy) is treated as 1
    for scoring, since a greedy policy has no density to score.
    """
    scale = temperature if temperature > 0 else 1.0
    scaled = mask_banned(logits.float(), banned_token_ids) / scale
    logp_all = torch.log_softmax(scaled, dim=-1)
    chosen = logp_all.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    probs = logp_all.exp()
    # 0 * -inf is nan: masked entries contribute nothing to the entropy.
    entropy = -(probs * logp_all.masked_fill(probs == 0, 0.0)).sum(-1)
    return chosen, entropy
