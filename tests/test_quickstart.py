"""The README's run command, `cv-ray` with no arguments (experiment=quickstart), end to end.

The first five minutes of a new user: data of the learning demo's task, SFT (100 steps) that teaches
the tool-call format and the fix, 8 GRPO steps on upright images whose reward must be non-zero with
tool calls in every step and rise, and an evaluation where the trained models beat the base model with
tools, closed by the summary table. The run joins the test session's Ray cluster (``RAY_ADDRESS``);
everything else is the default configuration. Beside it, from its SFT model once SFT is done, the
asynchronous loop trains on the same tasks (issue 19's shortened learning test).

The reward rise is asserted as the learning demo's CI test did when it ran this recipe (8 upright
tasks x 16 samples, 30% warm-up): the median of the last 3 steps against step 0, with a margin of 0.35
(about 4 standard deviations of the per-step noise at 16 samples, measured there: a loop that cannot
learn, at lr 1e-12, stays within 0.23; a working one rose by 0.59-0.77 in 10 runs at one update of lr
3e-4 per step). The recipe now takes two updates of lr 2e-4 per step (what the asynchronous loop
needs, conf/experiment/quickstart.yaml); measured on 2026-11-30: 1.16 1.36 1.57 1.75 1.69 1.63 1.75
1.82 (a rise of 0.59).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CV_RAY = str(Path(sys.executable).with_name("cv-ray"))


ASYNC_STEPS = 10


@dataclass
class Runs:
    """The quickstart run and the asynchronous RL run started from its SFT model."""

    quickstart: Path
    stdout: str
    asynchronous: Path
    async_result: subprocess.CompletedProcess


def _sft_done(run: Path) -> bool:
    """The driver rewrites summary.json after each stage; "sft" in it means sft_model/ is complete."""
    try:
        return "sft" in json.loads((run / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return False


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory) -> Runs:
    """``cv-ray`` with no arguments; once its SFT stage is done, the asynchronous RL run from its SFT
    model starts beside it (it needs nothing else of the quickstart run, and two runs fill the 2 cores
    better than one after the other: about a minute less of suite time)."""
    root = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    run, logs = root / "quickstart", {name: (root / f"{name}.out", root / f"{name}.err") for name in ("qs", "async")}

    def start(name: str, args: list[str]) -> subprocess.Popen:
        out, err = logs[name]
        with out.open("w") as stdout, err.open("w") as stderr:
            return subprocess.Popen(args, stdout=stdout, stderr=stderr, text=True, env=env, cwd=root)

    quick = start("qs", [CV_RAY, f"trainer.run_root={root}"])
    deadline = time.monotonic() + 1500
    while not _sft_done(run) and quick.poll() is None and time.monotonic() < deadline:
        time.sleep(1.0)
    second = None
    if _sft_done(run):
        second = start("async", [
            CV_RAY, f"trainer.run_root={root}", "trainer.name=quickstart_async", "trainer.stage=rl",
            f"model.path={run / 'sft_model'}", f"data.dir={run / 'data'}", "trainer.rl.max_staleness=1",
            f"trainer.rl.steps={ASYNC_STEPS}"])
    try:
        quick.wait(timeout=max(1.0, deadline - time.monotonic()))
        if second is not None:
            second.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in (quick, second):
            if process is not None and process.poll() is None:
                process.kill()
    assert quick.returncode == 0, logs["qs"][1].read_text()[-4000:]
    assert second is not None, "the quickstart's SFT stage never finished"
    result = subprocess.CompletedProcess(second.args, second.returncode, logs["async"][0].read_text(),
                                         logs["async"][1].read_text())
    return Runs(run, logs["qs"][0].read_text(), root / "quickstart_async", result)


@pytest.fixture(scope="module")
def quickstart(runs: Runs) -> tuple[Path, str]:
    return runs.quickstart, runs.stdout


def _rl_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "rl"]


def test_rl_rewards_are_non_zero_with_tool_calls_and_rise(quickstart):
    """Mutant: a weight push that never reaches the rollout engine (the reward stays at its SFT level)."""
    run, _ = quickstart
    rows = _rl_rows(run)
    assert [r["step"] for r in rows] == list(range(8))
    assert all(r["reward/total"] > 0 and r["rollout/tool_calls_mean"] > 0.5 for r in rows)
    assert all(r["tool_use/valid_call_rate"] > 0.5 for r in rows)
    reward = [r["reward/total"] for r in rows]
    assert float(np.median(reward[-3:])) > reward[0] + 0.35, f"reward did not rise: {[round(x, 2) for x in reward]}"


def test_trained_models_beat_the_base_model_and_the_run_ends_with_its_summary(quickstart):
    run, stdout = quickstart
    summary = json.loads((run / "summary.json").read_text())
    rows = {r["model"]: r for r in summary["eval"]["comparison"]}
    assert list(rows) == ["base", "sft", "rl"]
    assert rows["base"]["accuracy_with_tools"] == 0.0  # the base model never answers in the format
    # Sampled at the training temperature: SFT measured 0.47 with 0.85 of its calls valid, RL 0.77 / 0.93.
    assert rows["sft"]["accuracy_with_tools"] >= 0.3 and rows["sft"]["valid_calls"] >= 0.7
    assert rows["rl"]["accuracy_with_tools"] > rows["base"]["accuracy_with_tools"]
    assert {stage: summary[stage]["live_actors_after"] for stage in ("data", "sft", "rl", "eval")} == \
        {"data": 0, "sft": 0, "rl": 0, "eval": 0}
    assert "held-out evaluation, with tools (sampled at temperature 0.6, 4 per task):" in stdout
    assert "RL: reward" in stdout
    assert "dashboard:" in stdout and (run / "dashboard" / "index.html").exists()
    assert (run / "eval" / "comparison.md").exists() and (run / "eval" / "report.md").exists()


def test_asynchronous_rl_from_the_quickstart_sft_model_raises_the_reward(runs):
    """RL from the quickstart's SFT model on its tasks, asynchronous (``trainer.rl.max_staleness=1``, the
    README's one override): the reward rises, every trained trajectory is at most one version stale, and
    the off-policy correction is on.

    The quickstart's recipe (two updates of lr 2e-4 per step, which the asynchronous loop needs: with
    one update per step there is no trust region, and batches sampled one version back pushed the
    policy past where the previous update had taken it, 3 of 3 runs on the demo's task), with 10 steps
    instead of 8: steps 0 and 1 both sample the SFT policy (step 1's groups start while step 0
    updates), whose mean is the baseline. Mutants: a loop that never pushes new weights to the rollout
    engines (the reward cannot rise); a staleness bound that is not kept (histogram keys above 1)."""
    out, steps = runs.async_result, ASYNC_STEPS
    assert out.returncode == 0, out.stderr[-4000:]
    rl = _rl_rows(runs.asynchronous)
    reward = [row["reward/total"] for row in rl]
    assert len(reward) == steps
    assert float(np.median(reward[-3:])) > np.mean(reward[:2]) + 0.35, \
        f"reward did not rise: {[round(r, 2) for r in reward]}"
    stale = {key for row in rl for key in row if key.startswith("async/staleness/")}
    assert stale <= {"async/staleness/0", "async/staleness/1"} and "async/staleness/1" in stale
    assert all(row["learner/rl/tis_weight"] > 0 and row["async/stale_dropped"] == 0 for row in rl)
    assert all(row["weights/path/object_store"] == 1 for row in rl)
    assert (runs.asynchronous / "rl_model" / "model.safetensors").exists()
