"""The `cv-ray` driver end to end on the tiny model, as a user runs it (subprocesses, local Ray).

One module-scoped pipeline run (data, 2 SFT steps, 2 RL steps with 2 sandbox executors and 1 reward
worker, eval) feeds the checks; then a run is killed after its first checkpoint and restarted with
`trainer.resume=auto`; then a two-job reward-weight sweep writes its summary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

CV_RAY = str(Path(sys.executable).with_name("cv-ray"))
SMALL = [
    "data.num_rl_tasks=8", "data.num_sft_trajectories=8", "data.num_val_tasks=2", "data.suite_size=1",
    "data.suites=[orientation]", "data.image_size=112",
    "trainer.sft.max_steps=2", "trainer.sft.batch_size=4", "trainer.rl.batch_size=2", "rollout.n_samples=2",
    "rollout.max_new_tokens_per_turn=24", "rollout.max_turns=2",
    "sandbox.num_executors=2", "reward.num_workers=1", "eval.suites=[orientation]", "trainer.ray_num_cpus=8",
]
REWARD_COMPONENTS = ("acc", "fmt", "mandatory", "necessity", "exact", "emerge", "usage", "spurious")


def cv_ray(run_root: Path, name: str, *overrides: str, timeout: int = 600, multirun: bool = False):
    args = [CV_RAY, *(["-m"] if multirun else []), f"trainer.run_root={run_root}", f"trainer.name={name}",
            *SMALL, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=run_root)


def _rows(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("driver")
    # The random tiny model earns the same (zero) reward on every sample, so GRPO advantages are all 0;
    # a small entropy bonus gives the RL update a gradient, so the test can see the update reach the weights.
    out = cv_ray(root, "pipe", "trainer.stage=pipeline", "trainer.rl.steps=2", "trainer.save_every=1",
                 "eval.without_tools=false", "learner.loss.entropy_coef=0.01")
    assert out.returncode == 0, out.stderr[-4000:]
    return root / "pipe"


def test_pipeline_writes_metrics_with_every_reward_component(pipeline_run):
    rows = _rows(pipeline_run / "metrics.jsonl")
    sft = [r for r in rows if r["stage"] == "sft"]
    rl = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in sft] == [0, 1]
    assert [r["step"] for r in rl] == [0, 1]
    for row in rl:
        for component in REWARD_COMPONENTS:
            assert f"reward/{component}" in row
        for phase in ("rollout", "reward", "advantage", "update", "weight_push"):
            assert row[f"time/{phase}_s"] > 0
    assert "eval/accuracy" in rl[-1]
    summary = json.loads((pipeline_run / "summary.json").read_text())
    assert set(summary) >= {"data", "sft", "rl", "eval", "final"}
    assert (pipeline_run / "eval" / "report.md").exists()
    assert (pipeline_run / "dashboard" / "index.html").exists() and (pipeline_run / "dashboard" / "data" / "eval.js").exists()


def test_training_changed_the_parameters(pipeline_run):
    base = load_file(pipeline_run / "tiny-qwen2_5_vl" / "model.safetensors")
    sft = load_file(next((pipeline_run / "sft_model").glob("*.safetensors")))
    rl = load_file(next((pipeline_run / "rl_model").glob("*.safetensors")))
    assert base.keys() == sft.keys() == rl.keys()

    def changed(a, b):
        return [k for k in a if not torch.equal(a[k], b[k])]

    assert any("lm_head" in k or "language_model" in k for k in changed(base, sft))
    assert changed(sft, rl), "an RL step must move the policy"
    # The recipe freezes the vision tower during training (learner.freeze_vision=true).
    assert not [k for k in changed(base, sft) if k.startswith("model.visual")]


def test_killed_run_resumes_from_its_checkpoint(pipeline_run, tmp_path):
    data_dir = pipeline_run / "data"
    base_model = f"model={pipeline_run / 'tiny-qwen2_5_vl'}"  # the `model=PATH` shorthand (cv_ray.cli)
    args = [CV_RAY, f"trainer.run_root={tmp_path}", "trainer.name=killed", *SMALL, "trainer.stage=rl",
            "trainer.rl.steps=3", "trainer.save_every=1", f"data.dir={data_dir}", base_model]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=tmp_path, start_new_session=True)
    first = tmp_path / "killed" / "checkpoints" / "step_000001" / "COMPLETE"
    deadline = time.time() + 400
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert first.exists(), "the run never wrote its first checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: driver and its local Ray
    proc.wait(timeout=60)

    out = cv_ray(tmp_path, "killed", "stage=rl", "trainer.rl.steps=3", "trainer.save_every=1",
                 "trainer.resume=auto", f"data.dir={data_dir}", base_model)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resume: " in out.stdout + out.stderr  # Hydra logs to stdout
    rl_steps = [r["step"] for r in _rows(tmp_path / "killed" / "metrics.jsonl") if r["stage"] == "rl"]
    # Killed after step 0's checkpoint (maybe after logging step 1); the restart continues at step 1.
    assert rl_steps == [0, 1, 2]  # each step once: the killed run's rows after its checkpoint were rewound
    # 8 tasks in batches of 2 = 4 batches per epoch: after 3 steps the next batch is epoch 0, batch 3 —
    # the same as an uninterrupted run, because the data position was restored with the checkpoint.
    saved = json.loads((tmp_path / "killed" / "checkpoints" / "step_000003" / "COMPLETE").read_text())
    assert saved == {"epoch": 0, "batch": 3}


def test_two_job_sweep_writes_its_summary(pipeline_run, tmp_path):
    out = cv_ray(tmp_path, "sweep", "trainer.stage=rl", "trainer.rl.steps=1", "reward.alpha=0.5,1.0",
                 f"data.dir={pipeline_run / 'data'}", f"model={pipeline_run / 'sft_model'}",
                 multirun=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    sweep = tmp_path / "sweep-sweep"
    rows = json.loads((sweep / "summary.json").read_text())
    alphas = sorted(o for r in rows for o in r["overrides"] if o.startswith("reward.alpha="))
    assert alphas == ["reward.alpha=0.5", "reward.alpha=1.0"]
    assert all("reward/total" in r for r in rows)
    assert "| job | overrides |" in (sweep / "summary.md").read_text()
    assert {p.name for p in sweep.iterdir() if p.is_dir()} >= {"0", "1"}
