"""The multi-turn agent loop: generate, parse tool calls, run them in the sandbox, append, repeat.

Engine-agnostic and asynchronous: :meth:`AgentLoop.run_many` runs every sample of a batch as an
asyncio task, so while one trajectory waits for the sandbox the others keep generating (and the
engine batches whatever is waiting). Token accounting follows cv_ray.agent.chat: sampled ids are
appended verbatim (mask 1, with their rollout log-probs and the weight version that sampled them),
everything else is rendered by the chat template and appended with mask 0 (version -1); earlier
turns are never re-rendered. Weights may change between two turns of an episode (asynchronous RL):
each turn records its own version.

Per turn: the model's text is parsed (cv_ray.agent.tool_parser); every tool-call block is answered
by one tool message, in order (bad calls get an error message and a counted class; good calls run
in the sandbox on the full-resolution image they name). A tool's output image is kept at full
resolution in ``Trajectory.images`` and a resized copy within the configured pixel range goes to the
model. The episode stops on a turn without a tool call (``answer`` when it holds ``<answer>``,
else ``no_tool_call``), at ``max_turns`` (a call in the last allowed turn is not executed), or at the
token budget (``max_tokens``): a turn cut by its length, or a tool response that would overflow the
budget, which is then appended as text only, cut to the budget, its images and placeholders dropped.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections import Counter
from dataclasses import replace
from typing import Any

from PIL import Image

from cv_ray.agent.chat import ChatCodec
from cv_ray.agent.config import LoopSettings
from cv_ray.agent.generation import Engine, GenerationRequest, SamplingParams, mix_seeds
from cv_ray.agent.model_images import resize_for_model
from cv_ray.agent.prompts import NO_TOOL_SYSTEM_PROMPT
from cv_ray.agent.tool_format import tool_error_content, tool_response_content
from cv_ray.agent.tool_parser import parse_tool_calls
from cv_ray.agent.tool_runner import ToolRunner
from cv_ray.geometry import compose, identity
from cv_ray.types import Task, ToolCallRecord, Trajectory


def _text_only(content: Any) -> str:
    """A tool message's content without its image parts (for a response cut by the token budget)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


