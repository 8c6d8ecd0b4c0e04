"""The single controller: runs data | sft | rl | eval | pipeline from one typed config.

It is the only place that knows the order of things. Actor groups are thin shells built from their
own sub-configs; this module decides what runs when:

    pipeline = data -> sft -> rl -> eval
    one RL step = 1 rollout -> 2 reward -> 3 advantages -> 4 update -> 5 weight push -> 6 log
                  (+ evaluation and checkpoint on schedule)

Run it through the `cv-ray` command (cv_ray/cli.py); `run(cfg)` is also callable from Python.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cv_ray.config import Config, as_dict, to_yaml, validate_resources
from cv_ray.learner.checkpoint import DataPosition
from cv_ray.models import prepare_model
from cv_ray.tracking import Tracker

log = logging.getLogger("cv_ray.driver")

PIPELINE = ("data", "sft", "rl", "eval")
CHECKPOINT_DONE = "COMPLETE"


@dataclass
class RunContext:
    cfg: Config
    work_dir: Path
    base_model: Path
    family: str
    tracker: Tracker
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return Path(self.cfg.data.dir)

    def latest_model(self) -> Path:
        """The newest trained model of this run (RL, then SFT), else the base model."""
        for name in ("rl_model", "sft_model"):
            if (self.work_dir / name / "config.json").exists():
                return self.work_dir / name
        return self.base_model


class PhaseTimer:
    """Times the numbered phases of a step: `with timer("rollout"): ...` -> metrics `time/rollout_s`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"time/{phase}_s"] = time.perf_counter() - start


