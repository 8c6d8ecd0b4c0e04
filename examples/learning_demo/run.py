"""The learning demonstration: SFT, then GRPO, measurably teach the tiny Qwen2.5-VL to fix orientation with code.

The task family (cv_ray/data/demo_family.py): a 112 px image with four coloured quadrants, shaded in
stripes that are dark on top, turned by 0/90/180/270 degrees; the question asks for the colour of
the top-left corner of the *upright* image (chance: 1 in 4). The model must see which way the
stripes point, call the code tool with the rotation that puts their dark sides on top plus a crop
of the top-left quadrant, and name the colour of the tool's output.

Phases, each timed, on a local Ray (2 CPU cores are enough):

    1 data        RL train/val tasks and SFT trajectories executed in the real sandbox
    2 eval base   held-out tasks, greedy and sampled: accuracy, required-op recall, valid tool calls,
                  mean reward
    3 SFT         the driver's SFT stage (cv_ray.driver.stage_sft) on the trajectories
    4 eval SFT
    5 RL          the driver's GRPO stage (cv_ray.driver.stage_rl: its canonical rl_step, dense reward,
                  weight push; with trainer.rl.max_staleness=1 its asynchronous step), validating
                  greedily on the held-out tasks every trainer.eval_every steps
    6 eval RL
    7 report      <run>/metrics.json and <run>/learning_curve.png

Run (the config is conf/experiment/learning_demo.yaml; any Hydra override may follow):

    OMP_NUM_THREADS=1 .venv/bin/python examples/learning_demo/run.py
    OMP_NUM_THREADS=1 .venv/bin/python examples/learning_demo/run.py trainer.rl.steps=4 trainer.name=quick
    OMP_NUM_THREADS=1 .venv/bin/python examples/learning_demo/run.py trainer.rl.max_staleness=1  # asynchronous RL

Everything goes to runs/<trainer.name>/ (default runs/learning_demo/); a previous demo run there is
replaced. Exit code 0 when the run finished (targets met or not: read metrics.json).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"
# What a previous demo run leaves in its run directory (the tiny base model is kept: it is seeded).
RUN_OUTPUTS = ("data", "sft_model", "rl_model", "checkpoints", "dashboard", "metrics.jsonl", "metrics.json",
               "summary.json", "learning_curve.png", "config.resolved.yaml")

log = logging.getLogger("learning_demo")

SAMPLED_EPISODES = 4
"""Episodes per held-out task for the sampled evaluation (64 tasks x 4 = 256 episodes)."""

def load_config(overrides: list[str]):
    """The typed, validated config of `experiment=learning_demo` plus command-line overrides."""
    from hydra import compose, initialize_config_dir

    from cv_ray.config import register_configs, to_typed, validate

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(config_name="config", overrides=["experiment=learning_demo", *overrides])
    cfg = to_typed(raw)
    validate(cfg)
    return cfg


class HeldoutEvaluator:
    """Held-out evaluations of the base, SFT and RL models through one set of actors.

    On CPU most of an evaluation's cost would be starting its rollout worker (a process that imports
    torch and transformers, then loads the model), so the worker stays up across the phases and loads
    each next model's weights instead, through the rollout engines' weight-update path (the one the
    learner's weight push takes). Idle between evaluations, its actors only hold memory.
    """

    def __init__(self, cfg, model) -> None:
        from cv_ray.episode_groups import EpisodeGroups

        self.cfg, self.model_dir = cfg, Path(model.path)
        self.groups = EpisodeGroups.start(model, cfg.rollout, cfg.sandbox, cfg.reward)
        self.actor_count = sum(len(g.actors) for g in (self.groups.sandbox, self.groups.rollout, self.groups.reward))

    def evaluate(self, model_dir: Path, tasks: list) -> dict[str, dict[str, Any]]:
        """Episodes of ``model_dir`` on ``tasks``, decoded two ways: ``greedy`` (one episode per task)
        and ``sampled`` (:data:`SAMPLED_EPISODES` per task at the training temperature
        ``rollout.temperature``: the policy RL optimises, as a pass@1 estimate).

        Each holds the eval package's accuracy and required-op recall, the valid tool-call rate (share
        of attempted calls that parsed and ran; None when no call was made) and the mean dense reward.
        """
        from cv_ray.models import load_state_dict

        if model_dir != self.model_dir:
            self.groups.rollout.update_weights(load_state_dict(model_dir))
            self.model_dir = model_dir
        cfg = self.cfg
        return {"greedy": _decoded_eval(self.groups, tasks, 1, cfg.eval.temperature),
                "sampled": _decoded_eval(self.groups, tasks, SAMPLED_EPISODES, cfg.rollout.temperature)}

    def close(self) -> None:
        self.groups.shutdown()


def _decoded_eval(groups, tasks: list, n: int, temperature: float) -> dict[str, Any]:
    from cv_ray.eval.metrics import summarize
    from cv_ray.eval.runner import eval_record

    triples = groups.play(tasks, n, temperature=temperature).triples()
    for task, traj, b in triples[:1]:
        log.info("sample %s (%s, answer %s, reward %.2f, stop %s, temperature %g):\n%s", task.uid,
                 task.extra.get("transform"), task.answer, b.total, traj.stop_reason, temperature, traj.response_text)
    summary = summarize([eval_record(task, traj, b, "heldout", True) for task, traj, b in triples])
    calls = [call for _, traj, _ in triples for call in traj.tool_calls]
    needed = [traj for task, traj, _ in triples if task.required_ops]
    return {
        "accuracy": summary["accuracy"],
        "op_recall": summary["op_recall"],
        "op_precision": summary["op_precision"],
        "valid_tool_call_rate": sum(c.ok for c in calls) / len(calls) if calls else None,
        "tool_calls": len(calls),
        "tool_use_rate_when_required": float(np.mean([len(t.tool_calls) > 0 for t in needed])) if needed else None,
        "answer_rate": float(np.mean([t.stop_reason == "answer" for _, t, _ in triples])),
        "mean_reward": float(np.mean([b.total for _, _, b in triples])),
        "accuracy_by_turn": summary["accuracy_by_transform"] or None,
        "temperature": temperature,
        "episodes": len(triples),
    }


def _rl_timing(metrics_path: Path) -> dict[str, Any]:
    """Per RL step wall seconds, and for an asynchronous run the staleness histogram (trajectories per
    staleness, summed over steps) and the mean learner / rollout idle fractions (from metrics.jsonl)."""
    if not metrics_path.exists():
        return {}
    rows = [row for row in map(json.loads, metrics_path.read_text().splitlines()) if row["stage"] == "rl"]
    staleness: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("async/staleness/"):
                staleness[key.rsplit("/", 1)[1]] = staleness.get(key.rsplit("/", 1)[1], 0.0) + value
    out: dict[str, Any] = {"step_s": [round(row["time/step_s"], 2) for row in rows]}
    if staleness:
        out["staleness_counts"] = staleness
        for key in ("async/learner_idle_frac", "async/rollout_idle_frac"):
            values = [row[key] for row in rows if key in row]
            out[key.split("/")[1] + "_mean"] = round(float(np.mean(values)), 3) if values else None
    return out


def plot_curve(path: Path, reward_by_step: list[float], train_accuracy: list[float], eval_steps: list[int],
               eval_accuracy: list[float]) -> None:
    """Per RL step: mean reward and accuracy of the training rollouts (sampled); held-out greedy
    accuracy at the validation points (step 0 = the SFT model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(7, 4))
    steps = list(range(1, len(reward_by_step) + 1))
    left.plot(steps, reward_by_step, color="tab:blue", marker=".", label="mean dense reward (training rollouts)")
    left.set_xlabel("RL step")
    left.set_ylabel("mean dense reward", color="tab:blue")
    right = left.twinx()
    right.plot(steps, train_accuracy, color="tab:orange", marker=".", label="accuracy of training rollouts (sampled)")
    right.plot(eval_steps, eval_accuracy, color="tab:red", marker="o", label="held-out accuracy (greedy)")
    right.set_ylabel("accuracy")
    right.set_ylim(0, 1.05)
    right.axhline(0.25, color="gray", linestyle=":", linewidth=1, label="chance (1 in 4)")
    left.set_title("learning demo: colour of the upright top-left corner")
    # Below the axes, in a band kept free for it: inside, it covered the curves and the tick labels.
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