class _Episode:
    """The growing state of one trajectory."""

    def __init__(self, task: Task, sample_index: int, prompt_ids: list[int]):
        self.task = task
        self.sample_index = sample_index
        self.prompt_ids = prompt_ids
        self.response_ids: list[int] = []
        self.response_mask: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.images: list[Image.Image] = list(task.images)
        self.model_images: list[Image.Image] = list(task.images)
        self.image_parent: list[int | None] = [None] * len(task.images)
        # Image 0 is the origin; other task images are not views of it.
        self.image_to_origin: list[Any] = [identity()] + [None] * (len(task.images) - 1)
        self.tool_calls: list[ToolCallRecord] = []
        self.texts: list[str] = []
        self.num_turns = 0
        self.generation_s = 0.0
        self.tool_s = 0.0
        self.truncated_tool_response = False

    def append(self, ids: list[int], sampled: bool, logprobs: list[float] | None = None, version: int = -1) -> None:
        """Append ``ids``: sampled ones with their log-probs and the weight version that sampled them,
        inserted ones (tool responses, separators) with mask 0, log-prob 0 and version -1."""
        self.response_ids += ids
        self.response_mask += [1 if sampled else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.versions += [version if sampled else -1] * len(ids)

    def add_tool_image(self, image: Image.Image, parent: int, to_input: Any) -> int:
        self.images.append(image)
        self.image_parent.append(parent)
        parent_map = self.image_to_origin[parent]
        self.image_to_origin.append(compose(parent_map, to_input) if parent_map is not None and to_input else None)
        return len(self.images) - 1

    def finish(self, stop_reason: str) -> Trajectory:
        errors = Counter(
            c.parse_error_class if not c.parsed else (c.result.error_class or "unknown")
            for c in self.tool_calls if not c.ok
        )
        metrics = {
            "generation_s": self.generation_s,
            "tool_s": self.tool_s,
            "tool_calls": float(len(self.tool_calls)),
            "tool_errors": float(sum(errors.values())),
            "response_tokens": float(len(self.response_ids)),
            "sampled_tokens": float(sum(self.response_mask)),
            "truncated_tool_response": float(self.truncated_tool_response),
            **{f"tool_errors/{name}": float(count) for name, count in sorted(errors.items())},
        }
        return Trajectory(
            uid=self.task.uid, sample_index=self.sample_index, prompt_ids=self.prompt_ids,
            response_ids=self.response_ids, response_mask=self.response_mask, rollout_logprobs=self.logprobs,
            images=self.images, model_images=self.model_images, image_to_origin=self.image_to_origin,
            image_parent=self.image_parent, tool_calls=self.tool_calls, response_text="\n".join(self.texts),
            turn_texts=list(self.texts),
            num_turns=self.num_turns, stop_reason=stop_reason, metrics=metrics, token_versions=self.versions,
        )


class AgentLoop:
    """Runs episodes; ``use_tools=False`` runs tool-free ones (no schema in the prompt, one turn)."""

    def __init__(self, engine: Engine, codec: ChatCodec, tools: ToolRunner, cfg: LoopSettings):
        self.engine = engine
        self.codec = codec
        self.plain_codec = ChatCodec(codec.processor, system_prompt=NO_TOOL_SYSTEM_PROMPT, tools=())
        self.tools = tools
        self.cfg = cfg
        tokenizer = codec.tokenizer
        stops = {codec.end_of_turn_id}
        end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if end_of_text is not None and end_of_text != tokenizer.unk_token_id:
            stops.add(int(end_of_text))
        self._stop_ids = tuple(sorted(stops))

    def sampling(self, max_new_tokens: int, temperature: float, seed: int | None = None) -> SamplingParams:
        return SamplingParams(temperature=temperature, top_p=self.cfg.top_p, max_new_tokens=max_new_tokens,
                              stop_token_ids=self._stop_ids, banned_token_ids=tuple(self.codec.banned_ids),
                              seed=seed)

    async def run_many(self, tasks: list[Task], n_samples: int, temperature: float | None = None,
                       use_tools: bool = True, seed: int | None = None) -> list[Trajectory]:
        """``n_samples`` trajectories per task, task-major (task 0's samples first), run concurrently.

        ``temperature`` overrides the configured one (e.g. 0 for greedy validation). ``seed`` seeds every
        turn of every episode (from the seed, the task's uid, the sample index and the turn), so a
        batch re-run with the same weights samples the same tokens where the engine can (see
        ``SamplingParams.seed``); None leaves sampling to the engine's random state.
        """
        limit = asyncio.Semaphore(self.cfg.max_concurrent_trajectories)

        async def one(task: Task, k: int) -> Trajectory:
            async with limit:
                episode_seed = None if seed is None else mix_seeds(seed, task.uid, k)
                return await self.run(task, k, temperature, use_tools, seed=episode_seed)

        return list(await asyncio.gather(*(one(task, k) for task in tasks for k in range(n_samples))))

    async def run(self, task: Task, sample_index: int = 0, temperature: float | None = None,
                  use_tools: bool = True, seed: int | None = None) -> Trajectory:
        if not task.images:
            raise ValueError(f"task {task.uid} has no image")
        codec = self.codec if use_tools else self.plain_codec
        prompt = codec.encode_prompt(task.question, task.images)
        episode = _Episode(task, sample_index, prompt.ids)
        session_id = f"{task.uid}/{sample_index}/{uuid.uuid4().hex[:8]}"
        temperature = self.cfg.temperature if temperature is None else temperature
        try:
            stop_reason = await self._turns(episode, session_id, temperature, use_tools, seed)
        finally:
            if use_tools:
                closing = self.tools.close_session(session_id)
                if inspect.isawaitable(closing):
                    await closing
        return episode.finish(stop_reason)

    async def _turns(self, ep: _Episode, session_id: str, temperature: float, use_tools: bool,
                     seed: int | None) -> str:
        cfg, codec = self.cfg, self.codec
        for turn in range(cfg.max_turns):
            budget = cfg.max_response_tokens - len(ep.response_ids)
            if budget <= 0:
                return "max_tokens"
            request = GenerationRequest(ep.prompt_ids + ep.response_ids, list(ep.model_images),
                                        self.sampling(min(cfg.max_new_tokens_per_turn, budget), temperature,
                                                      None if seed is None else mix_seeds(seed, turn)))
            started = time.perf_counter()
            (out,) = await self.engine.generate([request])
            ep.generation_s += time.perf_counter() - started
            ep.num_turns += 1
            ep.append(out.token_ids, sampled=True, logprobs=out.logprobs, version=out.weight_version)
            stopped = out.finish_reason == "stop"
            text = codec.decode(out.token_ids[:-1] if stopped else out.token_ids)
            ep.texts.append(text)
            if not stopped:
                return "max_tokens"
            if out.token_ids[-1] != codec.end_of_turn_id:
                # Another stop token (e.g. <|endoftext|>) ends the whole episode.
                return "answer" if "<answer>" in text else "no_tool_call"
            ep.append(list(codec.separator_ids), sampled=False)
            calls = parse_tool_calls(text) if use_tools else []
            if not calls:
                return "answer" if "<answer>" in text else "no_tool_call"
            if turn == cfg.max_turns - 1:
                return "max_turns"
            contents, new_images = await self._run_calls(ep, turn, calls, session_id)
            messages = [{"role": "tool", "content": content} for content in contents]
            segment = codec.encode_after_assistant(messages, new_images)
            room = cfg.max_response_tokens - len(ep.response_ids)
            if len(segment.ids) > room:
                text_only = [{"role": "tool", "content": _text_only(content)} for content in contents]
                ep.append(codec.encode_after_assistant(text_only, []).ids[:room], sampled=False)
                ep.truncated_tool_response = True
                return "max_tokens"
            ep.append(segment.ids, sampled=False)
            ep.model_images += new_images
        return "max_turns"

    async def _run_calls(self, ep: _Episode, turn: int, calls, session_id: str):
        """Answer every call of a turn in order: tool message contents and the new model images."""
        contents: list[Any] = []
        new_images: list[Image.Image] = []
        for call in calls:
            if not call.ok:
                ep.tool_calls.append(ToolCallRecord(turn=turn, parsed=False, parse_error_class=call.error_class,
                                                    payload=call.payload))
                contents.append(tool_error_content(call.error))
                continue
            started = time.perf_counter()
            result = await self.tools.run(call.code, list(ep.images), call.image_index, session_id)
            ep.tool_s += time.perf_counter() - started
            output_index = None
            if result.ok and result.image is not None:
                output_index = ep.add_tool_image(result.image, call.image_index, result.to_input)
                new_images.append(resize_for_model(result.image, self.cfg.tool_image_min_pixels,
                                                   self.cfg.tool_image_max_pixels))
            contents.append(tool_response_content(result, output_index))
            ep.tool_calls.append(ToolCallRecord(turn=turn, parsed=True, code=call.code, description=call.description,
                                                payload=call.payload, image_index=call.image_index,
                                                output_index=output_index, result=replace(result, image=None)))
        return contents, new_images
