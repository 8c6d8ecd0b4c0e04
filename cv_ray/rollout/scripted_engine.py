"""An engine that replays scripted assistant turns with a fixed per-token latency.

Used by ``tools/bench_rollout.py`` (to measure how well tool calls hide behind generation without
a GPU) and by tests (to drive the agent loop through known conversations). Turn ``k`` of every
trajectory emits ``turns[k]`` tokenized by the model's tokenizer, then the end-of-turn token; the
turn index is read from the request itself (the number of generation prompts in its context), so
one engine serves many concurrent trajectories. Latency models one saturated device: it emits one
token every ``seconds_per_token`` for one request at a time, in arrival order (an asyncio lock
held while sleeping), so every extra request adds generation time, as on a busy GPU, and a
trajectory in the sandbox costs the device nothing. Log-probs are a constant placeholder (this
engine has no model). It has no weights either, but it keeps a weight version like the real
engines: ``update_weights`` ignores the tensors and sets the version, and each turn reports the
version it started under (what the asynchronous loop's tests and ``tools/bench_async.py`` need).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cv_ray.agent.chat import ChatCodec
from cv_ray.agent.generation import Engine, GenerationOutput, GenerationRequest

SCRIPTED_LOGPROB = -1.0


class ScriptedEngine(Engine):
    def __init__(self, codec: ChatCodec, turns: Sequence[str], seconds_per_token: float = 0.0):
        self.codec = codec
        self.turn_ids = [codec.tokenizer.encode(text, add_special_tokens=False) for text in turns]
        self.seconds_per_token = seconds_per_token
        self._prompt_marker = codec.tokenizer.encode(codec.generation_prompt, add_special_tokens=False)
        self._device = asyncio.Lock()
        self.weight_version = 0

    def _turn_index(self, ids: list[int]) -> int:
        marker, n = self._prompt_marker, len(self._prompt_marker)
        return sum(1 for i in range(len(ids) - n + 1) if ids[i:i + n] == marker) - 1

    async def _one(self, request: GenerationRequest) -> GenerationOutput:
        turn = self._turn_index(request.prompt_ids)
        if not 0 <= turn < len(self.turn_ids):
            raise ValueError(f"the script has {len(self.turn_ids)} turns; asked for turn {turn}")
        ids = self.turn_ids[turn] + [self.codec.end_of_turn_id]
        limit = request.sampling.max_new_tokens
        finish = "stop" if len(ids) <= limit else "length"
        ids = ids[:limit]
        if not self.seconds_per_token:
            return GenerationOutput(ids, [SCRIPTED_LOGPROB] * len(ids), finish, self.weight_version)
        async with self._device:
            version = self.weight_version  # the turn is "generated" under the weights it starts with
            await asyncio.sleep(self.seconds_per_token * len(ids))
        return GenerationOutput(ids, [SCRIPTED_LOGPROB] * len(ids), finish, version)

    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int | None = None) -> int:
        """Nothing to load (the tensors are ignored); only the version moves, as on a real engine."""
        self.weight_version = self.weight_version + 1 if version is None else version
        return self.weight_version

    def describe(self) -> dict[str, object]:
        return {"engine": "scripted", "turns": len(self.turn_ids), "seconds_per_token": self.seconds_per_token,
                "weight_version": self.weight_version}


@dataclass(frozen=True)
class ScriptedEngineFactory:
    """Builds a :class:`ScriptedEngine` inside a rollout worker: ``RolloutGroup(..., engine_factory=...)``
    (a picklable stand-in for ``make_engine``, for the asynchronous loop's benchmark and tests)."""

    turns: tuple[str, ...]
    seconds_per_token: float = 0.0

    def __call__(self, model: Any, cfg: Any, codec: ChatCodec) -> ScriptedEngine:
        return ScriptedEngine(codec, self.turns, self.seconds_per_token)
