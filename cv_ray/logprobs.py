"""Token log-probabilities and entropies of the policy, computed the same way by the rollout engine and the learner.

The importance ratio of the policy loss compares these two numbers for the same token, so both sides
must apply the same temperature and the same banned-token mask: ``softmax(mask(logits) / temperature)``.
Pure functions of tensors.

Memory. A full-vocabulary float32 log-softmax costs ``T x vocab x 4`` bytes per copy (5 GB at 8k
tokens and Qwen's 151,936 ids), and autograd keeps several copies for the backward pass. So both entry
points work on ``chunk_tokens`` rows at a time and keep only ``O(rows)`` numbers for the backward
(the entropy of each row); the backward pass recomputes each chunk's log-softmax:

* :func:`token_logprobs` scores given logits (the rollout engine's per-step logits). Logits stay in
  their own dtype; each chunk is upcast to float32 on its own.
* :func:`head_token_logprobs` scores hidden states through the output projection (``lm_head``) one
  chunk at a time, so not even the logits of the whole sequence exist (the learner).

``chunk_tokens=0`` is the plain autograd computation over the whole input at once (the reference the
chunked paths are tested against, and the "before" of ``tools/bench_learner.py --memory``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_CHUNK_TOKENS = 1024
"""Rows per chunk: one float32 ``[1024, 151936]`` block is 0.6 GB; the chunked paths hold about two."""


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
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0, banned_token_ids: Sequence[int] = (),
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of each chosen token under ``softmax(mask(logits) / temperature)``.

    logits: ``[..., vocab]`` (any float dtype); token_ids: ``[...]`` (long), the same leading shape.
    Returns ``(logprobs [...], entropy [...])`` in float32, differentiable with respect to ``logits``.
    Temperature 0 (greedy) is treated as 1 for scoring, since a greedy policy has no density to score.
    ``chunk_tokens``: rows scored at a time (0: all at once, the plain autograd computation).
    """
    scale = _scale(temperature)
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0: no chunking), got {chunk_tokens}")
    if chunk_tokens == 0:
        return _full_token_logprobs(logits, token_ids, scale, banned_token_ids)
    shape = token_ids.shape
    rows = logits.reshape(-1, logits.shape[-1])  # a view for the usual contiguous [..., vocab] input
    banned = _banned_index(banned_token_ids, logits.shape[-1], logits.device)
    logp, entropy = _ScoreLogits.apply(rows, token_ids.reshape(-1).long(), scale, banned, chunk_tokens)
    return logp.reshape(shape), entropy.reshape(shape)


