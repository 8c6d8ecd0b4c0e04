#!/usr/bin/env python
"""Benchmark of the asynchronous RL loop: does rollout hide behind the update (and the update behind rollout)?

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_async.py
    .venv/bin/python tools/bench_async.py --steps 10 --json /tmp/bench_async.json

The driver's own steps (``cv_ray.driver.rl_step`` for k = 0, ``rl_async_step`` for k = 1 and 2) on real
actors: rollout workers whose engine replays a scripted episode (two tool calls, then an answer) with a
fixed per-token latency (``ScriptedEngine``: one saturated device, no CPU), the real sandbox executors
and reward worker, and the real DeepSpeed learner on the tiny Qwen2.5-VL (CPU, 1 thread), whose update
trains on the scripted trajectories. The latency is calibrated first so that one batch's rollout takes
about as long as one update plus weight push (``--rollout-to-update`` sets the ratio). Every k uses
the same learner, with the asynchronous loss (``learner.loss.tis_cap=2``: decoupled PPO; one update
per step, so no proximal pre-pass).

Per k: the mean step wall over the steady-state steps (the first ``--warmup`` steps are left out: an
asynchronous run's first step has nothing to overlap; so are the last k, which have no later batch to
sample), against max(rollout, update) and their sum, both
measured by the synchronous run (rollout = its rollout + reward phases; update = advantage + update +
weight push). Target (issue 19): at k = 1, step wall <= 1.15 x max(rollout, update). Every step's
metrics go to ``<work-dir>/run/metrics.jsonl`` (stage ``k0``, ``k1``, ``k2``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from statistics import mean

from cv_ray.agent.tool_format import format_tool_call

SCRIPT = (
    "<think>The stripes point left, so I turn the image upright first.</think>"
    + format_tool_call("result = image.transpose(Image.ROTATE_270)", 0, "turn upright"),
    "<think>Now the top left corner.</think>"
    + format_tool_call("w, h = image.size\nresult = image.crop((0, 0, w // 2, h // 2))", 1, "crop"),
    "<think>It is red.</think><answer>red</answer>",
)


def compose(work_dir: Path, overrides: list[str]):
    """The tiny CPU experiment's config with the benchmark's overrides (Hydra compose, no run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cv_ray.config import register_configs, to_typed, validate

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        raw = hydra_compose(config_name="config", overrides=[f"trainer.work_dir={work_dir}", *overrides])
    cfg = to_typed(raw)
    validate(cfg)
    return cfg


def run_schedule(ctx, groups, learner, weight_sync, tasks, k: int, steps: int) -> list[dict[str, float]]:
    """``steps`` steps of the driver's loop at ``max_staleness=k``, continuing the engines' version."""
    from cv_ray.driver import AsyncRollouts, BatchSampler, rl_async_step, rl_step

    cfg = ctx.cfg
    version = groups.rollout.health()[0]["weight_version"]
    cfg.trainer.rl.max_staleness, cfg.trainer.rl.steps = k, version + steps
    sampler = BatchSampler(len(tasks), cfg.trainer.rl.batch_size, seed=k)
    rows = []
    if k == 0:
        for step in range(steps):
            rows.append(rl_step(ctx, step, [tasks[i] for i in sampler.next()], groups, learner, weight_sync))
            ctx.tracker.log(rows[-1], step=step, stage=f"k{k}")
        return rows
    stream = AsyncRollouts(cfg, tasks, sampler, groups, weight_sync, version)
    for step in range(version, version + steps):
        rows.append(rl_async_step(ctx, step, stream, learner))
        ctx.tracker.log(rows[-1], step=step - version, stage=f"k{k}")
    stream.wait_for_push()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="steps per k")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the means")
    parser.add_argument("--tasks", type=int, default=8, help="tasks per step (trainer.rl.batch_size)")
    parser.add_argument("--samples", type=int, default=4, help="samples per task (rollout.n_samples)")
    parser.add_argument("--rollout-to-update", type=float, default=1.0, help="target rollout time / update time")
    parser.add_argument("--work-dir", type=str, default=".cache/bench-async")
    parser.add_argument("--json", type=str, default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    from cv_ray.cluster import init_ray
    from cv_ray.data.demo_family import generate_demo_task
    from cv_ray.driver import RunContext, rl_step
    from cv_ray.episode_groups import EpisodeGroups
    from cv_ray.learner.group import LearnerGroup
    from cv_ray.models import ModelRef
    from cv_ray.models.tiny import ensure_tiny_model
    from cv_ray.reward.reward_worker import RewardGroup
    from cv_ray.rollout.rollout_worker import RolloutGroup
    from cv_ray.rollout.scripted_engine import ScriptedEngineFactory
    from cv_ray.sandbox.executor import SandboxGroup
    from cv_ray.tracking import Tracker
    from cv_ray.weight_sync import make_weight_sync

    work = Path(args.work_dir).resolve()
    model_dir = ensure_tiny_model("qwen2_5_vl", work / "tiny-qwen2_5_vl")
    cfg = compose(work / "run", [
        "experiment=tiny_cpu", f"trainer.rl.batch_size={args.tasks}", f"rollout.n_samples={args.samples}",
        "rollout.tools_in_prompt=false", "rollout.max_turns=3", "rollout.max_new_tokens_per_turn=128",
        "learner.mini_batch_size=0", f"learner.micro_batch_size={args.tasks * args.samples}",
        "logger.backends=[jsonl]", "logger.samples_per_step=0", "sandbox.num_executors=2",
        # One learner for every k: the asynchronous runs' loss (decoupled PPO), the same cost at k = 0.
        "learner.loss.tis_cap=2.0"])
    tasks = [generate_demo_task(0, i, 112, "bench") for i in range(4 * args.tasks)]
    init_ray(num_cpus=16)
    model = ModelRef(str(model_dir), cfg.model.min_pixels, cfg.model.max_pixels)
    figures: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
        "steps": args.steps, "warmup": args.warmup, "tasks": args.tasks, "samples": args.samples}

    def groups_with(latency: float) -> EpisodeGroups:
        sandbox = SandboxGroup(cfg.sandbox)
        rollout = RolloutGroup(model, cfg.rollout, sandbox, engine_factory=ScriptedEngineFactory(SCRIPT, latency))
        return EpisodeGroups(sandbox, rollout, RewardGroup(cfg.reward))

    tracker = Tracker(cfg.logger, work / "run", run_name="bench-async")
    ctx = RunContext(cfg, work / "run", model_dir, tracker)
    total = (3 * args.steps + 4) * (cfg.learner.ppo_epochs or 1)
    with LearnerGroup(model, cfg.learner, total_steps=total, seed=0,
                      temperature=cfg.rollout.temperature) as learner:
        # Calibration: the update's cost, and the tokens a batch samples, with an instant engine.
        with groups_with(0.0) as groups:
            weight_sync = make_weight_sync(cfg.rollout, learner, groups.rollout)
            rows = [rl_step(ctx, step, tasks[: args.tasks], groups, learner, weight_sync) for step in range(3)]
        update_s = mean(r["time/advantage_s"] + r["time/update_s"] + r["time/weight_push_s"] for r in rows[1:])
        tokens = mean(r["rollout/sampled_tokens"] for r in rows)
        latency = args.rollout_to_update * update_s / tokens
        figures.update(calibration_update_s=update_s, sampled_tokens_per_batch=tokens, ms_per_token=latency * 1e3)
        print(f"calibration: update + push {update_s:.2f} s, {tokens:.0f} sampled tokens per batch "
              f"-> {latency * 1e3:.2f} ms per token")

        runs: dict[int, list[dict[str, float]]] = {}
        with groups_with(latency) as groups:
            weight_sync = make_weight_sync(cfg.rollout, learner, groups.rollout)
            for k in (0, 1, 2):
                started = time.perf_counter()
                runs[k] = run_schedule(ctx, groups, learner, weight_sync, tasks, k, args.steps)
                print(f"k={k}: {args.steps} steps in {time.perf_counter() - started:.1f} s")
    tracker.close()

    sync = runs[0][args.warmup:]
    rollout_s = mean(r["time/rollout_s"] + r["time/reward_s"] for r in sync)
    update_s = mean(r["time/advantage_s"] + r["time/update_s"] + r["time/weight_push_s"] for r in sync)
    bound, serial = max(rollout_s, update_s), rollout_s + update_s
    figures.update(rollout_s=rollout_s, update_s=update_s, target=1.15)
    print(f"\nasync RL benchmark on {figures['machine']}; {args.tasks} tasks x {args.samples} samples per step")
    print(f"synchronous phases: rollout + reward {rollout_s:.2f} s, advantage + update + push {update_s:.2f} s")
    print(f"{'k':>3}{'step s':>9}{'/ max':>8}{'/ sum':>8}{'learner idle':>14}{'rollout idle':>14}{'staleness':>22}")
    for k, rows in runs.items():
        # The last k steps have no later batch left to sample (the run ends): not steady either.
        steady = rows[args.warmup: len(rows) - k]
        wall = mean(r["time/step_s"] for r in steady)
        staleness: dict[str, float] = {}
        for r in steady:
            for key, value in r.items():
                if key.startswith("async/staleness/"):
                    staleness[key.rsplit("/", 1)[1]] = staleness.get(key.rsplit("/", 1)[1], 0.0) + value
        if k == 0:  # one side waits while the other works
            learner_idle = mean((r["time/rollout_s"] + r["time/reward_s"]) / r["time/step_s"] for r in steady)
            rollout_idle = mean(1 - r["time/rollout_s"] / r["time/step_s"] for r in steady)
        else:
            learner_idle = mean(r["async/learner_idle_frac"] for r in steady)
            rollout_idle = mean(r.get("async/rollout_idle_frac", float("nan")) for r in steady)
        figures[f"k{k}"] = {"step_s": wall, "over_max": wall / bound, "over_sum": wall / serial,
                            "learner_idle_frac": learner_idle, "rollout_idle_frac": rollout_idle,
                            "staleness_counts": staleness, "step_s_all": [r["time/step_s"] for r in rows]}
        print(f"{k:>3}{wall:>9.2f}{wall / bound:>8.2f}{wall / serial:>8.2f}{learner_idle:>14.2f}{rollout_idle:>14.2f}"
              f"{json.dumps(staleness):>22}")
    met = figures["k1"]["over_max"] <= 1.15  # type: ignore[index]
    print(f"target at k=1: step wall <= 1.15 x max(rollout, update): {'met' if met else 'MISSED'}")
    figures["load_average_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
