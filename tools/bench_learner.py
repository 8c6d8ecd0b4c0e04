#!/usr/bin/env python
"""Benchmark of the DeepSpeed learner group: step time, tokens/s and weight-push time per ZeRO stage and rank count.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_learner.py [--json PATH]            # tiny model, CPU
    .venv/bin/python tools/bench_learner.py --model /ckpt/Qwen2.5-VL-3B-Instruct --device cuda \\
        --configs 3x1 --batch 8 --response-tokens 512 --json /tmp/bench_learner.json

For each ``STAGExRANKS`` configuration it starts a LearnerGroup (start-up time), runs one warm-up
SFT step, then ``--steps`` timed SFT steps and ``--steps`` timed RL steps (with a reference model,
kl_coef 0.001) on a fixed batch of ``--batch`` sequences (one ``--image-size`` image, a short prompt
and ``--response-tokens`` trained tokens each), and pushes the weights ``--steps`` times to a sink
actor (gather on the ranks, Ray object store, receiver reads every tensor). Prints a table; with
``--json`` also writes the figures. Without ``--model`` it builds the tiny Qwen2.5-VL model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from cv_ray.cluster import init_ray
from cv_ray.learner.batch import TrainSample
from cv_ray.learner.config import LearnerConfig, LossConfig
from cv_ray.learner.group import LearnerGroup


@ray.remote
class WeightSink:
    """Receives pushed weights the way a rollout worker does (Ray resolves the ref) and touches every byte."""

    def update_weights(self, named_tensors) -> int:
        nbytes = 0
        for tensor in named_tensors.values():
            tensor.sum()  # read it: Ray maps the received buffers lazily
            nbytes += tensor.numel() * tensor.element_size()
        return nbytes


def make_batch(processor, n: int, image_size: int, response_tokens: int, rl: bool, seed: int = 0) -> list[TrainSample]:
    rng = np.random.default_rng(seed)
    tok = processor.tokenizer
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    ordinary = np.array([i for i in range(len(tok)) if i not in special])
    samples = []
    for i in range(n):
        pixels = rng.integers(0, 255, size=(image_size, image_size, 3), dtype=np.uint8)
        text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is shown here<|im_end|>\n" \
               "<|im_start|>assistant\n"
        prompt = processor(text=[text], images=[Image.fromarray(pixels)], return_tensors="np")["input_ids"][0]
        response = rng.choice(ordinary, size=response_tokens).tolist()
        ids = prompt.tolist() + response
        mask = [0] * len(prompt) + [1] * len(response)
        extra = {}
        if rl:
            extra = {"advantages": np.where(np.asarray(mask) > 0, 1.0 if i % 2 else -1.0, 0.0),
                     "rollout_logprobs": np.zeros(len(ids))}
        samples.append(TrainSample(input_ids=ids, loss_mask=mask, images=[Image.fromarray(pixels)], uid=f"u{i // 2}",
                                   **extra))
    return samples


def _timed_push(group: LearnerGroup, sink) -> dict[str, float]:
    """The driver's weight push to one receiver: gather once into the object store, then load."""
    start = time.perf_counter()
    ref = group.gather_weights()
    gathered = time.perf_counter()
    ray.get(sink.update_weights.remote(ref))
    done = time.perf_counter()
    return {"push/gather_s": gathered - start, "push/total_s": done - start}


def bench_config(model: str, stage: int, ranks: int, args, processor) -> dict:
    on_gpu = args.device == "cuda"
    cfg = LearnerConfig(num_ranks=ranks, zero_stage=stage, gpus_per_rank=1.0 if on_gpu else 0.0, cpus_per_rank=1.0,
                        micro_batch_size=args.micro_batch, lr=1e-5, gradient_checkpointing=args.grad_ckpt,
                        loss=LossConfig(kl_coef=0.001))
    start = time.perf_counter()
    group = LearnerGroup(model, cfg, total_steps=1000)
    startup = time.perf_counter() - start
    try:
        sft = make_batch(processor, args.batch, args.image_size, args.response_tokens, rl=False)
        rl = make_batch(processor, args.batch, args.image_size, args.response_tokens, rl=True, seed=1)
        group.sft_step(sft)  # warm-up: first-call allocations and lazy initialisation
        sft_runs = [group.sft_step(sft) for _ in range(args.steps)]
        rl_runs = [group.rl_step(rl) for _ in range(args.steps)]
        sink = WeightSink.remote()
        ray.get(sink.update_weights.remote({}))  # the actor is up before the first timed push
        pushes = [_timed_push(group, sink) for _ in range(args.steps)]
        nbytes = ray.get(sink.update_weights.remote(group.gather_weights()))
        ray.kill(sink)
    finally:
        group.shutdown()
    return {
        "zero_stage": stage, "ranks": ranks, "startup_s": startup,
        "sft_step_s": statistics.median(m["sft/step_seconds"] for m in sft_runs),
        "sft_tokens_per_s": statistics.median(m["sft/tokens_per_s"] for m in sft_runs),
        "rl_step_s": statistics.median(m["rl/step_seconds"] for m in rl_runs),
        "rl_tokens_per_s": statistics.median(m["rl/tokens"] / m["rl/step_seconds"] for m in rl_runs),
        "push_gather_s": statistics.median(p["push/gather_s"] for p in pushes),
        "push_total_s": statistics.median(p["push/total_s"] for p in pushes),
        "weights_mb": nbytes / 2**20,
        "tokens_per_step": sft_runs[0]["sft/tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model directory (default: build the tiny Qwen2.5-VL)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--configs", default="0x1,2x1,3x1,0x2,2x2,3x2", help="comma-separated STAGExRANKS")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median reported)")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    from transformers import AutoProcessor

    from cv_ray.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny_model("qwen2_5_vl", Path(tmp) / "tiny"))
        processor = AutoProcessor.from_pretrained(model)
        init_ray(num_cpus=16)
        configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
        rows = [bench_config(model, stage, ranks, args, processor) for stage, ranks in configs]

    header = (f"{'ZeRO':>4} {'ranks':>5} {'start s':>8} {'SFT step s':>10} {'SFT tok/s':>10} {'RL step s':>9} "
              f"{'RL tok/s':>9} {'gather s':>8} {'push s':>7} {'MB':>7}")
    print(f"model={args.model or 'tiny qwen2_5_vl'} device={args.device} batch={args.batch} "
          f"tokens/step={rows[0]['tokens_per_step']:.0f}")
    print(header)
    for r in rows:
        print(f"{r['zero_stage']:>4} {r['ranks']:>5} {r['startup_s']:>8.1f} {r['sft_step_s']:>10.3f} "
              f"{r['sft_tokens_per_s']:>10.0f} {r['rl_step_s']:>9.3f} {r['rl_tokens_per_s']:>9.0f} "
              f"{r['push_gather_s']:>8.3f} {r['push_total_s']:>7.3f} {r['weights_mb']:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model or "tiny-qwen2_5_vl", "device": args.device,
                                               "batch": args.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
