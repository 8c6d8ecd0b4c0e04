"""The typed Hydra config: every YAML option composes onto the schema, and bad values name their key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cv_ray.cli import CONF_DIR, expand_shorthands
from cv_ray.config import Config, register_configs, to_typed, validate
from cv_ray.errors import ConfigError

register_configs()
CV_RAY = str(Path(sys.executable).with_name("cv-ray"))


def _compose(*overrides: str) -> Config:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        raw = compose(config_name="config", overrides=["trainer.work_dir=/tmp/cv_ray_test_run", *overrides])
    return to_typed(raw)


def test_default_experiment_is_the_quickstart_and_valid():
    cfg = _compose()
    validate(cfg)
    assert cfg.trainer.name == "quickstart"
    assert cfg.model.build_tiny == "qwen2_5_vl" and cfg.model.tiny_spec == "demo"
    assert cfg.eval.suites == ["/tmp/cv_ray_test_run/data/rl_val.parquet"]  # interpolations resolved
    assert isinstance(cfg.sandbox.timeout_s, float)


def test_the_smoke_experiment_builds_the_tiny_model():
    cfg = _compose("experiment=tiny_cpu")
    validate(cfg)
    assert cfg.model.build_tiny == "qwen2_5_vl" and cfg.model.tiny_spec == "tiny"
    assert cfg.model.path == "/tmp/cv_ray_test_run/tiny-qwen2_5_vl"


@pytest.mark.parametrize(
    "group,option",
    [(g.name, o.stem) for g in Path(CONF_DIR).iterdir() if g.is_dir() for o in g.glob("*.yaml")],
)
def test_every_group_option_composes_and_validates(group, option):
    """Mutant: a preset with a value `validate` refuses (e.g. `mini_batch_size: 5` in the 2x8 recipe)."""
    # A checkpoint preset needs the user's directory; any path composes (its existence is checked at start).
    needs_path = ["model.path=/checkpoints/any"] if (group, option) == ("model", "checkpoint") else []
    cfg = _compose(f"{group}={option}", *needs_path)
    assert isinstance(cfg, Config)
    validate(cfg)


def test_the_2x8_recipe_fits_two_nodes_of_eight_gpus():
    """The Qwen3-VL-8B recipe's resource arithmetic: 2 vLLM engines x TP 4 fill the rollout node, 8
    ZeRO-3 ranks the learner node, and the RL batch splits into whole mini-batches over the ranks."""
    from cv_ray.config import validate_resources

    cfg = _compose("experiment=qwen3_vl_8b_2x8")
    validate(cfg)
    gpus_per_node, nodes = 8, 2
    rollout, learner = cfg.rollout, cfg.learner
    assert rollout.engine == "vllm" and rollout.gpus_per_worker == rollout.vllm.tensor_parallel_size == 4
    assert rollout.num_workers * rollout.gpus_per_worker == gpus_per_node  # one node of engines
    assert gpus_per_node % rollout.gpus_per_worker == 0                    # an engine never spans nodes
    assert learner.num_ranks * learner.gpus_per_rank == gpus_per_node      # one node of ranks
    sequences = cfg.trainer.rl.batch_size * rollout.n_samples
    assert sequences % learner.mini_batch_size == 0 and learner.mini_batch_size % learner.num_ranks == 0
    assert (learner.mini_batch_size // learner.num_ranks) % learner.micro_batch_size == 0
    assert sequences // learner.mini_batch_size == 2                        # two optimizer updates per step
    validate_resources(cfg, {"CPU": 2 * 64.0, "GPU": float(nodes * gpus_per_node)})
    with pytest.raises(ConfigError, match="ask for 16 GPUs"):
        validate_resources(cfg, {"CPU": 2 * 64.0, "GPU": float(nodes * gpus_per_node - 1)})


@pytest.mark.parametrize(
    "override,key",
    [
        ("sandbox.session=bogus", "sandbox.session"),
        ("sandbox.num_executors=0", "sandbox.num_executors"),
        ("rollout.engine=tgi", "rollout.engine"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("learner.zero_stage=4", "learner.zero_stage"),
        ("learner.loss.kl_estimator=k2", "learner.loss.kl_estimator"),
        ("reward.gamma=-1", "reward.gamma"),
        ("trainer.stage=train", "trainer.stage"),
        ("model.family=llava", "model.family"),
        ("learner.mini_batch_size=5", "learner.mini_batch_size"),
        ("logger.backends=[console,tensorboard]", "logger.backends"),
    ],
)
def test_bad_values_name_the_key(override, key):
    cfg = _compose(override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key
    assert "Fix:" in str(err.value)


def test_vllm_without_enough_gpus_is_refused():
    cfg = _compose("rollout=vllm", "rollout.gpus_per_worker=1", "rollout.vllm.tensor_parallel_size=2")
    with pytest.raises(ConfigError, match="rollout.gpus_per_worker"):
        validate(cfg)


def test_wrong_type_is_refused_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        _compose("sandbox.timeout_s=abc")
    assert "sandbox.timeout_s" in str(err.value)
    assert "could not be converted to Float" in str(err.value.__cause__)


def test_cli_help_cfg_and_bad_value(tmp_path):
    help_out = subprocess.run([CV_RAY, "--help"], capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0
    assert "Config groups" in help_out.stdout and "sandbox: default" in help_out.stdout
    cfg_out = subprocess.run([CV_RAY, "--cfg", "job", "sandbox.num_executors=7"],
                             capture_output=True, text=True, timeout=120)
    assert cfg_out.returncode == 0
    assert "num_executors: 7" in cfg_out.stdout
    bad = subprocess.run([CV_RAY, "sandbox.session=bogus", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "sandbox.session" in bad.stderr and "Fix:" in bad.stderr
    short = subprocess.run([CV_RAY, "--cfg", "job", "stage=eval", f"model={tmp_path}"],
                           capture_output=True, text=True, timeout=120)
    assert short.returncode == 0, short.stderr
    assert "stage: eval" in short.stdout and f"path: {tmp_path}" in short.stdout
    assert "family: auto" in short.stdout and f"model: {tmp_path}" in short.stdout


def test_shorthands_expand_to_plain_overrides(tmp_path):
    ckpt = str(tmp_path)
    assert expand_shorthands(["stage=rl", "sandbox.num_executors=4"]) == ["trainer.stage=rl", "sandbox.num_executors=4"]
    assert expand_shorthands([f"model={ckpt}"]) == ["model=checkpoint", f"model.path={ckpt}"]
    # With stage eval, exactly the given model is evaluated (not the run directory's newest one).
    assert expand_shorthands(["stage=eval", f"model={ckpt}"]) == [
        "trainer.stage=eval", "model=checkpoint", f"model.path={ckpt}", f"eval.model={ckpt}"]
    # Presets, multirun lists and explicit keys pass through untouched.
    for args in (["model=tiny_qwen3_vl"], ["-m", "model=tiny_qwen3_vl,tiny_qwen2_5_vl"], ["model.path=/x"],
                 ["trainer.stage=eval", "model=tiny_qwen3_vl"]):
        assert expand_shorthands(args) == args


def test_every_config_field_is_documented():
    """Each schema field carries a docstring (printed nowhere else: it is the config's reference)."""
    import ast

    undocumented = []
    for path in [Path(CONF_DIR).parent / "cv_ray" / "config.py", *Path(CONF_DIR).parent.glob("cv_ray/*/config.py")]:
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            for stmt, after in zip(cls.body, [*cls.body[1:], None]):
                documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                if isinstance(stmt, ast.AnnAssign) and not documented:
                    undocumented.append(f"{path.name}:{cls.name}.{stmt.target.id}")
    assert not undocumented, f"fields without a docstring: {undocumented}"


def test_groups_must_fit_the_cluster():
    from cv_ray.config import validate_resources

    cfg = _compose()
    validate_resources(cfg, {"CPU": 2.0})  # the CPU quickstart needs no GPU
    gpu = _compose("rollout=vllm", "learner=zero3_gpu")  # 4 x 1 rollout GPUs + 8 x 1 learner GPUs
    with pytest.raises(ConfigError, match="has no GPU") as err:
        validate_resources(gpu, {"CPU": 64.0})
    assert err.value.key == "rollout.engine"
    with pytest.raises(ConfigError, match="ask for 12 GPUs") as err:
        validate_resources(gpu, {"CPU": 64.0, "GPU": 8.0})
    validate_resources(gpu, {"CPU": 64.0, "GPU": 16.0})
