"""Per-token log-probs and entropies of a Qwen-VL model on a padded micro-batch.

The model computes its own multimodal (3-D) RoPE position ids from ``input_ids``,
``mm_token_type_ids``, ``image_grid_thw`` and ``attention_mask`` (transformers' ``get_rope_index``),
so positions follow the images of each sequence and right padding does not shift them. Token
log-probs go through :func:`cv_ray.logprobs.token_logprobs`, the function the rollout engine uses,
with the same temperature and banned ids, so the importance ratio is exactly 1 on-policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from cv_ray.learner.batch import ModelBatch
from cv_ray.logprobs import token_logprobs


def sequence_logprobs(model: torch.nn.Module, batch: ModelBatch, temperature: float,
                      banned_token_ids: Sequence[int], touch_vision: torch.nn.Module | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``batch`` and score every token given its prefix.

    Returns ``(logprobs [B, T], entropy [B, T])`` in float32, aligned with ``input_ids``: position
    ``t`` scores token ``t``; position 0 and padding are 0. Gradients flow when enabled by the caller.
    Banned tokens in the input (the image placeholders of the prompt and tool responses) have
    probability 0 under the masked distribution; their log-prob is reported as 0 instead of -inf,
    as the rollout does for every token it did not sample, so that ``0 * logprob`` stays 0 and never
    turns a masked-out position into NaN. They are never trained (their mask is 0).

    ``model`` is what is called (a plain model or a DeepSpeed engine). ``touch_vision``: the
    unwrapped model whose vision tower runs on a blank image (``0 *`` its output added to the
    token embeddings) when the micro-batch has no image. Data-parallel ranks must run the same
    modules in the same order: under ZeRO-3 every module's forward gathers its parameters
    collectively, and trainable parameters must get a gradient on every rank, or the ranks' collective
    calls no longer match.
    """
    inputs = batch.inputs
    if touch_vision is not None and "pixel_values" not in inputs:
        with _vision_after_embeddings(touch_vision):
            logits = model(**inputs, use_cache=False).logits
    else:
        logits = model(**inputs, use_cache=False).logits
    ids = inputs["input_ids"]
    T = ids.shape[1]
    banned = torch.tensor(sorted(banned_token_ids), dtype=ids.dtype, device=ids.device)
    # Row by row: the float32 copy of [T, vocab] logits is the peak of this function, and padding
    # rows would only add to it.
    rows_lp, rows_ent = [], []
    for b, n in enumerate(batch.lengths):
        targets = ids[b, 1:n]
        lp, ent = token_logprobs(logits[b, : n - 1], targets, temperature, banned_token_ids)
        lp = lp.masked_fill(torch.isin(targets, banned), 0.0)
        rows_lp.append(torch.nn.functional.pad(lp, (1, T - n)))
        rows_ent.append(torch.nn.functional.pad(ent, (1, T - n)))
    return torch.stack(rows_lp), torch.stack(rows_ent)


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
