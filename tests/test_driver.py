"""The `cv-ray` driver end to end on the tiny model, as a user runs it (subprocesses on one Ray cluster).

One module-scoped pipeline run (data, 2 SFT steps, 3 RL steps with 2 sandbox executors and 1 reward
worker and a checkpoint after every step, eval) feeds the checks. A copy of its run directory, cut back
to its first checkpoint with an incomplete one after it (a run killed while saving), is resumed with
`trainer.resume=auto` and must replay the uninterrupted run step for step across an epoch boundary.
A two-job reward-weight sweep writes its summary and each job's reward actors report their own weights.
The subprocesses join the test session's Ray cluster (``RAY_ADDRESS``) instead of starting their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

CV_RAY = str(Path(sys.executable).with_name("cv-ray"))
SMALL = [
    "experiment=tiny_cpu", "data.num_rl_tasks=4", "data.num_sft_trajectories=8", "data.num_val_tasks=2", "data.suite_size=1",
    "data.suites=[orientation]", "data.image_size=112",
    "trainer.sft.max_steps=2", "trainer.sft.batch_size=4", "trainer.rl.batch_size=2", "rollout.n_samples=2",
    "rollout.max_new_tokens_per_turn=24", "rollout.max_turns=2",
    "sandbox.num_executors=2", "reward.num_workers=1", "eval.suites=[orientation]", "trainer.ray_num_cpus=8",
]
REWARD_COMPONENTS = ("acc", "fmt", "mandatory", "necessity", "exact", "emerge", "usage", "spurious")


@pytest.fixture(scope="module")
def cv_ray(ray_local):
    """Run ``cv-ray`` as a user would, joined to the session's Ray cluster: ``cv_ray(run_root, name, *overrides)``."""
    address = ray_local.get_runtime_context().gcs_address

    def run(run_root: Path, name: str, *overrides: str, timeout: int = 600, multirun: bool = False):
        args = [CV_RAY, *(["-m"] if multirun else []), f"trainer.run_root={run_root}", f"trainer.name={name}",
                *SMALL, *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": address}
        return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=run_root)

    return run


def _rows(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines()]


#: The pipeline's RL schedule: 4 tasks in batches of 2 are 2 batches per epoch, so step 2 opens epoch 1.
RL = ["trainer.rl.steps=3", "trainer.save_every=1", "learner.loss.entropy_coef=0.01"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, cv_ray) -> Path:
    root = tmp_path_factory.mktemp("driver")
    # The random tiny model earns the same (zero) reward on every sample, so GRPO advantages are all 0;
    # a small entropy bonus gives the RL update a gradient, so the test can see the update reach the weights.
    out = cv_ray(root, "pipe", "trainer.stage=pipeline", *RL, "eval.without_tools=false")
    assert out.returncode == 0, out.stderr[-4000:]
    return root / "pipe"


def test_pipeline_writes_metrics_with_every_reward_component(pipeline_run):
    rows = _rows(pipeline_run / "metrics.jsonl")
    sft = [r for r in rows if r["stage"] == "sft"]
    rl = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in sft] == [0, 1]
    assert [r["step"] for r in rl] == [0, 1, 2]
    for row in rl:
        for component in REWARD_COMPONENTS:
            assert f"reward/{component}" in row
        for phase in ("rollout", "reward", "advantage", "update", "weight_push"):
            assert row[f"time/{phase}_s"] > 0
        # The weight push (cv_ray/weight_sync.py): the object store on CPU, the engines one version per step.
        assert row["weights/path/object_store"] == 1 and row["weights/bytes"] > 0 and row["weights/sync_s"] > 0
        assert row["weights/version"] == row["step"] + 1
    assert "eval/accuracy" in rl[-1]
    summary = json.loads((pipeline_run / "summary.json").read_text())
    assert set(summary) >= {"data", "sft", "rl", "eval", "final"}
    # No actor outlives its stage (mutant: the RL stage leaves its reward workers or learner ranks up).
    assert {stage: summary[stage]["live_actors_after"] for stage in ("data", "sft", "rl", "eval")} == \
        {"data": 0, "sft": 0, "rl": 0, "eval": 0}
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


def _last_rows(metrics_path: Path, stage: str) -> dict[int, dict]:
    """The last row logged for each step of ``stage`` (a resumed run logs the steps it redoes again)."""
    return {r["step"]: r for r in _rows(metrics_path) if r["stage"] == stage}


def test_a_resumed_run_replays_the_uninterrupted_one(pipeline_run, tmp_path, cv_ray):
    """Resume from step 1's checkpoint (past an incomplete step 2, as a kill while saving leaves it):
    steps 1 and 2 (the first of epoch 1) sample the same episodes and make the same updates as the
    uninterrupted run, and the final weights are the same.

    Mutants: the rollout engines keep the SFT weights after a resume (step 1's samples differ); the data
    position is not restored (step 1 trains on epoch 0's first batch again); an incomplete checkpoint is
    taken as the newest one (the run fails to load it).
    """
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(pipeline_run, run, ignore=shutil.ignore_patterns("rl_model", "eval"))
    checkpoints = run / "checkpoints"
    for later in ("step_000002", "step_000003"):
        shutil.rmtree(checkpoints / later)
    (checkpoints / "step_000002").mkdir()  # killed while saving step 2: no COMPLETE marker
    (checkpoints / "step_000002" / "partial.pt").write_bytes(b"\0" * 64)

    out = cv_ray(tmp_path, "resumed", "stage=rl", *RL, "trainer.resume=auto")
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr  # Hydra logs to stdout
    assert "skipping incomplete checkpoint" in log and "step_000002" in log
    assert "resume: " in log and "step_000001" in log

    # Each step is logged once (the killed run's rows for the steps done again are rewound).
    assert [r["step"] for r in _rows(run / "metrics.jsonl") if r["stage"] == "rl"] == [0, 1, 2]
    uninterrupted = _last_rows(pipeline_run / "metrics.jsonl", "rl")
    resumed = _last_rows(run / "metrics.jsonl", "rl")
    for step in (1, 2):
        for key in ("reward/total", "rollout/response_tokens_mean", "rollout/sampled_tokens", "learner/rl/loss",
                    "learner/rl/entropy", "learner/rl/kl"):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert json.loads((checkpoints / "step_000003" / "COMPLETE").read_text()) == {"epoch": 1, "batch": 1}
    expected = load_file(next((pipeline_run / "rl_model").glob("*.safetensors")))
    got = load_file(next((run / "rl_model").glob("*.safetensors")))
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_two_job_sweep_writes_its_summary(pipeline_run, tmp_path, cv_ray):
    """Mutant: the driver builds the reward group from default weights instead of the job's config (each
    job's reward actors report what they score with, so both would report alpha 1.0)."""
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
    for job in ("0", "1"):
        overrides = (sweep / job / ".hydra" / "overrides.yaml").read_text()
        alpha = 0.5 if "reward.alpha=0.5" in overrides else 1.0
        weights = json.loads((sweep / job / "summary.json").read_text())["rl"]["reward_weights"]
        assert weights["mandatory"] == alpha and weights["usage"] == -0.5