class Phases:
    """Wall seconds per named phase, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args):
        log.info("== %s", name)
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        log.info("== %s done in %.1f s", name, self.seconds[name])
        return out


def main(overrides: list[str]) -> dict[str, Any]:
    from cv_ray.actor_group import live_actors
    from cv_ray.cluster import init_ray
    from cv_ray.config import as_dict, to_yaml
    from cv_ray.data.demo_family import build_demo_dataset
    from cv_ray.data.records import read_tasks
    from cv_ray.driver import RunContext, stage_rl, stage_sft
    from cv_ray.models import prepare_model
    from cv_ray.sandbox import SandboxPool
    from cv_ray.tracking import Tracker

    started = time.perf_counter()
    cfg = load_config(overrides)
    work_dir = Path(cfg.trainer.work_dir)
    for name in RUN_OUTPUTS:
        stale = work_dir / name
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.resolved.yaml").write_text(to_yaml(cfg))
    phases = Phases()
    base_model, _family = phases.run("model", prepare_model, cfg.model.path, cfg.model.family, cfg.model.build_tiny,
                                    cfg.model.tiny_spec)
    init_ray(num_cpus=cfg.trainer.ray_num_cpus)
    tracker = Tracker(cfg.logger, work_dir, run_name=work_dir.name, config=as_dict(cfg))
    ctx = RunContext(cfg, work_dir, Path(base_model), tracker)
    live_after: dict[str, int] = {}  # actors alive after each phase: only the evaluator's may outlive one
    try:
        def data() -> dict[str, Any]:
            with SandboxPool(cfg.sandbox) as pool:
                return build_demo_dataset(ctx.data_dir, pool, cfg.data.seed, cfg.data.num_rl_tasks,
                                          cfg.data.num_val_tasks, cfg.data.num_sft_trajectories,
                                          cfg.rollout.system_prompt, cfg.data.image_size)

        manifest = phases.run("data", data)
        heldout = list(read_tasks(ctx.data_dir / "rl_val.parquet"))
        evaluator = HeldoutEvaluator(cfg, ctx.model_ref(ctx.base_model))
        try:
            evals = {"base": phases.run("eval_base", evaluator.evaluate, ctx.base_model, heldout)}
            log.info("base: %s", evals["base"])
            sft = phases.run("sft", stage_sft, ctx)
            live_after["sft"] = len(live_actors())
            evals["sft"] = phases.run("eval_sft", evaluator.evaluate, work_dir / "sft_model", heldout)
            log.info("sft: %s", evals["sft"])
            rl = phases.run("rl", stage_rl, ctx)
            live_after["rl"] = len(live_actors())
            evals["rl"] = phases.run("eval_rl", evaluator.evaluate, work_dir / "rl_model", heldout)
            log.info("rl: %s", evals["rl"])
            live_after["evaluations"] = len(live_actors())
        finally:
            evaluator.close()
        live_after["end"] = len(live_actors())
    finally:
        tracker.close()

    history = rl["history"]
    reward_by_step = [row["reward/total"] for row in history]
    eval_points = [(i + 1, row["eval/accuracy"]) for i, row in enumerate(history) if "eval/accuracy" in row]
    eval_steps = [0] + [s for s, _ in eval_points]
    eval_accuracy = [evals["sft"]["greedy"]["accuracy"]] + [a for _, a in eval_points]
    train_accuracy = [row["reward/correct"] for row in history]
    plot_curve(work_dir / "learning_curve.png", reward_by_step, train_accuracy, eval_steps, eval_accuracy)
    metrics = {
        **{f"{name}_{stage}": evals[stage]["sampled"][key]
           for name, key in (("heldout_accuracy", "accuracy"), ("valid_tool_call_rate", "valid_tool_call_rate"),
                             ("op_recall", "op_recall"), ("mean_reward_heldout", "mean_reward"))
           for stage in ("base", "sft", "rl")},
        **{f"heldout_accuracy_greedy_{stage}": evals[stage]["greedy"]["accuracy"] for stage in ("base", "sft", "rl")},
        "mean_reward_by_step": reward_by_step,
        "train_sampled_accuracy_by_step": train_accuracy,
        "heldout_accuracy_greedy_by_step": dict(zip(eval_steps, eval_accuracy)),
        "chance_accuracy": 0.25,
        "evals": evals,
        "wall_s": {**phases.seconds, "total": round(time.perf_counter() - started, 1)},
        "counts": {**manifest["counts"], "sft_steps": sft["steps"], "rl_steps": rl["steps"]},
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": os.cpu_count()},
        "overrides": overrides,
        "live_actors_after": live_after,
        "evaluator_actors": evaluator.actor_count,
        "rl_steps_timing": _rl_timing(tracker.metrics_path),
    }
    (work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"run directory: {work_dir.resolve()}\n  metrics: {work_dir / 'metrics.json'}\n"
          f"  curve:   {work_dir / 'learning_curve.png'}")
    print("held-out accuracy, sampled  base {:.3f}  SFT {:.3f}  RL {:.3f} | greedy  base {:.3f}  SFT {:.3f}  RL {:.3f}"
          .format(*(metrics[f"heldout_accuracy{kind}_{stage}"] for kind in ("", "_greedy")
                    for stage in ("base", "sft", "rl"))))
    print("valid tool calls  SFT {}  RL {}   wall {:.0f} s".format(
        metrics["valid_tool_call_rate_sft"], metrics["valid_tool_call_rate_rl"], metrics["wall_s"]["total"]))
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main(sys.argv[1:])
