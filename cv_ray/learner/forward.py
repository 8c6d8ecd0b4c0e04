"""Per-token log-probs and entropies of a Qwen-VL model on a padded micro-batch.

The model computes its own multimodal (3-D) RoPE position ids from ``input_ids``,
``mm_token_type_ids``, ``image_grid_thw`` and ``attention_mask`` (transformers' ``get_rope_index``),
so positions follow the images of each sequence and right padding does not shift them. Token
log-probs are the math of :mod:`cv_ray.logprobs`, which the rollout engine uses too, with the same
temperature and banned ids, so the importance ratio is exactly 1 on-policy. By default they are
computed from the final hidden states through ``lm_head`` in chunks of positions
(:func:`cv_ray.logprobs.head_token_logprobs`), so memory grows with ``T x hidden``, not ``T x vocab``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from cv_ray.learner.batch import ModelBatch
from cv_ray.logprobs import DEFAULT_CHUNK_TOKENS, head_token_logprobs, token_logprobs


def sequence_logprobs(model: torch.nn.Module, batch: ModelBatch, temperature: float,
                      banned_token_ids: Sequence[int], touch_vision: torch.nn.Module | None = None,
                      chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``batch`` and score every token given its prefix.

    Returns ``(logprobs [B, T], entropy [B, T])`` in float32, aligned with ``input_ids``: position
    ``t`` scores token ``t``; position 0 and padding are 0. Gradients flow when enabled by the caller.
    Banned tokens in the input (the image placeholders of the prompt and tool responses) have
    probability 0 under the masked distribution; their log-prob is reported as 0 instead of -inf,
    as the rollout does for every token it did not sample, so that ``0 * logprob`` stays 0 and never
    turns a masked-out position into NaN. They are never trained (their mask is 0).

    ``chunk_tokens > 0``: the model's ``lm_head`` is called, once, on the final hidden states of the
    scored positions (padding skipped), and projects and scores them ``chunk_tokens`` at a time
    (:func:`cv_ray.logprobs.head_token_logprobs`): no ``[B, T, vocab]`` logits exist in the forward
    or the backward pass. ``chunk_tokens = 0``: the model's full logits and one whole-row log-softmax
    per sequence (the reference computation; memory several times ``T x vocab x 4`` bytes).

    ``model`` is what is called (a plain model or a DeepSpeed engine). ``touch_vision``: the
    unwrapped model whose vision tower runs on a blank image (``0 *`` its output added to the
    token embeddings) when the micro-batch has no image. Data-parallel ranks must run the same
    modules in the same order: under ZeRO-3 every module's forward gathers its parameters
    collectively, and trainable parameters must get a gradient on every rank, or the ranks' collective
    calls no longer match. The chunked path keeps that: ``lm_head`` runs once per forward on every
    rank, whatever the number of chunks, and its hooks gather its weight for the forward and backward.
    """
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0: no chunking), got {chunk_tokens}")
    inputs = batch.inputs
    ids = inputs["input_ids"]
    B, T = ids.shape
    banned = torch.tensor(sorted(banned_token_ids), dtype=ids.dtype, device=ids.device)
    # scored[b, t]: position t of sequence b predicts its token t + 1.
    scored = torch.zeros((B, T), dtype=torch.bool, device=ids.device)
    for b, n in enumerate(batch.lengths):
        scored[b, : n - 1] = True
    targets = ids[:, 1:][scored[:, :-1]]
    with contextlib.ExitStack() as stack:
        if touch_vision is not None and "pixel_values" not in inputs:
            stack.enter_context(_vision_after_embeddings(touch_vision))
        if chunk_tokens:
            unwrapped = getattr(model, "module", model)
            stack.enter_context(_lm_head_scores(unwrapped, scored, targets, temperature, banned_token_ids,
                                                chunk_tokens))
        out = model(**inputs, use_cache=False).logits
    if chunk_tokens:
        logp, entropy = out.unbind(-1)  # [N, 2] from the patched lm_head
    else:
        # Row by row: each row's float32 [n, vocab] copies are the peak here, and padding rows would
        # only add to them.
        rows = [token_logprobs(out[b, : n - 1], ids[b, 1:n], temperature, banned_token_ids, chunk_tokens=0)
                for b, n in enumerate(batch.lengths)]
        logp, entropy = (torch.cat(r) for r in zip(*rows))
        del out, rows
    logp = logp.masked_fill(torch.isin(targets, banned), 0.0)
    # Back to [B, T], one position later: position t + 1 holds the score of token t + 1.
    at = torch.nn.functional.pad(scored[:, :-1], (1, 0))
    zeros = torch.zeros((B, T), dtype=logp.dtype, device=logp.device)
    return zeros.masked_scatter(at, logp), zeros.masked_scatter(at, entropy)


@contextlib.contextmanager
def _lm_head_scores(model: torch.nn.Module, scored: torch.Tensor, targets: torch.Tensor, temperature: float,
                    banned_token_ids: Sequence[int], chunk_tokens: int):
    """While active, ``model``'s ``lm_head`` returns ``[N, 2]`` (log-prob, entropy) of ``targets`` instead of logits.

    Its ``forward`` is replaced, not the call: the module is still called by the model's own
    forward, once, so its hooks run as usual (under ZeRO-3 they gather the weight before the forward
    and again before the backward, and release it after each). ``scored``: the ``[B, T]`` positions
    to score, in the order of ``targets``.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"chunked log-probs need a torch.nn.Linear output layer (lm_head); "
                        f"{type(model).__name__} has {type(head).__name__}. Set learner.logprob_chunk_tokens=0 "
                        f"to score the model's full logits instead")

    def score(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:2] != scored.shape:
            raise RuntimeError(f"lm_head got hidden states of shape {tuple(hidden.shape)}, expected "
                               f"{tuple(scored.shape)} + (hidden,): the model sliced its positions (logits_to_keep?)")
        logp, entropy = head_token_logprobs(hidden[scored], head.weight, head.bias, targets, temperature,
                                            banned_token_ids, chunk_tokens)
        return torch.stack((logp, entropy), dim=-1)

    head.forward = score
    try:
        yield
    finally:
        del head.forward  # the class's forward again


@contextlib.contextmanager
def _vision_after_embeddings(model: torch.nn.Module):
    """Run the vision tower on a blank image right after the token embedding, and add ``0 *`` its output.

    Right after the embedding is where a real image goes through the tower in Qwen-VL's forward,
    so every rank gathers the same ZeRO-3 parameters in the same order.
    """

    def hook(module, args, output):
        return output + 0.0 * _dummy_vision_output(model, output.device).to(output.dtype)

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _dummy_vision_output(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Sum of the vision tower's outputs on one blank image of the smallest legal grid (a scalar)."""
    vision_cfg = model.config.vision_config
    merge = vision_cfg.spatial_merge_size
    patch_dim = vision_cfg.in_channels * vision_cfg.temporal_patch_size * vision_cfg.patch_size ** 2
    grid = torch.tensor([[1, merge, merge]], device=device)
    pixels = torch.zeros((merge * merge, patch_dim), device=device, dtype=model.dtype)
    features = model.model.get_image_features(pixels, grid, return_dict=True)
    return sum(t.float().sum() for t in _tensors(features.to_tuple()))


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
