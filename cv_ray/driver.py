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

from cv_ray.actor_group import live_actors
from cv_ray.config import Config, as_dict, resolve_weight_sync, to_yaml, validate_resources
from cv_ray.learner.checkpoint import DataPosition
from cv_ray.models import ModelRef, prepare_model
from cv_ray.tracking import Tracker

log = logging.getLogger("cv_ray.driver")

PIPELINE = ("data", "sft", "rl", "eval")
CHECKPOINT_DONE = "COMPLETE"


@dataclass
class RunContext:
    cfg: Config
    work_dir: Path
    base_model: Path
    tracker: Tracker
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return Path(self.cfg.data.dir)

    def model_ref(self, path: str | Path) -> ModelRef:
        """``path`` with the run's image bounds (``model.min_pixels`` / ``max_pixels``): every group
        processes images the same way (see :class:`cv_ray.models.ModelRef`)."""
        return ModelRef(str(path), self.cfg.model.min_pixels, self.cfg.model.max_pixels)

    def run_models(self, names: list[str]) -> dict[str, Path]:
        """``base``, ``sft``, ``rl`` -> the model directories of this run that exist, in the order given."""
        where = {"base": self.base_model, "sft": self.work_dir / "sft_model", "rl": self.work_dir / "rl_model"}
        found = {name: where[name] for name in names if (where[name] / "config.json").exists()}
        for name in names:
            if name not in found:
                log.warning("eval: no %s model in %s (did its stage run?); skipping it", name, self.work_dir)
        if not found:
            raise FileNotFoundError(f"eval.models={names}: none of these models exists in {self.work_dir}")
        return found

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
    base_model, family = prepare_model(cfg.model.path, cfg.model.family, cfg.model.build_tiny, cfg.model.tiny_spec)
    log.info("model: %s (%s), ready in %.1f s", base_model, family, time.perf_counter() - start)
    resources = init_ray(num_cpus=cfg.trainer.ray_num_cpus)
    log.info("ray cluster resources: %s", {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")})
    validate_resources(cfg, resources)

    tracker = Tracker(cfg.logger, work_dir, run_name=work_dir.name, config=as_dict(cfg))
    ctx = RunContext(cfg, work_dir, base_model, tracker)
    stages = PIPELINE if cfg.trainer.stage == "pipeline" else (cfg.trainer.stage,)
    try:
        for stage in stages:
            t0 = time.perf_counter()
            ctx.summary[stage] = STAGES[stage](ctx)
            ctx.summary[stage]["wall_s"] = time.perf_counter() - t0
            # Every stage ends the actors it started; what is left would hold CPUs, GPUs and memory.
            ctx.summary[stage]["live_actors_after"] = len(live_actors())
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


def summary_table(summary: dict[str, Any], rl_rows: list[dict[str, Any]]) -> list[str]:
    """The closing table of a run: accuracy with tools and valid tool calls per evaluated model, and the
    RL reward and tool use at the first and the last RL step. Pure (the stages' summaries and the RL
    metric rows in); empty when the run had neither an evaluation nor RL steps."""
    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = []
    rows = summary.get("eval", {}).get("comparison")
    if rows is None and "eval" in summary:
        rows = [{"model": "final", "accuracy_with_tools": summary["eval"].get("final", {}).get("eval/accuracy"),
                 "valid_calls": None}]
    if rows:
        width = max(len("model"), *(len(r["model"]) for r in rows))
        temperature, n = summary["eval"].get("temperature", 0.0), summary["eval"].get("n_samples", 1)
        how = "greedy" if not temperature else f"sampled at temperature {temperature:g}, {n} per task"
        lines += [f"held-out evaluation, with tools ({how}):",
                  f"  {'model':<{width}}  accuracy  valid tool calls"]
        lines += [f"  {r['model']:<{width}}  {fmt(r['accuracy_with_tools']):>8}  {fmt(r['valid_calls']):>16}"
                  for r in rows]
    if rl_rows:
        first, last = rl_rows[0], rl_rows[-1]
        lines.append(f"RL: reward {fmt(first.get('reward/total'))} at step {first['step']} -> "
                     f"{fmt(last.get('reward/total'))} at step {last['step']}; tool calls per trajectory "
                     f"{fmt(first.get('tool_use/call_rate'))} -> {fmt(last.get('tool_use/call_rate'))}, valid "
                     f"{fmt(first.get('tool_use/valid_call_rate'))} -> {fmt(last.get('tool_use/valid_call_rate'))}")
    return lines


def _print_where(ctx: RunContext) -> None:
    rl_rows = [r for r in ctx.tracker.rows if r["stage"] == "rl"]
    table = summary_table(ctx.summary, rl_rows)
    if table:
        print("\n".join(["", *table, ""]))
    lines = [f"run directory: {ctx.work_dir.resolve()}",
             f"  metrics:  {ctx.tracker.metrics_path}",
             f"  summary:  {ctx.work_dir / 'summary.json'}"]
    if ctx.tracker.dashboard is not None:
        lines.append(f"  dashboard: {ctx.tracker.dashboard.index_path}")
    if (ctx.work_dir / "eval" / "report.md").exists():
        lines.append(f"  report:   {ctx.work_dir / 'eval' / 'report.md'}")
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------ stages


def stage_data(ctx: RunContext) -> dict[str, Any]:
    """Generate RL tasks, SFT trajectories (executed in the sandbox) and benchmark suites."""
    from cv_ray.agent.prompts import SYSTEM_PROMPT
    from cv_ray.data.build import build_dataset
    from cv_ray.sandbox import SandboxPool

    manifest_path = ctx.data_dir / "manifest.json"
    if manifest_path.exists():
        log.info("data: %s already built (delete it to rebuild)", ctx.data_dir)
        return {"dir": str(ctx.data_dir), "reused": True}
    with SandboxPool(ctx.cfg.sandbox) as pool:
        manifest = build_dataset(ctx.cfg.data, ctx.data_dir, pool, sandbox_threads=ctx.cfg.sandbox.workers_per_executor,
                                 system_prompt=ctx.cfg.rollout.system_prompt or SYSTEM_PROMPT)
    return {"dir": str(ctx.data_dir), "counts": manifest.get("counts", {})}


def _ensure_data(ctx: RunContext) -> None:
    if not (ctx.data_dir / "manifest.json").exists():
        log.info("data: none at %s yet; building it first", ctx.data_dir)
        stage_data(ctx)


def _read_tasks(ctx: RunContext, paths: list[Path]) -> list:
    """Every task of ``paths`` (our formats or the reference's); ``data.skip_bad_rows`` skips and counts bad rows."""
    from cv_ray.data.records import read_task_files

    return read_task_files(paths, ctx.cfg.data.skip_bad_rows)


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
    from cv_ray.agent.chat import codec_from_config
    from cv_ray.data.records import read_sft_files
    from cv_ray.learner.batch import sft_sample
    from cv_ray.learner.group import LearnerGroup

    _ensure_data(ctx)
    cfg, sched = ctx.cfg, ctx.cfg.trainer.sft
    files = [ctx.data_dir / "sft.jsonl", *map(Path, cfg.data.sft_files)]
    model = ctx.model_ref(ctx.base_model)
    processor = model.load_processor()
    codec = codec_from_config(processor, cfg.rollout)
    examples = read_sft_files(files, cfg.data.skip_bad_rows)
    _warn_on_other_system_prompts(examples, codec.system_prompt)
    samples = [sft_sample(processor, example, codec) for example in examples]
    sampler = BatchSampler(len(samples), sched.batch_size, seed=cfg.trainer.seed)
    steps = sched.max_steps or max(1, math.ceil(sched.epochs * len(samples) / sched.batch_size))
    log.info("sft: %d conversations, %d steps of %d", len(samples), steps, sched.batch_size)

    metrics: dict[str, float] = {}
    ctx.tracker.rewind("sft", 0)  # SFT starts over: a previous SFT stage's rows in this run directory go
    with LearnerGroup(model, replace(cfg.learner, lr=sched.lr), total_steps=steps, seed=cfg.trainer.seed,
                      temperature=cfg.rollout.temperature) as learner:
        for step in _progress(range(steps), "sft"):
            t0 = time.perf_counter()
            metrics = learner.sft_step([samples[i] for i in sampler.next()])
            metrics["time/step_s"] = time.perf_counter() - t0
            ctx.tracker.log(metrics, step=step, stage="sft")
        out = learner.export_hf(ctx.work_dir / "sft_model")
    return {"model": str(out), "steps": steps, "final": {k: v for k, v in metrics.items() if k == "sft/loss"}}


def stage_rl(ctx: RunContext) -> dict[str, Any]:
    """GRPO from the SFT model (or the base model): the RL loop with evaluation and checkpoints."""
    from cv_ray.episode_groups import EpisodeGroups
    from cv_ray.learner.group import LearnerGroup
    from cv_ray.weight_sync import make_weight_sync

    _ensure_data(ctx)
    cfg = ctx.cfg
    policy = ctx.work_dir / "sft_model" if (ctx.work_dir / "sft_model" / "config.json").exists() else ctx.base_model
    tasks = _read_tasks(ctx, [ctx.data_dir / "rl_train.parquet", *map(Path, cfg.data.train_files)])
    val_tasks = _read_tasks(ctx, [ctx.data_dir / "rl_val.parquet"])
    sequences = cfg.trainer.rl.batch_size * cfg.rollout.n_samples
    updates_per_step = cfg.learner.ppo_epochs * (sequences // (cfg.learner.mini_batch_size or sequences))
    log.info("rl: policy %s, %d tasks, %d steps x %d tasks x %d samples", policy, len(tasks), cfg.trainer.rl.steps,
             cfg.trainer.rl.batch_size, cfg.rollout.n_samples)

    model = ctx.model_ref(policy)
    sampler = BatchSampler(len(tasks), cfg.trainer.rl.batch_size, seed=cfg.trainer.seed)
    start_step, history = 0, []
    metrics: dict[str, float] = {}
    rollout_cfg = resolve_weight_sync(cfg.rollout, cfg.learner)  # `auto` -> the path; engines start with its receiver
    with EpisodeGroups.start(model, rollout_cfg, cfg.sandbox, cfg.reward) as groups, \
            LearnerGroup(model, cfg.learner, total_steps=cfg.trainer.rl.steps * updates_per_step,
                         seed=cfg.trainer.seed, temperature=cfg.rollout.temperature) as learner:
        weight_sync = make_weight_sync(rollout_cfg, learner, groups.rollout)  # phase 5's path, set up once
        reward_weights = groups.reward.weights()  # what the reward actors score with (a sweep's job's own)
        resumed = _resume(ctx, learner)
        if resumed is not None:
            start_step, history = resumed["step"], resumed["history"]
            sampler.position = DataPosition(**resumed["data_position"])
            weight_sync.sync()  # the engines still hold the pre-checkpoint weights
        ctx.tracker.rewind("rl", start_step)  # each step shown once: forget logged steps this run does (again)
        for step in _progress(range(start_step, cfg.trainer.rl.steps), "rl", initial=start_step,
                              total=cfg.trainer.rl.steps):
            batch = [tasks[i] for i in sampler.next()]
            metrics = rl_step(ctx, step, batch, groups, learner, weight_sync)
            if _due(step, cfg.trainer.eval_every, cfg.trainer.rl.steps) and val_tasks:
                metrics.update(validation_rollouts(ctx, step, val_tasks, groups))
            history.append({k: v for k, v in metrics.items() if k in ("reward/total", "reward/correct", "eval/accuracy")})
            ctx.tracker.log(metrics, step=step, stage="rl")
            if _due(step, cfg.trainer.save_every, cfg.trainer.rl.steps):
                _save(ctx, learner, step + 1, sampler.position, history)
        out = learner.export_hf(ctx.work_dir / "rl_model")
    final = {k: v for k, v in metrics.items() if k.startswith(("reward/total", "eval/"))}
    return {"model": str(out), "steps": cfg.trainer.rl.steps, "history": history, "final": final,
            "reward_weights": reward_weights}


def rl_step(ctx: RunContext, step: int, tasks: list, groups, learner, weight_sync) -> dict[str, float]:
    """One GRPO step as numbered, timed phases. Returns every metric of the step."""
    from cv_ray.agent.generation import mix_seeds
    from cv_ray.dashboard import RolloutSample
    from cv_ray.episode_groups import group_by_task
    from cv_ray.learner.advantages import compute_advantages
    from cv_ray.learner.batch import rl_sample

    cfg = ctx.cfg
    timer = PhaseTimer()
    with timer("step"):
        with timer("rollout"):  # 1. sample n trajectories per task (agent loops with sandboxed tools)
            # Seeded by (trainer.seed, step): a resumed run samples its steps as the uninterrupted one did.
            trajectories, rollout_metrics = groups.rollout.rollout(tasks, cfg.rollout.n_samples,
                                                                   seed=mix_seeds(cfg.trainer.seed, step))
        with timer("reward"):  # 2. dense process reward per GRPO group
            by_task = group_by_task(tasks, trajectories)
            breakdowns, reward_metrics = groups.reward.score(by_task)
        with timer("advantage"):  # 3. group-normalized advantages
            flat = [(traj, b) for (_, trajs), bs in zip(by_task, breakdowns) for traj, b in zip(trajs, bs)]
            advantages, adv_metrics = compute_advantages(
                cfg.trainer.rl.advantage, [b.total for _, b in flat], [t.uid for t, _ in flat],
                std_norm=cfg.trainer.rl.adv_std_norm)
        with timer("update"):  # 4. policy update (clipped loss + KL to the reference)
            learner_metrics = learner.rl_step([rl_sample(t, a) for (t, _), a in zip(flat, advantages)])
        with timer("weight_push"):  # 5. trainable weights to every rollout engine (cv_ray/weight_sync.py)
            push_metrics = weight_sync.sync()
    # 6. log (the caller writes the metrics; samples go to the dashboard now)
    shown = flat[: ctx.cfg.logger.samples_per_step]
    task_of = {t.uid: t for t in tasks}
    ctx.tracker.log_samples([RolloutSample.from_rollout(task_of[t.uid], t, b) for t, b in shown], step=step)
    return {**rollout_metrics, **reward_metrics, **adv_metrics, **_prefixed("learner", learner_metrics),
            **push_metrics, **timer.seconds}


def validation_rollouts(ctx: RunContext, step: int, val_tasks: list, groups) -> dict[str, float]:
    """Greedy rollouts on the validation tasks: accuracy and mean reward (`eval/*`); a few trajectories
    go to the dashboard under the `val` stage."""
    from cv_ray.dashboard import RolloutSample

    scored = groups.play(val_tasks, 1, temperature=ctx.cfg.eval.temperature)
    episodes = scored.triples()
    shown = episodes[: ctx.cfg.logger.samples_per_step]
    ctx.tracker.log_samples([RolloutSample.from_rollout(task, traj, b) for task, traj, b in shown], step=step,
                            stage="val")
    return {"eval/accuracy": float(np.mean([b.correct for _, _, b in episodes])),
            "eval/reward": float(np.mean([b.total for _, _, b in episodes])),
            "eval/tool_use_rate": float(np.mean([len(t.tool_calls) > 0 for _, t, _ in episodes]))}


def stage_eval(ctx: RunContext) -> dict[str, Any]:
    """Benchmark suites with and without tools; writes the report under `eval/`.

    ``eval.model`` (a directory) or else the run's newest model; with ``eval.models`` (names among
    `base`, `sft`, `rl`) each of those of this run, side by side (``eval/comparison.md``).
    """
    from cv_ray.eval.report import comparison_rows
    from cv_ray.eval.runner import evaluate_models

    _ensure_data(ctx)
    if ctx.cfg.eval.model:
        models = {"model": Path(ctx.cfg.eval.model)}
    elif ctx.cfg.eval.models:
        models = ctx.run_models(ctx.cfg.eval.models)
    else:
        models = {"model": ctx.latest_model()}
    results = evaluate_models({name: ctx.model_ref(path) for name, path in models.items()}, ctx.cfg,
                              ctx.data_dir, ctx.work_dir / "eval")
    newest = list(results)[-1]
    summaries, paths = results[newest]
    ctx.tracker.log_eval_report(paths["report"].parent)
    with_tools = summaries.get("with_tools", {})
    final = {"eval/accuracy": with_tools.get("accuracy")}
    if "without_tools" in summaries:
        final["eval/accuracy_without_tools"] = summaries["without_tools"].get("accuracy")
    out = {"model": str(models[newest]), "report": str(paths["report"]), "final": final,
           "temperature": ctx.cfg.eval.temperature, "n_samples": ctx.cfg.eval.n_samples}
    if len(results) > 1:
        out["comparison"] = comparison_rows({name: s for name, (s, _) in results.items()})
        for row in out["comparison"]:
            final[f"eval/{row['model']}/accuracy"] = row["accuracy_with_tools"]
    return out


STAGES = {"data": stage_data, "sft": stage_sft, "rl": stage_rl, "eval": stage_eval}


# --------------------------------------------------------------------------------------- helpers


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
        steps = sorted(p for p in (ctx.work_dir / "checkpoints").glob("step_*") if p.is_dir())
        done = [p for p in steps if (p / CHECKPOINT_DONE).exists()]
        for partial in steps:
            if done and partial > done[-1]:
                # A run killed while saving leaves a step directory without its COMPLETE marker.
                log.warning("resume: skipping incomplete checkpoint %s (no %s file: the run stopped while "
                            "saving it); resuming from %s", partial, CHECKPOINT_DONE, done[-1].name)
        if not done:
            log.info("resume: no complete checkpoint in %s; starting fresh", ctx.work_dir / "checkpoints")
            return None
        path = done[-1]
    else:
        path = Path(mode)
        if not (path / CHECKPOINT_DONE).exists():
            raise FileNotFoundError(f"trainer.resume={mode}: not a complete checkpoint (no {CHECKPOINT_DONE} file)")
    state = learner.load_checkpoint(path)
    log.info("resume: %s at step %d, data position %s", path, state["step"], state["data_position"])
    return state