class BatchSampler:
    """Deterministic epoch-shuffled batches over ``n`` items; its position is checkpointed."""

    def __init__(self, n: int, batch_size: int, seed: int, position: DataPosition = DataPosition()):
        if n < 1:
            raise ValueError("no items to sample from: the dataset is empty (did the data stage run?)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.batches_per_epoch = max(1, n // batch_size)
        self.position = position

    def next(self) -> list[int]:
        order = np.random.default_rng([self.seed, self.position.epoch]).permutation(self.n)
        start = self.position.batch * self.batch_size
        picked = [int(i) for i in order[start:start + self.batch_size]]
        if len(picked) < self.batch_size:  # fewer items than a batch: wrap around within the epoch
            picked += [int(i) for i in order[: self.batch_size - len(picked)]]
        self.position = self.position.advance(self.batches_per_epoch)
        return picked


# --------------------------------------------------------------------------------------------- run


def run(cfg: Config) -> float | None:
    """Run the configured stage (or the whole pipeline). Returns the final held-out accuracy, if any."""
    from cv_ray.cluster import init_ray

    work_dir = Path(cfg.trainer.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.resolved.yaml").write_text(to_yaml(cfg))
    log.info("run directory: %s", work_dir.resolve())
    log.info("resolved config:\n%s", to_yaml(cfg))

    start = time.perf_counter()
    base_model, family = prepare_model(cfg.model.path, cfg.model.family, cfg.model.build_tiny)
    log.info("model: %s (%s), ready in %.1f s", base_model, family, time.perf_counter() - start)
    resources = init_ray(num_cpus=cfg.trainer.ray_num_cpus)
    log.info("ray cluster resources: %s", {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")})
    validate_resources(cfg, resources)

    tracker = Tracker(cfg.logger, work_dir, run_name=work_dir.name, config=as_dict(cfg))
    ctx = RunContext(cfg, work_dir, base_model, family, tracker)
    stages = PIPELINE if cfg.trainer.stage == "pipeline" else (cfg.trainer.stage,)
    try:
        for stage in stages:
            t0 = time.perf_counter()
            ctx.summary[stage] = STAGES[stage](ctx)
            ctx.summary[stage]["wall_s"] = time.perf_counter() - t0
            log.info("stage %s done in %.1f s", stage, ctx.summary[stage]["wall_s"])
            _write_summary(ctx)
    finally:
        tracker.close()
    _print_where(ctx)
    return ctx.summary.get("final", {}).get("eval/accuracy")


def _write_summary(ctx: RunContext) -> None:
    final: dict[str, float] = {}
    for stage in ("sft", "rl", "eval"):
        for key, value in ctx.summary.get(stage, {}).get("final", {}).items():
            final[key] = value
    ctx.summary["final"] = final
    (ctx.work_dir / "summary.json").write_text(json.dumps(ctx.summary, indent=2, default=str))


def _print_where(ctx: RunContext) -> None:
    lines = [f"run directory: {ctx.work_dir.resolve()}",
             f"  metrics:  {ctx.tracker.metrics_path}",
             f"  summary:  {ctx.work_dir / 'summary.json'}"]
    if (ctx.work_dir / "viewer" / "index.html").exists():
        lines.append(f"  viewer:   {ctx.work_dir / 'viewer' / 'index.html'}")
    if (ctx.work_dir / "eval" / "report.md").exists():
        lines.append(f"  report:   {ctx.work_dir / 'eval' / 'report.md'}")
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------ stages


def stage_data(ctx: RunContext) -> dict[str, Any]:
    """Generate RL tasks, SFT trajectories (executed in the sandbox) and benchmark suites."""
    from cv_ray.data.build import build_dataset
    from cv_ray.sandbox import SandboxPool

    manifest_path = ctx.data_dir / "manifest.json"
    if manifest_path.exists():
        log.info("data: %s already built (delete it to rebuild)", ctx.data_dir)
        return {"dir": str(ctx.data_dir), "reused": True}
    with SandboxPool(ctx.cfg.sandbox) as pool:
        manifest = build_dataset(ctx.cfg.data, ctx.data_dir, pool, sandbox_threads=ctx.cfg.sandbox.workers_per_executor)
    return {"dir": str(ctx.data_dir), "counts": manifest.get("counts", {})}


def _ensure_data(ctx: RunContext) -> None:
    if not (ctx.data_dir / "manifest.json").exists():
        log.info("data: none at %s yet; building it first", ctx.data_dir)
        stage_data(ctx)


def _read_tasks(paths: list[Path]) -> list:
    from cv_ray.data.records import read_tasks

    return [task for path in paths for task in read_tasks(path)]


def _warn_on_other_system_prompts(examples: list, system_prompt: str) -> int:
    """Count (and warn about) SFT conversations whose system message is not the rollout's prompt:
    the policy would be taught under one prompt and sampled under another."""
    other = sum(1 for e in examples if e.messages and e.messages[0]["role"] == "system"
                and e.messages[0]["content"] != system_prompt)
    if other:
        log.warning("sft: %d of %d conversations have a system prompt other than the rollout's "
                    "(rollout.system_prompt); RL will sample under a prompt SFT did not teach. Write the SFT "
                    "data with the same prompt or set rollout.system_prompt to it.", other, len(examples))
    return other


def stage_sft(ctx: RunContext) -> dict[str, Any]:
    """Masked next-token training on the SFT trajectories; exports `sft_model/`."""
    from transformers import AutoProcessor

    from cv_ray.agent.chat import codec_from_config
    from cv_ray.data.records import read_sft
    from cv_ray.learner.batch import sft_sample
    from cv_ray.learner.group import LearnerGroup

    _ensure_data(ctx)
    cfg, sched = ctx.cfg, ctx.cfg.trainer.sft
    files = [ctx.data_dir / "sft.jsonl", *map(Path, cfg.data.sft_files)]
    processor = AutoProcessor.from_pretrained(ctx.base_model)
    codec = codec_from_config(processor, cfg.rollout)
    examples = [example for path in files for example in read_sft(path)]
    _warn_on_other_system_prompts(examples, codec.system_prompt)
    samples = [sft_sample(processor, example, codec) for example in examples]
    sampler = BatchSampler(len(samples), sched.batch_size, seed=cfg.trainer.seed)
    steps = sched.max_steps or max(1, math.ceil(sched.epochs * len(samples) / sched.batch_size))
    log.info("sft: %d conversations, %d steps of %d", len(samples), steps, sched.batch_size)

    learner = LearnerGroup(ctx.base_model, replace(cfg.learner, lr=sched.lr), total_steps=steps, seed=cfg.trainer.seed,
                           temperature=cfg.rollout.temperature)
    metrics: dict[str, float] = {}
    try:
        for step in _progress(range(steps), "sft"):
            t0 = time.perf_counter()
            metrics = learner.sft_step([samples[i] for i in sampler.next()])
            metrics["time/step_s"] = time.perf_counter() - t0
            ctx.tracker.log(metrics, step=step, stage="sft")
        out = learner.export_hf(ctx.work_dir / "sft_model")
    finally:
        learner.shutdown()
    return {"model": str(out), "steps": steps, "final": {k: v for k, v in metrics.items() if k == "sft/loss"}}


def stage_rl(ctx: RunContext) -> dict[str, Any]:
    """GRPO from the SFT model (or the base model): the RL loop with evaluation and checkpoints."""
    from cv_ray.learner.group import LearnerGroup
    from cv_ray.reward import RewardGroup
    from cv_ray.rollout.rollout_worker import RolloutGroup
    from cv_ray.sandbox import SandboxGroup

    _ensure_data(ctx)
    cfg = ctx.cfg
    policy = ctx.work_dir / "sft_model" if (ctx.work_dir / "sft_model" / "config.json").exists() else ctx.base_model
    tasks = _read_tasks([ctx.data_dir / "rl_train.parquet", *map(Path, cfg.data.train_files)])
    val_tasks = _read_tasks([ctx.data_dir / "rl_val.parquet"])
    sequences = cfg.trainer.rl.batch_size * cfg.rollout.n_samples
    updates_per_step = cfg.learner.ppo_epochs * (sequences // (cfg.learner.mini_batch_size or sequences))
    log.info("rl: policy %s, %d tasks, %d steps x %d tasks x %d samples", policy, len(tasks), cfg.trainer.rl.steps,
             cfg.trainer.rl.batch_size, cfg.rollout.n_samples)

    sandbox = SandboxGroup(cfg.sandbox)
    rollout = RolloutGroup(str(policy), cfg.rollout, sandbox)
    reward = RewardGroup(cfg.reward)
    learner = LearnerGroup(policy, cfg.learner, total_steps=cfg.trainer.rl.steps * updates_per_step,
                           seed=cfg.trainer.seed, temperature=cfg.rollout.temperature)
    sampler = BatchSampler(len(tasks), cfg.trainer.rl.batch_size, seed=cfg.trainer.seed)
    start_step, history = 0, []
    try:
        resumed = _resume(ctx, learner)
        if resumed is not None:
            start_step, history = resumed["step"], resumed["history"]
            sampler.position = DataPosition(**resumed["data_position"])
            learner.push_weights(rollout.workers)  # the rollout engines still hold the pre-checkpoint weights
        metrics: dict[str, float] = {}
        for step in _progress(range(start_step, cfg.trainer.rl.steps), "rl", initial=start_step,
                              total=cfg.trainer.rl.steps):
            batch = [tasks[i] for i in sampler.next()]
            metrics = rl_step(ctx, step, batch, rollout, reward, learner)
            if _due(step, cfg.trainer.eval_every, cfg.trainer.rl.steps) and val_tasks:
                metrics.update(validation_rollouts(ctx, step, val_tasks, rollout, reward))
            history.append({k: v for k, v in metrics.items() if k in ("reward/total", "reward/correct", "eval/accuracy")})
            ctx.tracker.log(metrics, step=step, stage="rl")
            if _due(step, cfg.trainer.save_every, cfg.trainer.rl.steps):
                _save(ctx, learner, step + 1, sampler.position, history)
        out = learner.export_hf(ctx.work_dir / "rl_model")
    finally:
        for group in (learner, rollout, sandbox):
            group.shutdown()
    final = {k: v for k, v in metrics.items() if k.startswith(("reward/total", "eval/"))}
    return {"model": str(out), "steps": cfg.trainer.rl.steps, "history": history, "final": final}


def rl_step(ctx: RunContext, step: int, tasks: list, rollout, reward, learner) -> dict[str, float]:
    """One GRPO step as numbered, timed phases. Returns every metric of the step."""
    from cv_ray.learner.advantages import compute_advantages
    from cv_ray.learner.batch import rl_sample
    from cv_ray.viewer import ViewerSample

    cfg = ctx.cfg
    timer = PhaseTimer()
    with timer("step"):
        with timer("rollout"):  # 1. sample n trajectories per task (agent loops with sandboxed tools)
            trajectories, rollout_metrics = rollout.rollout(tasks, cfg.rollout.n_samples)
        with timer("reward"):  # 2. dense process reward per GRPO group
            groups = _group(tasks, trajectories)
            breakdowns, reward_metrics = reward.score(groups)
        with timer("advantage"):  # 3. group-normalized advantages
            flat = [(traj, b) for (_, trajs), bs in zip(groups, breakdowns) for traj, b in zip(trajs, bs)]
            advantages, adv_metrics = compute_advantages(
                cfg.trainer.rl.advantage, [b.total for _, b in flat], [t.uid for t, _ in flat],
                std_norm=cfg.trainer.rl.adv_std_norm)
        with timer("update"):  # 4. policy update (clipped loss + KL to the reference)
            learner_metrics = learner.rl_step([rl_sample(t, a) for (t, _), a in zip(flat, advantages)])
        with timer("weight_push"):  # 5. new weights to every rollout engine
            push_metrics = learner.push_weights(rollout.workers)
    # 6. log (the caller writes the metrics; samples go to the viewer now)
    shown = flat[: ctx.cfg.logger.samples_per_step]
    task_of = {t.uid: t for t in tasks}
    ctx.tracker.log_samples([ViewerSample.from_rollout(task_of[t.uid], t, b) for t, b in shown], step=step)
    return {**rollout_metrics, **reward_metrics, **adv_metrics, **_prefixed("learner", learner_metrics),
            **_prefixed("push", push_metrics), **timer.seconds}


def validation_rollouts(ctx: RunContext, step: int, val_tasks: list, rollout, reward) -> dict[str, float]:
    """Greedy rollouts on the validation tasks: accuracy and mean reward (`eval/*`)."""
    trajectories, _ = rollout.rollout(val_tasks, 1, temperature=ctx.cfg.eval.temperature)
    breakdowns, _ = reward.score(_group(val_tasks, trajectories))
    flat = [b for bs in breakdowns for b in bs]
    return {"eval/accuracy": float(np.mean([b.correct for b in flat])),
            "eval/reward": float(np.mean([b.total for b in flat])),
            "eval/tool_use_rate": float(np.mean([len(t.tool_calls) > 0 for t in trajectories]))}


def stage_eval(ctx: RunContext) -> dict[str, Any]:
    """Benchmark suites with and without tools; writes the report under `eval/`."""
    from cv_ray.eval.runner import evaluate

    _ensure_data(ctx)
    model = Path(ctx.cfg.eval.model) if ctx.cfg.eval.model else ctx.latest_model()
    summaries, paths = evaluate(model, ctx.cfg, ctx.data_dir, ctx.work_dir / "eval")
    with_tools = summaries.get("with_tools", {})
    final = {"eval/accuracy": with_tools.get("accuracy")}
    if "without_tools" in summaries:
        final["eval/accuracy_without_tools"] = summaries["without_tools"].get("accuracy")
    return {"model": str(model), "report": str(paths["report"]), "final": final}


STAGES = {"data": stage_data, "sft": stage_sft, "rl": stage_rl, "eval": stage_eval}


# --------------------------------------------------------------------------------------- helpers


def _group(tasks: list, trajectories: list) -> list[tuple[Any, list]]:
    """(task, its samples) per task, in task order; trajectories arrive grouped by task."""
    by_uid: dict[str, list] = {}
    for traj in trajectories:
        by_uid.setdefault(traj.uid, []).append(traj)
    return [(task, by_uid.get(task.uid, [])) for task in tasks]


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {k if k.startswith(f"{prefix}/") else f"{prefix}/{k}": v for k, v in metrics.items()}


def _due(step: int, every: int, total: int) -> bool:
    return step + 1 == total or (every > 0 and (step + 1) % every == 0)


def _progress(iterable, desc: str, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="step", dynamic_ncols=True, **kw)


def _save(ctx: RunContext, learner, next_step: int, position: DataPosition, history: list) -> Path:
    path = ctx.work_dir / "checkpoints" / f"step_{next_step:06d}"
    state = {"step": next_step, "data_position": {"epoch": position.epoch, "batch": position.batch},
             "history": history}
    learner.save_checkpoint(path, state)
    (path / CHECKPOINT_DONE).write_text(json.dumps(state["data_position"]))  # written last: the checkpoint is whole
    log.info("checkpoint: %s", path)
    return path


def _resume(ctx: RunContext, learner) -> dict[str, Any] | None:
    mode = ctx.cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        done = sorted((ctx.work_dir / "checkpoints").glob(f"step_*/{CHECKPOINT_DONE}"))
        if not done:
            log.info("resume: no complete checkpoint in %s; starting fresh", ctx.work_dir / "checkpoints")
            return None
        path = done[-1].parent
    else:
        path = Path(mode)
        if not (path / CHECKPOINT_DONE).exists():
            raise FileNotFoundError(f"trainer.resume={mode}: not a complete checkpoint (no {CHECKPOINT_DONE} file)")
    state = learner.load_checkpoint(path)
    log.info("resume: %s at step %d, data position %s", path, state["step"], state["data_position"])
    return state
