"""Chunked token log-probs and entropies (cv_ray.logprobs) equal the full-vocabulary computation, gradients included.

The reference is ``chunk_tokens=0``: plain autograd over one whole-vocabulary log-softmax (itself
checked against hand values in test_geometry_and_logprobs.py). Every comparison uses a temperature
other than 1 and banned ids, one of them a target, so the masking and the scaling are exercised in
the forward and the backward pass.
"""

from __future__ import annotations

import pytest
import torch

from cv_ray.logprobs import head_token_logprobs, token_logprobs

VOCAB = 1000
TEMPERATURE = 0.7


def _case(rows: int, hidden: int = 8, vocab: int = VOCAB, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.7).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    banned = [3, 17, vocab - 1, int(targets[1])]
    weights = torch.randn(rows, generator=g).abs()  # per-row loss weights: a gradient that differs by row
    return h, w, b, targets, banned, weights


def _loss(logp, entropy, weights):
    # A banned target's log-prob is -inf, and so is this loss, but its gradient is finite: the
    # backward pass through the -inf entries is compared too.
    return (logp * weights).sum() + 0.3 * (entropy * weights.flip(0)).sum()


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunked_logits_scoring_equals_the_full_computation(chunk):
    """Values and the gradient with respect to the logits, with chunks that do and do not divide the rows.

    Mutants: the last, partial chunk is not scored (range stops early); the backward drops the
    entropy term or the 1/temperature factor; banned columns get a gradient.
    """
    h, w, b, targets, banned, weights = _case(30)
    logits = torch.nn.functional.linear(h, w, b).reshape(2, 15, VOCAB).requires_grad_()
    targets = targets.reshape(2, 15)

    full = token_logprobs(logits, targets, TEMPERATURE, banned, chunk_tokens=0)
    chunked = token_logprobs(logits, targets, TEMPERATURE, banned, chunk_tokens=chunk)
    assert chunked[0].shape == (2, 15) and chunked[0].dtype == torch.float32
    for want, got in zip(full, chunked):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    (grad_full,) = torch.autograd.grad(_loss(*full, weights.reshape(2, 15)), logits)
    (grad_chunked,) = torch.autograd.grad(_loss(*chunked, weights.reshape(2, 15)), logits)
    torch.testing.assert_close(grad_chunked, grad_full, atol=1e-5, rtol=0)
    assert grad_full.abs().max() > 0.1 and (grad_chunked[..., banned] == 0).all()


@pytest.mark.parametrize("chunk", [1, 7, 30, 0])
def test_head_scoring_equals_the_full_computation_with_gradients(chunk):
    """lm_head applied per chunk: same values and the same gradients for hidden states, weight and bias.

    Mutants: the weight's gradient keeps only the last chunk's share (``=`` for ``+=``); the hidden
    states' gradient rows of a chunk land in the wrong place.
    """
    h, w, b, targets, banned, weights = _case(30)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    logp, entropy = token_logprobs(torch.nn.functional.linear(*leaves), targets, TEMPERATURE, banned, chunk_tokens=0)
    want = torch.autograd.grad(_loss(logp, entropy, weights), leaves)

    leaves_c = [t.clone().requires_grad_() for t in (h, w, b)]
    logp_c, entropy_c = head_token_logprobs(*leaves_c, targets, TEMPERATURE, banned, chunk_tokens=chunk)
    torch.testing.assert_close(logp_c[1:], logp[1:], atol=1e-5, rtol=0)
    assert logp_c[1] == logp[1] == float("-inf")  # a banned target: probability 0
    torch.testing.assert_close(entropy_c, entropy, atol=1e-5, rtol=0)
    got = torch.autograd.grad(_loss(logp_c, entropy_c, weights), leaves_c)
    for name, g_want, g_got in zip(("hidden", "weight", "bias"), want, got):
        assert g_want.abs().max() > 0.05, name
        torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=0, msg=name)


def test_head_scoring_in_bf16_and_at_the_real_vocabulary():
    """Qwen's 151,936 ids (where a float32 reduction order would show) and a bf16 model: still equal to 1e-5.

    Mutant: each chunk's logits are upcast after the log-softmax instead of before (bf16 softmax).
    """
    h, w, _, targets, banned, _ = _case(6, hidden=16, vocab=151_936, dtype=torch.bfloat16, seed=1)  # no bias, as Qwen
    full = token_logprobs(torch.nn.functional.linear(h, w, None), targets, TEMPERATURE, banned, chunk_tokens=0)
    chunked = head_token_logprobs(h, w, None, targets, TEMPERATURE, banned, chunk_tokens=4)
    keep = ~torch.isin(targets, torch.tensor(banned))
    torch.testing.assert_close(chunked[0][keep], full[0][keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked[1], full[1], atol=1e-5, rtol=0)
    assert chunked[0].dtype == torch.float32 and (full[1] > 2).all()  # spread over many ids


def test_the_backward_pass_keeps_no_vocabulary_sized_tensor():
    """What autograd saves for the chunked head is O(rows x hidden + vocab x hidden), never [rows, vocab].

    Mutant: chunks scored with plain autograd (each chunk's float32 log-softmax saved for the backward).
    """
    h, w, b, targets, banned, _ = _case(64, hidden=8)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    weight_storage = leaves[1].untyped_storage().data_ptr()
    saved: list[torch.Size] = []

    def pack(t):
        if t.untyped_storage().data_ptr() != weight_storage:  # the weight (or its transpose) is no activation
            saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head_token_logprobs(*leaves, targets, TEMPERATURE, banned, chunk_tokens=16)
    assert saved and not [s for s in saved if len(s) >= 2 and s[-1] == VOCAB], saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the check can fail: the reference saves them
        token_logprobs(torch.nn.functional.linear(*leaves), targets, TEMPERATURE, banned, chunk_tokens=0)
    assert [s for s in saved if len(s) >= 2 and s[-1] == VOCAB]


def test_a_negative_chunk_is_refused():
    h, w, b, targets, banned, _ = _case(4)
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logprobs(h @ w.T, targets, 1.0, banned, chunk_tokens=-1)
    with pytest.raises(ValueError, match="chunk_tokens"):
        head_token_logprobs(h, w, b, targets, 1.0, banned, chunk_tokens=-1)
