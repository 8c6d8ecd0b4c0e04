"""Placement plans (cv_ray/placement.py) as data, the GPU rules of the vLLM config, and the single-GPU preset.

vLLM's own executor choice for these plans is checked in tests/rollout/test_vllm_api.py; the learner
group's ranks in their placement group in tests/learner/test_learner_group.py.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cv_ray.cli import CONF_DIR
from cv_ray.config import register_configs, to_typed, validate
from cv_ray.errors import ConfigError
from cv_ray.placement import learner_placement, rollout_placement, vllm_launch
from cv_ray.rollout.config import RolloutConfig, VLLMConfig


def test_learner_ranks_get_one_packed_bundle_each():
    """Mutant: one bundle for the whole group, or ``SPREAD`` (ranks of one ZeRO group across nodes)."""
    plan = learner_placement(num_ranks=8, gpus_per_rank=1, cpus_per_rank=2)
    assert plan.strategy == "PACK"
    assert plan.bundles == [{"CPU": 2.0, "GPU": 1.0}] * 8
    assert plan.actor_bundle == list(range(8))
    assert plan.actor_options == [{"num_cpus": 2.0, "num_gpus": 1.0}] * 8
    cpu = learner_placement(num_ranks=2, gpus_per_rank=0, cpus_per_rank=1)
    assert cpu.bundles == [{"CPU": 1.0}] * 2  # Ray refuses a zero-sized resource in a bundle


def test_rollout_worker_bundle_holds_all_gpus_of_its_engine():
    """A TP-4 engine's actor takes one 4-GPU bundle (one node), so vLLM's mp workers see the engine's GPUs.

    Mutant: four 1-GPU bundles per worker without vLLM's ray executor to use them."""
    plan = rollout_placement(num_workers=2, gpus_per_worker=4, cpus_per_worker=2)
    assert plan.bundles == [{"CPU": 2.0, "GPU": 4.0}] * 2
    assert plan.actor_bundle == [0, 1] and plan.actor_options[1] == {"num_cpus": 2.0, "num_gpus": 4.0}


def test_vllm_launch_sets_backend_and_environment():
    """Mutants: no ``mp`` backend for TP > 1 (defect 1); no insecure-serialization switch (defect 2)."""
    one, four = vllm_launch(1), vllm_launch(4)
    assert one.engine_kwargs == {} and four.engine_kwargs == {"distributed_executor_backend": "mp"}
    assert one.env == four.env == {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        vllm_launch(0)


@pytest.mark.parametrize("tp,gpus,ok", [(1, 1, True), (1, 0.5, True), (1, 2, False), (1, 0, False),
                                        (4, 4, True), (4, 8, False), (4, 2, False)])
def test_vllm_worker_gpus_match_its_engine(tp, gpus, ok):
    """A bundle holds exactly the engine's GPUs; only a one-GPU engine may take a fraction (a shared GPU).

    Mutant: the old rule ``gpus_per_worker >= tensor_parallel_size`` (accepts 8 GPUs for TP 4, refuses 0.5)."""
    cfg = RolloutConfig(engine="vllm", gpus_per_worker=gpus, vllm=VLLMConfig(tensor_parallel_size=tp))
    if ok:
        cfg.validate()
    else:
        with pytest.raises(ConfigError, match="rollout.gpus_per_worker"):
            cfg.validate()


def test_single_gpu_preset_composes_validates_and_fits_one_gpu():
    """``experiment=single_gpu`` composes and validates; rollout and learner together ask Ray for one GPU.

    Mutant: the preset asks for a whole GPU per role (two GPUs: it never schedules on one)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        raw = compose(config_name="config", overrides=["trainer.work_dir=/tmp/cv_ray_test_run", "experiment=single_gpu"])
    cfg = to_typed(raw)
    validate(cfg)
    assert cfg.rollout.engine == "vllm" and cfg.learner.precision == "bf16"
    gpus = cfg.rollout.num_workers * cfg.rollout.gpus_per_worker + cfg.learner.num_ranks * cfg.learner.gpus_per_rank
    assert gpus <= 1.0 and cfg.learner.gpus_per_rank > 0
    assert cfg.rollout.vllm.gpu_memory_utilization <= 0.5  # the learner keeps at least half of the memory
