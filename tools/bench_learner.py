#!/usr/bin/env python
"""Benchmark of the DeepSpeed learner group: step time, tokens/s and weight-push time per ZeRO stage and rank count;
and (``--memory``) the peak memory of the token log-probs of one long response, chunked and unchunked.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_learner.py [--json PATH]            # tiny model, CPU
    .venv/bin/python tools/bench_learner.py --model /ckpt/Qwen2.5-VL-3B-Instruct --device cuda \\
        --configs 3x1 --batch 8 --response-tokens 512 --json /tmp/bench_learner.json
    .venv/bin/python tools/bench_learner.py --memory --memory-tokens 1024,2048,8192 --chunks 0,1024

``--memory``: for each response length and ``learner.logprob_chunk_tokens`` value (0: the full
computation, the "before"), a fresh subprocess builds the tiny Qwen2.5-VL with a real-size vocabulary
(``--vocab``, 151,936) in float32 on CPU and runs one forward and backward of the SFT loss through
``sequence_logprobs`` on one text-only sequence (a 16-token prompt and the response). It reports
the peak resident set of that step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
also above the resident set before the step. A run must stay within ``--max-gb`` (default: the
machine's available memory less 2 GB) of extra address space: lengths run shortest first, a run that
a straight-line fit of the shorter ones puts above the limit is not started, and one that still
exceeds it stops with an allocation error (``RLIMIT_AS``) rather than wake the OOM killer on a
shared machine. Either is reported as not fitting, with the projection.

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
import os
import resource
import statistics
import subprocess
import sys
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


# ------------------------------------------------------------------------------------- memory

GIB = 2**30


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_step(model_dir: str, tokens: int, chunk: int, vocab: int, max_gb: float) -> dict:
    """One forward + backward of the SFT loss on one ``tokens``-long response (run in a fresh process)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from cv_ray.agent.chat import banned_token_ids
    from cv_ray.learner.batch import ModelBatch
    from cv_ray.learner.forward import sequence_logprobs
    from cv_ray.learner.losses import sft_loss

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    config.text_config.vocab_size = vocab
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.get_submodule("model.visual").requires_grad_(False)
    prompt = 16
    # Plain ids above the tiny tokenizer's special tokens: no image placeholder, nothing banned.
    ids = torch.randint(4096, vocab, (1, prompt + tokens))
    mask = torch.zeros((1, prompt + tokens))
    mask[0, prompt:] = 1.0
    batch = ModelBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "mm_token_type_ids": torch.zeros_like(ids)}, mask, lengths=[prompt + tokens])
    banned = banned_token_ids(model.config)

    # Past this much more address space the step fails with an allocation error (reported as not
    # fitting) instead of waking the OOM killer on a shared machine.
    limit = _status_kb("VmSize") * 1024 + int(max_gb * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS
    start = time.perf_counter()
    try:
        logp, entropy = sequence_logprobs(model, batch, 1.0, banned, chunk_tokens=chunk)
        loss, _ = sft_loss(logp, entropy, batch.loss_mask, float(mask.sum()))
        loss.backward()
    except (RuntimeError, MemoryError) as err:  # torch's "can't allocate memory" is a RuntimeError
        if "alloc" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return {"tokens": tokens, "chunk": chunk, "fits": False, "max_gb": max_gb}
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return {"tokens": tokens, "chunk": chunk, "fits": True, "seconds": seconds, "peak_gb": peak * 1024 / GIB,
            "step_gb": (peak - before) * 1024 / GIB, "rss_before_gb": before * 1024 / GIB,
            "loss": float(loss.detach())}


def bench_memory(args) -> list[dict]:
    """Each (length, chunk) in its own subprocess, so no run inherits another's heap."""
    from cv_ray.models.tiny import build_tiny_model

    if args.max_gb <= 0:
        available_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                            if line.startswith("MemAvailable:"))
        args.max_gb = available_kb * 1024 / GIB - 2.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(args.model or build_tiny_model("qwen2_5_vl", Path(tmp) / "tiny"))
        for tokens in sorted(int(t) for t in args.memory_tokens.split(",")):
            for chunk in (int(c) for c in args.chunks.split(",")):
                projected = _projection(rows, chunk, tokens)
                if projected is not None and projected > args.max_gb:
                    # Not started: the shorter lengths already show it would not fit.
                    rows.append({"tokens": tokens, "chunk": chunk, "fits": False, "max_gb": args.max_gb,
                                 "projected_step_gb": projected})
                    print(rows[-1], flush=True)
                    continue
                cmd = [sys.executable, __file__, "--memory-child", model_dir, "--memory-tokens", str(tokens),
                       "--chunks", str(chunk), "--vocab", str(args.vocab), "--max-gb", f"{args.max_gb:.2f}"]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    return rows


def _projection(rows: list[dict], chunk: int, tokens: int) -> float | None:
    """Least-squares line through the step memory of the lengths that fitted, at ``tokens``."""
    points = [(r["tokens"], r["step_gb"]) for r in rows if r["chunk"] == chunk and r["fits"]]
    if len(points) < 2:
        return None
    slope, intercept = np.polyfit(*zip(*points), 1)
    return float(slope * tokens + intercept)


def print_memory(rows: list[dict], args) -> None:
    print(f"vocab={args.vocab} float32 CPU, one sequence of 16 prompt + N response tokens, SFT forward+backward")
    print(f"{'tokens':>7} {'chunk':>6} {'peak GB':>8} {'step GB':>8} {'seconds':>8}")
    for r in rows:
        if r["fits"]:
            print(f"{r['tokens']:>7} {r['chunk']:>6} {r['peak_gb']:>8.2f} {r['step_gb']:>8.2f} {r['seconds']:>8.1f}")
        else:
            guess = _projection(rows, r["chunk"], r["tokens"])
            note = f"; projected step GB {guess:.1f} (a line through the lengths that fitted)" if guess else ""
            started = "not started" if "projected_step_gb" in r else "ran out"
            print(f"{r['tokens']:>7} {r['chunk']:>6} {'> ' + format(r['max_gb'], '.1f'):>8} {'-':>8} {'-':>8}  "
                  f"does not fit in --max-gb ({started}){note}")


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
    parser.add_argument("--memory", action="store_true", help="measure the log-prob memory instead (see above)")
    parser.add_argument("--memory-tokens", default="1024,2048,8192", help="comma-separated response lengths")
    parser.add_argument("--chunks", default="0,1024", help="comma-separated logprob_chunk_tokens (0: unchunked)")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size of the --memory model")
    parser.add_argument("--max-gb", type=float, default=0.0,
                        help="--memory: most GB a run may add (default: available memory less 2 GB)")
    parser.add_argument("--memory-child", default="", help=argparse.SUPPRESS)  # one run, in a fresh process
    args = parser.parse_args()

    if args.memory_child:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(memory_step(args.memory_child, int(args.memory_tokens), int(args.chunks), args.vocab,
                                     args.max_gb)))
        return
    if args.memory:
        rows = bench_memory(args)
        print_memory(rows, args)
        if args.json:
            Path(args.json).write_text(json.dumps({"vocab": args.vocab, "device": "cpu", "rows": rows}, indent=2))
        return

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
