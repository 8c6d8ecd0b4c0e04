"""The learner's input record (:class:`TrainSample`) and its collation into padded model inputs.

Token layout: ``input_ids`` is the whole sequence the model saw (prompt, sampled turns, tool
responses); ``loss_mask[t] = 1`` when token ``t`` is trained, i.e. the model is scored on predicting
it from tokens ``< t``. Every per-token array (mask, advantages, log-probs) is aligned with
``input_ids``; position 0 is never trained (nothing predicts it).

Images travel as PIL images in placeholder order and are encoded per micro-batch with the
processor's image processor (:func:`cv_ray.agent.chat.build_model_inputs`, the same function the
rollout's HF engine uses), so each sample's ``pixel_values`` rows come from its own images and the
placeholder count is checked against ``image_grid_thw`` per sample, never by batch index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from cv_ray.types import SFTExample, Trajectory


@dataclass
class TrainSample:
    """One training sequence for SFT or RL. Picklable (numpy arrays and PIL images)."""

    input_ids: np.ndarray
    """``[T]`` int64 token ids."""
    loss_mask: np.ndarray
    """``[T]`` float32; 1 on trained tokens (assistant / policy-sampled), 0 elsewhere; ``loss_mask[0] == 0``."""
    images: list[Image.Image] = field(default_factory=list)
    """Images in placeholder order (``Trajectory.model_images``: the resized copies the model saw)."""
    advantages: np.ndarray | None = None
    """RL only: ``[T]`` float32 per-token advantages (a per-sequence advantage is broadcast)."""
    rollout_logprobs: np.ndarray | None = None
    """RL only: ``[T]`` float32 log-probs of the rollout engine (0 where the mask is 0)."""
    old_logprobs: np.ndarray | None = None
    """RL only: ``[T]`` the learner's own log-probs before this RL step's updates. Filled by
    ``LearnerGroup.rl_step`` when truncated importance sampling needs them; callers leave it None."""
    uid: str = ""
    """The GRPO group key (``Trajectory.uid``), or the SFT example's uid."""

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids, dtype=np.int64)
        self.loss_mask = np.asarray(self.loss_mask, dtype=np.float32)
        n = len(self.input_ids)
        if n < 2:
            raise ValueError(f"sample {self.uid!r}: a sequence needs at least 2 tokens, got {n}")
        if self.loss_mask.shape != (n,):
            raise ValueError(f"sample {self.uid!r}: loss_mask has shape {self.loss_mask.shape}, input_ids ({n},)")
        if self.loss_mask[0] != 0:
            raise ValueError(f"sample {self.uid!r}: loss_mask[0] must be 0 (nothing predicts the first token)")
        for name in ("advantages", "rollout_logprobs", "old_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            value = np.asarray(value, dtype=np.float32)
            if value.shape != (n,):
                raise ValueError(f"sample {self.uid!r}: {name} has shape {value.shape}, input_ids ({n},)")
            if not np.isfinite(value).all():
                raise ValueError(f"sample {self.uid!r}: {name} contains NaN or inf")
            setattr(self, name, value)

    @property
    def num_trained_tokens(self) -> int:
        return int(self.loss_mask.sum())


def rl_sample(trajectory: Trajectory, advantage: float | Sequence[float]) -> TrainSample:
    """A :class:`TrainSample` from a rollout trajectory and its advantage.

    ``advantage``: one number for the whole sequence (GRPO), or one per response token (a dense,
    per-token advantage; length ``len(trajectory.response_ids)``). Prompt tokens get 0.
    """
    n_prompt, n_resp = len(trajectory.prompt_ids), len(trajectory.response_ids)
    if len(trajectory.response_mask) != n_resp or len(trajectory.rollout_logprobs) != n_resp:
        raise ValueError(f"trajectory {trajectory.uid}/{trajectory.sample_index}: response_ids, response_mask and "
                         f"rollout_logprobs differ in length ({n_resp}, {len(trajectory.response_mask)}, "
                         f"{len(trajectory.rollout_logprobs)})")
    if n_prompt == 0:
        raise ValueError(f"trajectory {trajectory.uid}/{trajectory.sample_index}: empty prompt")
    adv = np.zeros(n_prompt + n_resp, dtype=np.float32)
    if np.ndim(advantage) == 0:
        adv[n_prompt:] = float(advantage)
    else:
        per_token = np.asarray(advantage, dtype=np.float32)
        if per_token.shape != (n_resp,):
            raise ValueError(f"trajectory {trajectory.uid}: {per_token.shape[0]} per-token advantages for "
                             f"{n_resp} response tokens")
        adv[n_prompt:] = per_token
    zeros = [0.0] * n_prompt
    return TrainSample(
        input_ids=np.asarray(list(trajectory.prompt_ids) + list(trajectory.response_ids)),
        loss_mask=np.asarray(zeros + [float(m) for m in trajectory.response_mask]),
        images=list(trajectory.model_images),
        advantages=adv,
        rollout_logprobs=np.asarray(zeros + list(trajectory.rollout_logprobs)),
        uid=trajectory.uid,
    )


def sft_sample(processor: Any, example: SFTExample, codec: Any = None) -> TrainSample:
    """A :class:`TrainSample` from a supervised conversation (mask 1 on assistant tokens only).

    Uses the rollout's encoder (:func:`cv_ray.agent.chat.encode_sft`), so SFT trains on exactly the
    token layout the policy produces at rollout time. ``codec``: a ``ChatCodec`` to reuse.
    """
    from cv_ray.agent.chat import encode_sft

    ids, mask, _ = encode_sft(processor, example, codec)
    return TrainSample(input_ids=np.asarray(ids), loss_mask=np.asarray(mask), images=list(example.images),
                       uid=example.uid)


@dataclass
class ModelBatch:
    """Right-padded tensors of one micro-batch (``B`` sequences, ``T`` the longest length)."""

    inputs: dict[str, torch.Tensor]
    """The model's forward arguments: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` ``[B, T]``;
    ``pixel_values`` ``[patches, C*P*P]`` and ``image_grid_thw`` ``[images, 3]`` when there are images."""
    loss_mask: torch.Tensor
    """``[B, T]`` float32, 0 on padding."""
    advantages: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    lengths: list[int] = field(default_factory=list)

    def to(self, device: torch.device) -> ModelBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return ModelBatch({k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
                          move(self.loss_mask), move(self.advantages), move(self.rollout_logprobs),
                          move(self.old_logprobs), self.lengths)


def pad_rows(rows: Sequence[np.ndarray], length: int) -> torch.Tensor:
    """``[B, length]`` float32 from per-sequence arrays, right-padded with 0."""
    out = torch.zeros((len(rows), length), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(np.asarray(row, dtype=np.float32))  # a copy: Ray hands over read-only arrays
    return out


def collate(samples: Sequence[TrainSample], processor: Any, pad_id: int) -> ModelBatch:
    """Pad a micro-batch and encode its images. Raises ValueError on a placeholder/image mismatch."""
    from cv_ray.agent.chat import build_model_inputs

    if not samples:
        raise ValueError("empty micro-batch")
    inputs = build_model_inputs(processor, [s.input_ids.tolist() for s in samples], [s.images for s in samples],
                                pad_id=pad_id, padding_side="right")
    length = inputs["input_ids"].shape[1]
    has_rl = [s.advantages is not None for s in samples]
    if any(has_rl) and not all(has_rl):
        raise ValueError("a micro-batch mixes RL samples (with advantages) and SFT samples")
    has_rollout = all(s.rollout_logprobs is not None for s in samples)
    has_old = all(s.old_logprobs is not None for s in samples)
    return ModelBatch(
        inputs=inputs,
        loss_mask=pad_rows([s.loss_mask for s in samples], length),
        advantages=pad_rows([s.advantages for s in samples], length) if all(has_rl) else None,
        rollout_logprobs=pad_rows([s.rollout_logprobs for s in samples], length) if has_rollout else None,
        old_logprobs=pad_rows([s.old_logprobs for s in samples], length) if has_old else None,
        lengths=[len(s.input_ids) for s in samples],
    )