def head_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor,
    temperature: float = 1.0, banned_token_ids: Sequence[int] = (), chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs` of ``logits = hidden @ weight.T + bias``, never holding more than one chunk of logits.

    hidden: ``[N, hidden]`` (the model's dtype); weight: ``[vocab, hidden]``; bias: ``[vocab]`` or None;
    token_ids: ``[N]``. Returns ``(logprobs [N], entropy [N])`` in float32, differentiable with
    respect to ``hidden``, ``weight`` and ``bias``. Each chunk's logits are computed in the weight's
    dtype (as the model's own ``lm_head`` would) and upcast to float32. The backward pass keeps
    ``hidden``, ``weight`` and two floats per row, and recomputes each chunk's logits; the weight's
    gradient is accumulated in float32 over the chunks. ``chunk_tokens=0``: one chunk of all rows.
    """
    scale = _scale(temperature)
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0: no chunking), got {chunk_tokens}")
    if hidden.dim() != 2 or token_ids.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, hidden] and token_ids [N]; got {tuple(hidden.shape)} and "
                         f"{tuple(token_ids.shape)}")
    banned = _banned_index(banned_token_ids, weight.shape[0], hidden.device)
    chunk = chunk_tokens or max(1, hidden.shape[0])
    return _ScoreHead.apply(hidden, weight, bias, token_ids.long(), scale, banned, chunk)


# ------------------------------------------------------------------------------------------ internals


def _scale(temperature: float) -> float:
    return temperature if temperature > 0 else 1.0


def _banned_index(banned_token_ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(sorted({i for i in banned_token_ids if 0 <= i < vocab}), dtype=torch.long, device=device)


def _full_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, scale: float,
                         banned_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, as plain autograd over the whole input (several float32 copies of it live at once)."""
    scaled = mask_banned(logits.float(), banned_token_ids) / scale
    logp_all = torch.log_softmax(scaled, dim=-1)
    chosen = logp_all.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    probs = logp_all.exp()
    # 0 * -inf is nan: masked entries contribute nothing to the entropy.
    entropy = -(probs * logp_all.masked_fill(probs == 0, 0.0)).sum(-1)
    return chosen, entropy


def _log_softmax_chunk(logits: torch.Tensor, scale: float, banned: torch.Tensor, owned: bool = False) -> torch.Tensor:
    """``log softmax(mask(logits) / scale)`` of one chunk, ``[rows, vocab]`` float32.

    The same operations, row for row, as :func:`_full_token_logprobs`, so a row's numbers do not
    depend on the chunk it falls in, and the backward pass recomputes exactly the forward's.
    ``owned``: the caller holds no other reference to ``logits`` (a fresh projection), so float32
    logits are scaled and masked in place rather than copied.
    """
    z = logits if owned and logits.dtype == torch.float32 else logits.to(torch.float32, copy=True)
    z /= scale
    if banned.numel():
        z[:, banned] = float("-inf")
    return torch.log_softmax(z, dim=-1)


def _chunk_scores(logp: torch.Tensor, targets: torch.Tensor, banned: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p of the targets, entropy)``, each ``[rows]``, from one chunk's log-softmax (overwritten)."""
    chosen = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    probs = logp.exp()
    if banned.numel():
        logp[:, banned] = 0.0  # their probability is 0, and 0 * -inf would be nan
    entropy = -probs.mul_(logp).sum(-1)
    return chosen, entropy


def _chunk_grad(logp: torch.Tensor, targets: torch.Tensor, scale: float, banned: torch.Tensor,
                entropy: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to one chunk's logits, ``[rows, vocab]`` float32, in place of its log-softmax ``logp``.

    With ``z = mask(logits) / scale`` and ``p = softmax(z)``: ``d log p_t / dz_j = [j = t] - p_j`` and
    ``dH / dz_j = -p_j (log p_j + H)``; banned columns are constants (-inf), so their gradient is 0.
    """
    grad = logp
    probs = grad.exp()
    if banned.numel():
        grad[:, banned] = 0.0
    grad += entropy.unsqueeze(1)
    grad *= grad_entropy.unsqueeze(1)
    grad += grad_logp.unsqueeze(1)
    grad *= probs
    del probs
    grad.neg_()
    grad.scatter_add_(1, targets.unsqueeze(1), grad_logp.unsqueeze(1))
    if banned.numel():
        grad[:, banned] = 0.0
    return grad.div_(scale)


# In the loops below, each chunk's [rows, vocab] blocks are deleted before the next chunk's are made:
# a name rebound only after the new value exists would keep two chunks alive at once.


class _ScoreLogits(torch.autograd.Function):
    """Chunked :func:`token_logprobs` on ``[N, vocab]`` logits; saves the logits (no copy) and ``O(N)`` floats."""

    @staticmethod
    def forward(ctx, logits, targets, scale, banned, chunk):
        n = logits.shape[0]
        out = torch.empty((2, n), dtype=torch.float32, device=logits.device)  # logp, entropy
        for s in range(0, n, chunk):
            rows = slice(s, s + chunk)
            logp = _log_softmax_chunk(logits[rows], scale, banned)
            out[:, rows] = torch.stack(_chunk_scores(logp, targets[rows], banned))
            del logp
        logp, entropy = out
        ctx.save_for_backward(logits, targets, banned, entropy)
        ctx.scale, ctx.chunk = scale, chunk
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, banned, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            rows = slice(s, s + ctx.chunk)
            logp = _log_softmax_chunk(logits[rows], ctx.scale, banned)
            grad[rows] = _chunk_grad(logp, targets[rows], ctx.scale, banned, entropy[rows], grad_logp[rows],
                                     grad_entropy[rows])
            del logp
        return grad, None, None, None, None


class _ScoreHead(torch.autograd.Function):
    """Chunked :func:`head_token_logprobs`; saves hidden, weight, bias and ``O(N)`` floats, never logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, banned, chunk):
        n = hidden.shape[0]
        out = torch.empty((2, n), dtype=torch.float32, device=hidden.device)  # logp, entropy
        for s in range(0, n, chunk):
            rows = slice(s, s + chunk)
            logp = _log_softmax_chunk(torch.nn.functional.linear(hidden[rows], weight, bias), scale, banned,
                                      owned=True)
            out[:, rows] = torch.stack(_chunk_scores(logp, targets[rows], banned))
            del logp
        logp, entropy = out
        # The weight itself (not a view of it) is saved: under ZeRO-3 its data is released after the
        # forward and gathered again before the backward by the lm_head module's hooks.
        ctx.save_for_backward(hidden, weight, bias, targets, banned, entropy)
        ctx.scale, ctx.chunk = scale, chunk
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, banned, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(s, s + ctx.chunk)
            h = hidden[rows]
            logp = _log_softmax_chunk(torch.nn.functional.linear(h, weight, bias), ctx.scale, banned, owned=True)
            # The matmuls run in the model's dtype, as the backward of the model's own lm_head would.
            grad = _chunk_grad(logp, targets[rows], ctx.scale, banned, entropy[rows], grad_logp[rows],
                               grad_entropy[rows]).to(weight.dtype)
            del logp
            if need_hidden:
                grad_hidden[rows] = grad @ weight
            if need_weight and weight.dtype == torch.float32:
                grad_weight.addmm_(grad.t(), h.to(weight.dtype))
            elif need_weight:
                grad_weight += (grad.t() @ h.to(weight.dtype)).float()
            if need_bias:
                grad_bias += grad.float().sum(0)
            del grad
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None
