"""The learning demo's script (examples/learning_demo/run.py) end to end at smoke size.

Its phases run in order (data, the held-out evaluations of the base, SFT and RL models through one set
of actors that loads each next model's weights, the driver's SFT and RL stages), it writes
``metrics.json`` and the learning curve, and no actor outlives its phase. Whether SFT and GRPO teach
the task is asserted by ``tests/test_quickstart.py``, which runs the same recipe shortened through
``cv-ray`` (the default run); the demo's full run and its figures are in its README. The script runs
in the background from the start of the session, beside the quickstart (tests/long_runs.py), joined
to the session's Ray cluster.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

def test_the_demo_script_runs_its_phases_and_writes_its_report(long_runs):
    out = long_runs.result("demo")  # run.py with tests/long_runs.py's DEMO_SMOKE overrides
    assert out.returncode == 0, out.stderr[-4000:]
    run = long_runs.demo_dir
    metrics = json.loads((run / "metrics.json").read_text())
    for stage in ("base", "sft", "rl"):
        for kind in ("greedy", "sampled"):
            assert 0.0 <= metrics["evals"][stage][kind]["accuracy"] <= 1.0
    assert len(metrics["mean_reward_by_step"]) == 2 and metrics["counts"]["sft_steps"] == 4
    assert sorted(metrics["heldout_accuracy_greedy_by_step"]) == ["0", "1", "2"]  # SFT, then each RL step
    # No actor outlives its phase (mutant: an SFT or RL stage that leaves its learner ranks or rollout
    # workers running): after SFT and RL only the held-out evaluator's actors are alive, then none.
    evaluator = metrics["evaluator_actors"]
    assert evaluator == 4  # 2 sandbox executors, 1 rollout worker, 1 reward worker
    assert metrics["live_actors_after"] == {"sft": evaluator, "rl": evaluator, "evaluations": evaluator, "end": 0}
    assert (run / "rl_model" / "model.safetensors").exists()
    assert (run / "learning_curve.png").stat().st_size > 10_000
