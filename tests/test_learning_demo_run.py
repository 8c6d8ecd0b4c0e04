"""The learning demo (examples/learning_demo/run.py) end to end, shortened: SFT must teach the task.

The demo's own recipe (conf/experiment/learning_demo.yaml: 512 SFT trajectories, 100 SFT steps,
then GRPO at temperature 0.6) with 16 held-out tasks and 2 RL steps. What is asserted is what the
recipe reliably does: the random base model never answers, SFT makes it call the tool validly and
answer mostly right, and the RL stage runs its steps and writes the report. That RL *raises* the
reward is not asserted: over 24-48 steps it did not do so reliably in this repository's runs (see
the demo's README, "Results").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[1] / "examples" / "learning_demo" / "run.py"


def test_shortened_demo_sft_teaches_the_tool_and_the_answer(tmp_path):
    overrides = [f"trainer.run_root={tmp_path}", "trainer.name=short", "data.num_rl_tasks=16",
                 "data.num_val_tasks=16", "trainer.rl.steps=2", "trainer.eval_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(DEMO), *overrides], capture_output=True, text=True, timeout=900,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    metrics = json.loads((tmp_path / "short" / "metrics.json").read_text())
    assert metrics["heldout_accuracy_greedy_base"] == 0.0 and metrics["valid_tool_call_rate_base"] in (None, 0.0)
    assert metrics["heldout_accuracy_greedy_sft"] >= 0.6, metrics["evals"]["sft"]
    assert metrics["valid_tool_call_rate_sft"] >= 0.7, metrics["evals"]["sft"]
    assert metrics["heldout_accuracy_sft"] > metrics["chance_accuracy"], metrics["evals"]["sft"]
    assert len(metrics["mean_reward_by_step"]) == 2 and metrics["counts"]["sft_steps"] == 100
    assert (tmp_path / "short" / "rl_model" / "model.safetensors").exists()
    assert (tmp_path / "short" / "learning_curve.png").stat().st_size > 10_000
