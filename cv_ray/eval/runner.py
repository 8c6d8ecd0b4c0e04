"""Robustness evaluation: a checkpoint through the agent loop on benchmark suites, tools on and off.

    cv-ray trainer.stage=eval model.path=/ckpt/Qwen2.5-VL-7B model.build_tiny="" eval.suites=[orientation,zoom]
    cv-ray trainer.stage=eval eval.suites=[/data/mvtoolbench.parquet]      # the reference's suite layout

Each suite is read from the run's data directory (`suites/<name>-vN.parquet`), generated on demand
when missing, or read from a path (our Parquet/JSONL or the reference's MVToolBench layout). Both
modes use the same prompts; "without tools" drops the tool schema and executes no code. Answers are
scored by the reward's answer checker; the report goes to `<run>/eval/`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from cv_ray.config import Config
from cv_ray.eval.metrics import EvalRecord, summarize
from cv_ray.eval.report import write_comparison, write_report
from cv_ray.geometry import iou
from cv_ray.models import ModelRef
from cv_ray.types import RewardBreakdown, Task, Trajectory

log = logging.getLogger("cv_ray.eval")


def load_suite(name: str, data_dir: Path, seed: int, size: int, image_size: int,
               skip_bad_rows: bool = False) -> tuple[str, list[Task]]:
    """(suite name, tasks): a path, a built suite in the data directory, or a freshly generated one.

    ``skip_bad_rows`` (``data.skip_bad_rows``): a suite file's malformed rows are skipped and counted."""
    from cv_ray.data.records import read_task_files
    from cv_ray.data.suites import build_suite, resolve_suite_name

    path = Path(name)
    if path.suffix in (".parquet", ".jsonl") and path.exists():
        return path.stem, read_task_files([path], skip_bad_rows)
    resolved = resolve_suite_name(name)
    built = Path(data_dir) / "suites" / f"{resolved}.parquet"
    if built.exists():
        return resolved, read_task_files([built], skip_bad_rows)
    log.info("eval: suite %s not in %s; generating it (seed %d)", resolved, data_dir, seed)
    return resolved, list(build_suite(resolved, seed, size, image_size))


def eval_record(task: Task, traj: Trajectory, breakdown: RewardBreakdown, suite: str, with_tools: bool) -> EvalRecord:
    from cv_ray.reward import outcome_from_trajectory

    outcome = outcome_from_trajectory(traj)
    used = sorted({op.name for op in outcome.ops if op.call_ok})
    crops = [op.box for op in outcome.ops if op.call_ok and op.name == "crop" and op.box is not None]
    crop_iou = max((iou(box, task.answer_box) for box in crops), default=None) if task.answer_box and crops else None
    errors: dict[str, int] = {}
    for call in traj.tool_calls:
        if not call.ok:
            cls = call.parse_error_class if not call.parsed else (call.result.error_class if call.result else "sandbox")
            errors[cls or "unknown"] = errors.get(cls or "unknown", 0) + 1
    return EvalRecord(
        task_uid=task.uid, suite=suite, transform=str(task.extra.get("transform", "none")),
        base_id=str(task.extra.get("base_id", task.uid)), with_tools=with_tools,
        correct=breakdown.correct, tool_calls=len(traj.tool_calls),
        tool_errors=errors, turns=traj.num_turns, ops_used=used, required_ops=list(task.required_ops),
        crop_iou=crop_iou,
    )


def evaluate(model: ModelRef | Path, cfg: Config, data_dir: Path, out_dir: Path
             ) -> tuple[dict[str, dict], dict[str, Path]]:
    """Run every suite in both modes and write the report. Returns (summaries per mode, report paths).

    ``model``: a :class:`~cv_ray.models.ModelRef` (the run's image bounds), or a bare model directory.
    """
    return evaluate_models({"model": ModelRef.of(model)}, cfg, data_dir, out_dir)["model"]


def evaluate_models(models: dict[str, ModelRef], cfg: Config, data_dir: Path, out_dir: Path
                    ) -> dict[str, tuple[dict[str, dict], dict[str, Path]]]:
    """Evaluate several models of one architecture (e.g. base, SFT, RL) on the same suites, through one
    set of actors: the rollout engines load each next model's weights instead of restarting.

    One model: its report goes to ``out_dir``. Several: each to ``out_dir/<name>/``, the last one's
    (the newest) also to ``out_dir``, and ``out_dir/comparison.md`` / ``comparison.json`` set them
    side by side (:func:`cv_ray.eval.report.write_comparison`).
    """
    from cv_ray.episode_groups import EpisodeGroups
    from cv_ray.models import load_state_dict

    if not models:
        raise ValueError("no model to evaluate")
    suites = [load_suite(name, data_dir, cfg.data.seed, cfg.data.suite_size, cfg.data.image_size,
                         cfg.data.skip_bad_rows) for name in cfg.eval.suites]
    tasks = [(suite, task) for suite, suite_tasks in suites for task in suite_tasks]
    if not tasks:
        raise ValueError(f"eval.suites={cfg.eval.suites} hold no tasks")
    modes = [m for m, on in (("with_tools", cfg.eval.with_tools), ("without_tools", cfg.eval.without_tools)) if on]
    log.info("eval: %s on %d tasks (%s), modes %s", ", ".join(f"{n}={m.path}" for n, m in models.items()),
             len(tasks), ", ".join(s for s, _ in suites), modes)

    suite_of = {task.uid: suite for suite, task in tasks}
    rollout_cfg = replace(cfg.rollout, temperature=cfg.eval.temperature)
    results: dict[str, tuple[dict[str, dict], dict[str, Path]]] = {}
    first = next(iter(models.values()))
    with EpisodeGroups.start(first, rollout_cfg, cfg.sandbox, cfg.reward) as groups:
        for name, model in models.items():
            if model is not first:
                groups.rollout.update_weights(load_state_dict(model.path))
            summaries: dict[str, dict[str, Any]] = {}
            for mode in modes:
                use_tools = mode == "with_tools"
                scored = groups.play([task for _, task in tasks], cfg.eval.n_samples, use_tools=use_tools)
                records = [eval_record(task, traj, b, suite_of[task.uid], use_tools)
                           for task, traj, b in scored.triples()]
                summaries[mode] = summarize(records)
                log.info("eval %s %s: accuracy %.3f", name, mode, summaries[mode]["accuracy"])
            target = out_dir if len(models) == 1 else Path(out_dir) / name
            results[name] = (summaries, write_report(target, summaries, title=f"cv_ray evaluation of {name}: "
                                                                               f"{Path(model.path).name}"))
    if len(models) > 1:
        newest = list(results)[-1]
        paths = write_report(out_dir, results[newest][0],
                             title=f"cv_ray evaluation of {newest}: {Path(models[newest].path).name}")
        paths.update(write_comparison(out_dir, {name: s for name, (s, _) in results.items()}))
        results[newest] = (results[newest][0], paths)
    return results
