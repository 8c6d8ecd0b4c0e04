"""The README's run command, `cv-ray` with no arguments (experiment=quickstart), end to end.

The first five minutes of a new user: data of the learning demo's task, SFT (100 steps) that teaches
the tool-call format and the fix, 8 GRPO steps on upright images whose reward must be non-zero with
tool calls in every step and rise, and an evaluation where the trained models beat the base model with
tools, closed by the summary table. Beside it, from its SFT model once SFT is done, the asynchronous
loop trains on the same tasks (issue 19's shortened learning test). Both run in the background from
the start of the session with the demo's smoke run (tests/long_runs.py), joined to the session's Ray
cluster; everything else is the default configuration.

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
from pathlib import Path

import numpy as np
import pytest
from long_runs import ASYNC_STEPS

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def quickstart(long_runs) -> tuple[Path, str]:
    out = long_runs.result("quickstart")
    assert out.returncode == 0, out.stderr[-4000:]
    return long_runs.quickstart_dir, out.stdout


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


def test_asynchronous_rl_from_the_quickstart_sft_model_raises_the_reward(long_runs):
    """RL from the quickstart's SFT model on its tasks, asynchronous (``trainer.rl.max_staleness=1``, the
    README's one override): the reward rises, every trained trajectory is at most one version stale, and
    the off-policy correction is on.

    The quickstart's recipe (two updates of lr 2e-4 per step, which the asynchronous loop needs: with
    one update per step there is no trust region, and batches sampled one version back pushed the
    policy past where the previous update had taken it, 3 of 3 runs on the demo's task), with 10 steps
    instead of 8: steps 0 and 1 both sample the SFT policy (step 1's groups start while step 0
    updates), whose mean is the baseline. Mutants: a loop that never pushes new weights to the rollout
    engines (the reward cannot rise); a staleness bound that is not kept (histogram keys above 1)."""
    out, steps = long_runs.result("async"), ASYNC_STEPS
    assert out.returncode == 0, out.stderr[-4000:]
    rl = _rl_rows(long_runs.async_dir)
    reward = [row["reward/total"] for row in rl]
    assert len(reward) == steps
    assert float(np.median(reward[-3:])) > np.mean(reward[:2]) + 0.35, \
        f"reward did not rise: {[round(r, 2) for r in reward]}"
    stale = {key for row in rl for key in row if key.startswith("async/staleness/")}
    assert stale <= {"async/staleness/0", "async/staleness/1"} and "async/staleness/1" in stale
    assert all(row["learner/rl/tis_weight"] > 0 and row["async/stale_dropped"] == 0 for row in rl)
    assert all(row["weights/path/object_store"] == 1 for row in rl)
    assert (long_runs.async_dir / "rl_model" / "model.safetensors").exists()
    assert json.loads((long_runs.async_dir / "summary.json").read_text())["rl"]["live_actors_after"] == 0
