"""The generation interface the agent loop drives: token-in/token-out with images.

An engine receives the full token context of a trajectory (prompt and response so far, image
placeholders already expanded) with that trajectory's model images, and returns the sampled ids and
their log-probs, computed with :func:`cv_ray.logprobs.token_logprobs` under the same temperature and
the same banned placeholder ids the learner uses (so the on-policy importance ratio is exactly 1).
The agent layer owns this contract; the engines that implement it live in ``cv_ray.rollout``
(:class:`~cv_ray.rollout.hf_engine.HFEngine`, :class:`~cv_ray.rollout.vllm_engine.VLLMEngine`, the
benchmarks' :class:`~cv_ray.rollout.scripted_engine.ScriptedEngine`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    """0 is greedy (scored as temperature 1, see cv_ray.logprobs)."""
    top_p: float = 1.0
    """Nucleus sampling; log-probs are still those of the full tempered distribution (what the
    learner recomputes), not of the truncated one."""
    max_new_tokens: int = 1024
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a request ends after sampling any of these (it is kept in the output)."""
    banned_token_ids: tuple[int, ...] = ()
    """Never sampled (logits masked to -inf); the same ids are masked when scoring."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    """The whole context: prompt plus response so far, image placeholders expanded."""
    images: list[Image.Image]
    """The model images whose placeholders appear in ``prompt_ids``, in order."""
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationOutput:
    token_ids: list[int]
    """Sampled ids, including the stop token when one was sampled."""
    logprobs: list[float]
    """Per sampled id: ``token_logprobs`` of the raw logits under the request's temperature and bans."""
    finish_reason: str
    """``stop`` (a stop token was sampled) or ``length`` (max_new_tokens reached)."""
    weight_version: int = 0
    """The engine's weight version that generated every id of this output (see
    :attr:`Engine.weight_version`): an output is generated under one version; the next turn of the
    same trajectory may be generated under a newer one."""


class Engine(abc.ABC):
    """Asynchronous generation with log-probs, and in-place weight updates.

    ``weight_version`` names the weights loaded: 0 for the checkpoint the engine started from, then
    what each ``update_weights`` sets. Weights change only between generation calls, never inside
    one, and every output reports the version it was generated under.
    """

    weight_version: int = 0

    @abc.abstractmethod
    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """One output per request, in order. Concurrent calls may be served in one batch."""

    @abc.abstractmethod
    async def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int | None = None) -> int:
        """Load new weights (HF state-dict names of the ``*ForConditionalGeneration`` model, a subset is
        fine) and return the new weight version: ``version`` when given (the learner's policy version,
        which the driver passes so that a resumed run or a restarted worker counts like the learner),
        else the previous version + 1."""

    def describe(self) -> dict[str, object]:
        """What the health check reports (no generation)."""
        return {"engine": type(self).__name__}
