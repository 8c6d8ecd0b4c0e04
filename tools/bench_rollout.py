#!/usr/bin/env python
"""Benchmark of the rollout: do tool calls hide behind generation, and how fast is the HF engine?

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_rollout.py
    .venv/bin/python tools/bench_rollout.py --trajectories 32 --ms-per-token 1 --json /tmp/bench_rollout.json

Part 1 (overlap). ``--trajectories`` agent loops run at once with a ScriptedEngine of fixed
per-token latency (one saturated device emitting a token every ``ms_per_token``, serving requests
in arrival order) and the real sandbox (a local SandboxPool of ``--workers`` zygotes). The script is
three tool turns (rotate, crop, contrast) and an answer. Three runs of the same batch:

* generation only: tool calls answered at once in-process (no sandbox);
* tools only: the engine answers at once (0 ms per token), the real sandbox runs every call;
* both: the real engine latency and the real sandbox.

Target: ``both <= 1.15 x max(generation only, tools only)``: the tools hide behind generation.

Part 2 (HF engine throughput). Sampled tokens per second of the HF engine on the tiny
Qwen2.5-VL model (CPU here), one request alone and ``--trajectories`` requests batched into one
padded ``generate`` call, ``--new-tokens`` tokens each (no stop token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cv_ray.agent.chat import ChatCodec
from cv_ray.agent.config import LoopSettings
from cv_ray.agent.generation import GenerationRequest, SamplingParams
from cv_ray.agent.loop import AgentLoop
from cv_ray.agent.tool_format import format_tool_call
from cv_ray.agent.tool_runner import LocalToolRunner
from cv_ray.models.tiny import ensure_tiny_model
from cv_ray.rollout.hf_engine import HFEngine
from cv_ray.rollout.metrics import batch_metrics
from cv_ray.rollout.scripted_engine import ScriptedEngine
from cv_ray.sandbox import SandboxPool
from cv_ray.sandbox.config import SandboxConfig
from cv_ray.types import ExecResult, Task

SCRIPT = [
    "<think>The text is upside down, so I turn the image first.</think>"
    + format_tool_call("result = image.transpose(Image.ROTATE_180)", 0, "fix orientation"),
    "<think>Now zoom into the top left corner.</think>"
    + format_tool_call("w, h = image.size\nresult = image.crop((0, 0, w // 2, h // 2))", 1, "zoom"),
    "<think>It is dark; raise the contrast.</think>"
    + format_tool_call("result = ImageEnhance.Contrast(image).enhance(1.8)", 2, "contrast"),
    "<think>The number is 42.</think><answer>42</answer>",
]


class InstantTools:
    """Answers every call at once with the input image (the generation-only baseline)."""

    async def run(self, code, images, image_index=0, session_id=None) -> ExecResult:
        image = images[image_index]
        return ExecResult(ok=True, image=image, to_input=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])

    def close_session(self, session_id: str) -> None:
        return None


def make_tasks(n: int, size: int) -> list[Task]:
    rng = np.random.default_rng(0)
    return [Task(uid=f"bench{i}", data_source="bench", question="What number is written?",
                 images=[Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))], answer="42")
            for i in range(n)]


def timed_batch(engine, codec, tools, cfg, tasks) -> tuple[float, dict[str, float]]:
    loop = AgentLoop(engine, codec, tools, cfg)
    started = time.perf_counter()
    trajectories = asyncio.run(loop.run_many(tasks, n_samples=1))
    wall = time.perf_counter() - started
    bad = [t.stop_reason for t in trajectories if t.stop_reason != "answer" or t.metrics["tool_errors"]]
    if bad:
        raise RuntimeError(f"the scripted episodes did not run cleanly: {bad[:3]}")
    return wall, batch_metrics(trajectories, wall)


def hf_tokens_per_second(model_dir: Path, batch: int, new_tokens: int, image_size: int) -> float:
    engine = HFEngine(str(model_dir), max_batch_size=max(batch, 1))
    codec = ChatCodec(engine.processor)
    image = make_tasks(1, image_size)[0].images[0]
    prompt = codec.encode_prompt("What number is written?", [image])
    sampling = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, stop_token_ids=(),
                              banned_token_ids=tuple(codec.banned_ids))
    requests = [GenerationRequest(prompt.ids, [image], sampling) for _ in range(batch)]
    asyncio.run(engine.generate(requests[:1]))  # warm-up
    started = time.perf_counter()
    outputs = asyncio.run(engine.generate(requests))
    wall = time.perf_counter() - started
    return sum(len(o.token_ids) for o in outputs) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=32)
    parser.add_argument("--ms-per-token", type=float, default=1.0, help="scripted engine latency per token")
    parser.add_argument("--workers", type=int, default=2, help="sandbox zygotes")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per request in the HF throughput part")
    parser.add_argument("--work-dir", type=str, default=".cache/bench-rollout")
    parser.add_argument("--json", type=str, default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)

    model_dir = ensure_tiny_model("qwen2_5_vl", Path(args.work_dir) / "tiny-qwen2_5_vl")
    from transformers import AutoProcessor

    codec = ChatCodec(AutoProcessor.from_pretrained(model_dir))
    cfg = LoopSettings(max_turns=len(SCRIPT), max_new_tokens_per_turn=256,
                       max_concurrent_trajectories=args.trajectories)
    tasks = make_tasks(args.trajectories, args.image_size)
    latency = args.ms_per_token / 1000.0

    with SandboxPool(SandboxConfig(workers_per_executor=args.workers, timeout_s=10.0)) as pool:
        sandbox = LocalToolRunner(pool)
        timed_batch(ScriptedEngine(codec, SCRIPT), codec, sandbox, cfg, tasks[:2])  # warm-up
        generation_only, _ = timed_batch(ScriptedEngine(codec, SCRIPT, latency), codec, InstantTools(), cfg, tasks)
        tools_only, tools_metrics = timed_batch(ScriptedEngine(codec, SCRIPT), codec, sandbox, cfg, tasks)
        both, both_metrics = timed_batch(ScriptedEngine(codec, SCRIPT, latency), codec, sandbox, cfg, tasks)
    ratio = both / max(generation_only, tools_only)

    hf_single = hf_tokens_per_second(model_dir, 1, args.new_tokens, args.image_size)
    hf_batched = hf_tokens_per_second(model_dir, args.trajectories, args.new_tokens, args.image_size)

    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "trajectories": args.trajectories,
        "ms_per_token": args.ms_per_token,
        "tool_calls": both_metrics["rollout/tool_calls"],
        "sampled_tokens": both_metrics["rollout/sampled_tokens"],
        "generation_only_s": generation_only,
        "tools_only_s": tools_only,
        "both_s": both,
        "overlap_ratio": ratio,
        "overlap_target": 1.15,
        "sandbox_seconds_per_call": tools_metrics["rollout/tool_s"] / max(tools_metrics["rollout/tool_calls"], 1),
        "hf_tokens_per_s_single": hf_single,
        "hf_tokens_per_s_batched": hf_batched,
        "hf_new_tokens": args.new_tokens,
    }
    print(f"rollout benchmark on {figures['machine']}")
    print(f"{'run':<34}{'seconds':>10}")
    print(f"{'generation only':<34}{generation_only:>10.3f}")
    print(f"{'tools only (real sandbox)':<34}{tools_only:>10.3f}")
    print(f"{'both':<34}{both:>10.3f}")
    print(f"{'both / max(gen, tools)':<34}{ratio:>10.3f}   (target <= 1.15: {'met' if ratio <= 1.15 else 'MISSED'})")
    print(f"{'tool calls / sampled tokens':<34}{int(figures['tool_calls']):>5} / {int(figures['sampled_tokens'])}")
    print(f"{'HF engine tokens/s, 1 request':<34}{hf_single:>10.1f}")
    print(f"{f'HF engine tokens/s, {args.trajectories} batched':<34}{hf_batched:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
