"""A short run for the dashboard, tracker and wandb tests, built from real pieces in a few seconds.

Real: the learning demo's tasks (cv_ray.data.demo_family), the agent loop (cv_ray.agent.loop) with the
tiny Qwen2.5-VL's processor and chat codec, every tool call run by a real ``SandboxPool``, the
reward's ``outcome_from_trajectory`` + ``score_group`` and its ``mean_breakdown`` metrics, the
rollout's ``batch_metrics``, the evaluation's ``eval_record`` + ``summarize`` + ``write_report``,
and the ``Tracker`` that writes everything. Scripted: what the model says (``ScriptedEngine``
replays fixed turns: a correct fix in one call or in two, a crop with a wrong answer, a failing call followed by a
malformed one, a blind answer, a turn that neither calls nor answers), and the SFT and learner
numbers (``sft/*``, ``learner/rl/*``), which need a DeepSpeed learner and are made up here.
Not covered: Ray actors, the driver's order of things, a learner, real sampling.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from cv_ray.agent.chat import ChatCodec
from cv_ray.agent.loop import AgentLoop
from cv_ray.agent.tool_format import format_tool_call
from cv_ray.agent.tool_runner import LocalToolRunner
from cv_ray.config import LoggerConfig
from cv_ray.dashboard import RolloutSample
from cv_ray.data.demo_family import COLOURS, generate_demo_task
from cv_ray.eval.metrics import summarize
from cv_ray.eval.report import write_report
from cv_ray.eval.runner import eval_record
from cv_ray.reward import outcome_from_trajectory, score_group
from cv_ray.reward.config import RewardConfig
from cv_ray.reward.dense import mean_breakdown
from cv_ray.rollout.config import RolloutConfig
from cv_ray.rollout.metrics import batch_metrics
from cv_ray.rollout.scripted_engine import ScriptedEngine
from cv_ray.tracking import Tracker
from cv_ray.types import Task

_TRANSPOSE = {"rotate_90": "ROTATE_90", "rotate_180": "ROTATE_180", "rotate_270": "ROTATE_270"}


def script(name: str, task: Task) -> list[str]:
    """The assistant turns of one scripted behaviour on ``task``."""
    half = task.images[0].width // 2
    fix = [op for op in task.required_ops if op != "crop"]
    crop = f".crop((0, 0, {half}, {half}))"
    wrong = next(c for c in COLOURS if c != task.answer)
    if name == "fix":  # undo the turn and crop the corner in one call, then answer right
        code = f"result = image.transpose(Image.Transpose.{_TRANSPOSE[fix[0]]}){crop}" if fix else f"result = image{crop}"
        return [f"<think>Turn it upright, then look at the corner.</think>\n{format_tool_call(code, 0)}",
                f"<think>The crop shows the corner.</think><answer>{task.answer}</answer>"]
    if name == "two_step":  # undo the turn, then crop the corner of the call's output (image 1)
        turn = f"result = image.transpose(Image.Transpose.{_TRANSPOSE[fix[0]]})" if fix else "result = image.copy()"
        return [format_tool_call(turn, 0), format_tool_call(f"result = image{crop}", 1),
                f"<answer>{task.answer}</answer>"]
    if name == "crop_only":  # crop without turning, answer wrong
        return [format_tool_call(f"result = image{crop}", 0), f"<answer>{wrong}</answer>"]
    if name == "broken":  # a runtime error, then a malformed call, then a right answer
        return [format_tool_call("result = undefined_name", 0), "<tool_call>\n{oops\n</tool_call>",
                f"<answer>{task.answer}</answer>"]
    if name == "blind":
        return [f"<answer>{task.answer}</answer>"]
    if name == "ramble":
        return ["<think>I am not sure what to do.</think>"]
    raise ValueError(name)


#: Per RL step: (task indices, scripts per task). Step 2 drops the tool: the collapse alarm fires there.
RL_STEPS = [((0, 1), ("fix", "crop_only", "broken", "blind")),
            ((2, 3), ("fix", "two_step", "broken", "ramble")),
            ((4, 5), ("blind", "blind", "ramble", "crop_only"))]
VAL_TASKS = (100, 101)
SFT_LOSS = (2.0, 1.4, 1.1, 0.9)
"""Made-up SFT losses (the SFT stage needs a learner)."""


@dataclass
class ShortRun:
    run_dir: Path
    tracker: Tracker
    samples: dict[tuple[str, int], list[RolloutSample]] = field(default_factory=dict)
    """(stage, step) -> the samples logged, in order."""
    pool: object = None


def _rollout(codec: ChatCodec, tools: LocalToolRunner, pairs: list[tuple[Task, str]], use_tools: bool = True):
    """One trajectory per (task, script), sample indices counted per task; then the reward per task group."""
    cfg = RolloutConfig(max_turns=4, max_new_tokens_per_turn=256, max_response_tokens=2048)

    async def run_all():
        counts: dict[str, int] = {}
        jobs = []
        for task, name in pairs:
            k = counts[task.uid] = counts.get(task.uid, -1) + 1
            loop = AgentLoop(ScriptedEngine(codec, script(name, task)), codec, tools, cfg)
            jobs.append(loop.run(task, sample_index=k, use_tools=use_tools))
        return await asyncio.gather(*jobs)

    trajectories = asyncio.run(run_all())
    groups: dict[str, tuple[Task, list]] = {}
    for (task, _), traj in zip(pairs, trajectories):
        groups.setdefault(task.uid, (task, []))[1].append(traj)
    breakdowns = {}
    for task, trajs in groups.values():
        for traj, b in zip(trajs, score_group(task, [outcome_from_trajectory(t) for t in trajs], RewardConfig())):
            breakdowns[(traj.uid, traj.sample_index)] = b
    return [(task, traj, breakdowns[(traj.uid, traj.sample_index)]) for (task, _), traj in zip(pairs, trajectories)]


def build_short_run(run_dir: Path, processor, pool, logger: LoggerConfig | None = None,
                    config: dict | None = None) -> ShortRun:
    """SFT rows, three RL steps with their trajectories, validation at steps 1 and 2, and an eval report.

    The tracker is left open (the run is "going"): the caller may log more, then ``close()`` it.
    """
    codec = ChatCodec(processor)
    tools = LocalToolRunner(pool)
    logger = logger or LoggerConfig(backends=["jsonl"], collapse_window=2, collapse_drop=0.5)
    tracker = Tracker(logger, run_dir, run_name="short", config=config or {"reward": {}})
    run = ShortRun(run_dir, tracker, pool=pool)
    for step, loss in enumerate(SFT_LOSS):
        tracker.log({"sft/loss": loss, "sft/grad_norm": 1.0 / (step + 1), "time/step_s": 0.5 + step / 10}, step=step,
                    stage="sft")
    val_pairs = [(generate_demo_task(0, i, split="val"), name) for i in VAL_TASKS for name in ("fix",)]
    for step, (task_ids, names) in enumerate(RL_STEPS):
        tasks = [generate_demo_task(0, i) for i in task_ids]
        scored = _rollout(codec, tools, [(task, name) for task in tasks for name in names])
        metrics = batch_metrics([traj for _, traj, _ in scored], wall_s=1.0)
        metrics.update({f"reward/{k}": v for k, v in mean_breakdown([b for _, _, b in scored]).items()})
        metrics.update({"learner/rl/kl": 0.01 * step, "learner/rl/entropy": 2.0 - 0.1 * step,
                        "learner/rl/loss": 0.1 - 0.05 * step, "time/rollout_s": 1.0, "time/update_s": 0.5 + step})
        if step >= 1:  # validation: greedy in a real run; scripted here
            val = _rollout(codec, tools, val_pairs)
            metrics.update({"eval/accuracy": sum(b.correct for _, _, b in val) / len(val),
                            "eval/reward": sum(b.total for _, _, b in val) / len(val),
                            "eval/tool_use_rate": sum(bool(t.tool_calls) for _, t, _ in val) / len(val)})
            run.samples[("val", step)] = [RolloutSample.from_rollout(*x) for x in val]
            tracker.log_samples(run.samples[("val", step)], step=step, stage="val")
        run.samples[("rl", step)] = [RolloutSample.from_rollout(*x) for x in scored]
        tracker.log_samples(run.samples[("rl", step)], step=step, stage="rl")
        tracker.log(metrics, step=step, stage="rl")
    with_tools = _rollout(codec, tools, val_pairs)
    without = _rollout(codec, tools, [(task, "blind") for task, _ in val_pairs], use_tools=False)
    summaries = {"with_tools": summarize([eval_record(*x, suite="demo", with_tools=True) for x in with_tools]),
                 "without_tools": summarize([eval_record(*x, suite="demo", with_tools=False) for x in without])}
    write_report(run_dir / "eval", summaries, title="short run evaluation")
    tracker.log_eval_report(run_dir / "eval")
    return run
