"""Benchmark of the reward: dense-reward throughput per worker, and judge-path latency.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_reward.py [--json PATH] [--repeats 5]

1. Dense reward for one RL batch of 64 tasks x 8 samples, no judge, in one process (= one reward
   worker): ``score_group`` with verdicts decided inside by the answer rules (mixed task types:
   ocr, count, choice, general, numeric math), with verdicts given, and with the trajectory ->
   outcome reduction included, and that last case with ``reward.reference_compat`` (ops read from
   each call's code). Reported in samples per second (target: >= 10,000).
2. The judge path against the local stub judge (tools/judge_stub_server.py, real HTTP on
   127.0.0.1): one request at a time (latency p50/p95), a batch of distinct requests at the
   configured concurrency (throughput), and cache hits.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from judge_stub_server import JudgeStubServer

from cv_ray.geometry import identity
from cv_ray.reward.config import JudgeConfig, RewardConfig
from cv_ray.reward.dense import score_group
from cv_ray.reward.judge import JudgeClient, JudgeRequest
from cv_ray.reward.outcome import outcome_from_trajectory
from cv_ray.reward.reference_tools import read_code
from cv_ray.types import ExecResult, Task, ToolCallRecord, Trajectory

N_TASKS, N_SAMPLES = 64, 8
TASK_KINDS = [("ocr", "hello world", None), ("count", "7", None), ("choice", "B", ["cat", "dog", "cow"]),
              ("general", "paris", None), ("math", "3/4", None)]
OP_CHOICES = [[], [{"op": "rotate_90"}], [{"op": "crop", "box": [10, 10, 60, 60]}],
              [{"op": "rotate_90"}, {"op": "crop", "box": [5, 5, 40, 50]}],
              [{"op": "contrast_up", "factor": 1.5, "changed": True}], [{"op": "flip_horizontal"}]]
#: The code of a call, per op choice above: what the reference-compatible reward reads ops from.
CODE = ["result = image.copy()", "result = image.rotate(90, expand=True)", "result = image.crop((10, 10, 60, 60))",
        "r = image.rotate(90, expand=True)\nx1, y1 = 5, 5\nresult = r.crop((x1, y1, 40, 50))",
        "result = ImageEnhance.Contrast(image).enhance(1.5)", "result = ImageOps.mirror(image)"]
ANSWERS = {"ocr": ["Hello World", "hello word"], "count": ["7", "There are 8"], "choice": ["(B)", "cat"],
           "general": ["Paris", "London"], "math": ["0.75", "0.7"]}


def make_batch(rng: random.Random) -> list[tuple[Task, list[Trajectory]]]:
    batch = []
    for t in range(N_TASKS):
        task_type, answer, choices = TASK_KINDS[t % len(TASK_KINDS)]
        task = Task(uid=f"t{t}", data_source="bench", question="q?", images=[], answer=answer, choices=choices,
                    required_ops=rng.choice([[], ["rotate_90"], ["crop"], ["rotate_90", "crop"]]),
                    answer_box=[0.0, 0.0, 50.0, 50.0], task_type=task_type)
        trajectories = []
        for s in range(N_SAMPLES):
            # every call's code distinct (a comment), so that compat reads each one: no cache hits
            codes = [(k, f"{CODE[k]}  # {t}-{s}-{i}")
                     for i, k in enumerate(rng.sample(range(len(OP_CHOICES)), rng.randint(0, 3)))]
            calls = [ToolCallRecord(turn=i, parsed=True, code=code, image_index=0, output_index=i + 1,
                                    payload=json.dumps({"name": "code_image_tool",
                                                        "arguments": {"code": code, "image_index": 0}}),
                                    result=ExecResult(ok=True, ops=OP_CHOICES[k], to_input=identity()))
                     for i, (k, code) in enumerate(codes)]
            text = f"<think>step {s}</think>" + "<tool_call>{}</tool_call><think>ok</think>" * len(calls)
            text += f"<answer>{rng.choice(ANSWERS[task_type])}</answer>"
            trajectories.append(Trajectory(
                uid=task.uid, sample_index=s, prompt_ids=[], response_ids=[], response_mask=[], rollout_logprobs=[],
                images=[], model_images=[], image_to_origin=[identity()] * (len(calls) + 1),
                image_parent=[None] + [0] * len(calls), tool_calls=calls, response_text=text))
        batch.append((task, trajectories))
    return batch


def bench_dense(repeats: int) -> list[dict]:
    cfg, compat = RewardConfig(), RewardConfig(reference_compat=True)
    batch = make_batch(random.Random(0))
    undecided = [(task, [outcome_from_trajectory(t) for t in trajs]) for task, trajs in batch]
    decided = [(task, [dataclasses.replace(o, correct=i % 2 == 0) for i, o in enumerate(outs)])
               for task, outs in undecided]
    cases = {
        "score_group, verdicts by the rules": lambda: [score_group(t, o, cfg) for t, o in undecided],
        "score_group, verdicts given": lambda: [score_group(t, o, cfg) for t, o in decided],
        "outcome_from_trajectory + score_group": lambda: [
            score_group(t, [outcome_from_trajectory(x) for x in trajs], cfg) for t, trajs in batch],
        "the same, reward.reference_compat": lambda: read_code.cache_clear() or [
            score_group(t, [outcome_from_trajectory(x) for x in trajs], compat) for t, trajs in batch],
    }
    rows = []
    n = N_TASKS * N_SAMPLES
    for name, run in cases.items():
        run()  # warm-up (imports, regex caches)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        best = min(seconds)
        rows.append({"case": name, "samples": n, "batch_ms_best": best * 1e3,
                     "batch_ms_median": statistics.median(seconds) * 1e3, "samples_per_s": n / best})
    return rows


async def _judge_bench(base_url: str, n_sequential: int, n_batch: int, concurrency: int) -> dict:
    client = JudgeClient(JudgeConfig(enabled=True, base_url=base_url, max_concurrency=concurrency, timeout_s=5.0))
    latencies = []
    for i in range(n_sequential):
        start = time.perf_counter()
        await client.judge(JudgeRequest("ocr", f"seq {i}", "stop sign", "stop"))
        latencies.append(time.perf_counter() - start)
    requests = [JudgeRequest("general", f"batch {i}", "a", "a") for i in range(n_batch)]
    start = time.perf_counter()
    await client.judge_many(requests)
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    await client.judge_many(requests)  # all cached now
    cached_s = time.perf_counter() - start
    await client.aclose()
    latencies.sort()
    return {"sequential_requests": n_sequential, "latency_ms_p50": statistics.median(latencies) * 1e3,
            "latency_ms_p95": latencies[int(0.95 * (len(latencies) - 1))] * 1e3,
            "batch_requests": n_batch, "batch_concurrency": concurrency, "batch_s": batch_s,
            "batch_requests_per_s": n_batch / batch_s, "cached_us_per_request": cached_s / n_batch * 1e6,
            "failures": client.stats["failures"]}


def bench_judge() -> dict:
    with JudgeStubServer("ok") as server:
        return asyncio.run(_judge_bench(server.base_url, n_sequential=100, n_batch=256, concurrency=16))


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the dense reward and the judge path.")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each dense case (best is reported)")
    args = parser.parse_args()

    dense = bench_dense(args.repeats)
    print(f"Dense reward, {N_TASKS} tasks x {N_SAMPLES} samples, one process (no judge)")
    print(f"{'case':42s} {'batch ms (best)':>16s} {'median':>8s} {'samples/s':>11s}")
    for row in dense:
        print(f"{row['case']:42s} {row['batch_ms_best']:16.1f} {row['batch_ms_median']:8.1f} "
              f"{row['samples_per_s']:11.0f}")
    judge = bench_judge()
    print("\nJudge path against the local stub server (real HTTP, 127.0.0.1)")
    print(f"one at a time: p50 {judge['latency_ms_p50']:.2f} ms, p95 {judge['latency_ms_p95']:.2f} ms "
          f"({judge['sequential_requests']} requests)")
    print(f"batch of {judge['batch_requests']} at concurrency {judge['batch_concurrency']}: "
          f"{judge['batch_s']:.2f} s, {judge['batch_requests_per_s']:.0f} requests/s")
    print(f"cache hit: {judge['cached_us_per_request']:.1f} us per request; failures: {judge['failures']}")
    if args.json:
        args.json.write_text(json.dumps({"dense": dense, "judge": judge}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
