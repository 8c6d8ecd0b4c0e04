"""The asynchronous loop on real actors (local Ray): a resumed run trains on the groups its checkpoint
held, once; a rollout worker killed mid-step loses no group.

The resume runs the driver itself (``cv_ray.driver.run``) in this process, on the tiny model and the
session's Ray cluster; the fault test drives ``AsyncRollouts`` with rollout workers on a scripted engine
(fixed latency, no model), the real sandbox and real reward workers.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SMALL = [
    "data.num_rl_tasks=8", "data.num_sft_trajectories=8", "data.num_val_tasks=2", "data.suite_size=1",
    "data.suites=[orientation]", "data.image_size=112", "trainer.rl.batch_size=2", "rollout.n_samples=2",
    "rollout.max_new_tokens_per_turn=24", "rollout.max_turns=2", "sandbox.num_executors=1", "reward.num_workers=1",
    "logger.backends=[jsonl]", "trainer.stage=rl", "trainer.rl.max_staleness=1", "trainer.eval_every=0",
    "learner.mini_batch_size=0",
]


def config(work_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from cv_ray.config import register_configs, to_typed, validate

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(config_name="config", overrides=[f"trainer.work_dir={work_dir}", *SMALL, *overrides])
    cfg = to_typed(raw)
    validate(cfg)
    return cfg


def groups_by_step(run_dir: Path) -> dict[int, dict[int, dict]]:
    rows = [json.loads(line) for line in (run_dir / "rl_groups.jsonl").read_text().splitlines()]
    out: dict[int, dict[int, dict]] = {}
    for row in rows:
        out.setdefault(row["step"], {})[row["seq"]] = row
    return out


def test_resumed_run_trains_on_the_checkpointed_groups_exactly_once(ray_local, tmp_path):
    """Run A (3 steps, a checkpoint after each) and run B, resumed from A's checkpoint after step 2: B's
    step 2 trains on exactly the groups that checkpoint held (the same start order numbers as A's step 2),
    none of those A consumed before; a group that was already scored is trained on as saved (its
    oldest token from version 1), one that was in flight is sampled again after the resume (version 2).
    Mutant: a resume that ignores the asynchronous state (B starts new groups, numbered from 0 again)."""
    from cv_ray.driver import ASYNC_STATE, run

    first, second = tmp_path / "a", tmp_path / "b"
    run(config(first, "trainer.rl.steps=3", "trainer.save_every=1"))
    checkpoint = first / "checkpoints" / "step_000002"
    saved = pickle.loads((checkpoint / ASYNC_STATE).read_bytes())["ledger"]
    ready = {g.ticket.seq for g in saved["ready"]}
    in_flight = {t["seq"] for t in saved["in_flight"]}
    assert len(ready | in_flight) == 2 and saved["version"] == 2

    run(config(second, "trainer.rl.steps=3", f"trainer.resume={checkpoint}", f"data.dir={first / 'data'}",
               f"model.path={first / 'tiny-qwen2_5_vl'}"))
    a, b = groups_by_step(first), groups_by_step(second)
    assert set(b) == {2}  # the resumed run did step 2 only
    assert set(b[2]) == set(a[2]) == ready | in_flight
    assert not set(b[2]) & (set(a[0]) | set(a[1]))  # nothing trained twice
    for seq in ready:
        assert b[2][seq]["oldest_version"] == a[2][seq]["oldest_version"] == 1
        assert b[2][seq]["task_index"] == a[2][seq]["task_index"]
    for seq in in_flight:
        assert b[2][seq]["oldest_version"] == 2 and b[2][seq]["started_version"] == 1
        assert b[2][seq]["task_index"] == a[2][seq]["task_index"]
    metrics = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["stage"] == "rl"] == [2]
    assert sum(v for k, v in metrics[-1].items() if k.startswith("async/staleness/")) == 4  # 2 groups x 2 samples


SCRIPT = ("<think>turn it</think>" + '<tool_call>\n{"name": "code_image_tool", "arguments": {"code": '
          '"result = image.transpose(Image.ROTATE_90)", "image_index": 0}}\n</tool_call>',
          "<think>done</think><answer>7</answer>")


class NothingToLearn:
    """The learner's side of the object-store weight path for engines that load nothing (the scripted
    engine ignores tensors and takes the version): one empty set of weights in the object store."""

    def weight_metadata(self) -> list[tuple[str, str, list[int]]]:
        return [("lm_head.weight", "float32", [1])]

    def gather_weights(self, trainable_only: bool = True):
        import ray

        return ray.put({})


def test_a_rollout_worker_killed_mid_step_loses_no_group(ray_local, tiny_qwen25):
    """Two rollout workers on a scripted engine (fixed latency, the real sandbox and reward workers).
    After two steps, the worker holding a group of step 2 (started under version 2) is killed. Ray
    restarts it from the starting weights (version 0) and runs its calls again there; it refuses the
    groups that need newer weights, the driver pushes it the current ones and submits those groups
    again: every step gets its batch, every started group is trained on once, none is sampled under
    weights older than its start version or is more than k stale, and the restarted worker ends on the
    current version. Mutants: a worker that starts a group without waiting for its min_version; a
    driver that does not resubmit a refused group (step 2 never fills), or does not push the weights
    to the restarted worker (it refuses the group again and again). Then, with dynamic sampling on and
    every reward equal, the loop gives up with the reason (mutant: no limit, it samples forever)."""
    import numpy as np
    import ray
    from PIL import Image

    from cv_ray.config import Config
    from cv_ray.driver import AsyncRollouts, BatchSampler
    from cv_ray.episode_groups import EpisodeGroups
    from cv_ray.reward.reward_worker import RewardGroup
    from cv_ray.rollout.rollout_worker import RolloutGroup
    from cv_ray.rollout.scripted_engine import ScriptedEngineFactory
    from cv_ray.sandbox.executor import SandboxGroup
    from cv_ray.types import Task
    from cv_ray.weight_sync import ObjectStoreSync

    cfg = Config()
    cfg.trainer.rl.batch_size, cfg.trainer.rl.max_staleness, cfg.trainer.rl.steps = 2, 1, 4
    cfg.rollout.num_workers, cfg.rollout.n_samples, cfg.rollout.max_turns = 2, 2, 3
    cfg.sandbox.num_executors, cfg.sandbox.workers_per_executor = 1, 1
    rng = np.random.default_rng(0)
    tasks = [Task(uid=f"t{i}", data_source="test", question="What number?", answer="7",
                  images=[Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))]) for i in range(8)]
    sandbox = SandboxGroup(cfg.sandbox)
    groups = EpisodeGroups(sandbox, RolloutGroup(str(tiny_qwen25), cfg.rollout, sandbox,
                                                 engine_factory=ScriptedEngineFactory(SCRIPT, 0.005)),
                           RewardGroup(cfg.reward))
    consumed, failures = [], 0.0
    with groups:
        weight_sync = ObjectStoreSync(NothingToLearn(), groups.rollout, 1 << 20)
        weight_sync.setup()
        stream = AsyncRollouts(cfg, tasks, BatchSampler(len(tasks), 2, seed=0), groups, weight_sync, version=0)
        for version in range(4):
            if version == 2:  # the groups of step 3 are on their way, under version 2: kill one's worker
                stream.wait_for_push()
                stream._start_groups()
                doomed = sorted(sub.worker for ticket, sub in stream.rollouts.values() if ticket.version == 2)
                assert doomed, "no group started under version 2 in flight"
                ray.kill(groups.rollout.actors[doomed[0]], no_restart=False)
            batch = stream.collect()
            assert len(batch) == 2 and all(version - g.oldest_version() <= 1 for g in batch)
            assert all(g.oldest_version() >= g.ticket.version for g in batch)
            consumed += [g.ticket.seq for g in batch]
            failures += stream.step_metrics(batch, version, step_s=1.0, collect_s=0.5)["async/worker_failures"]
            assert stream.push(version + 1)["weights/version"] == version + 1
        stream.wait_for_push()
        health = groups.rollout.health()
        # Dynamic sampling on a policy with no signal: every scripted sample earns the same reward, every
        # group is dropped, and the loop stops with the reason instead of sampling forever.
        cfg.trainer.rl.filter_flat_groups, cfg.trainer.rl.steps = True, 6
        flat = AsyncRollouts(cfg, tasks, BatchSampler(len(tasks), 2, seed=1), groups, weight_sync, version=4)
        with pytest.raises(RuntimeError, match="equal rewards"):
            flat.collect()
        assert flat.ledger.counts.filtered >= 8 * 2 and flat.ledger.counts.consumed == 0
    assert failures >= 1
    assert sorted(h["restarted"] for h in health) == [False, True]
    assert [h["weight_version"] for h in health] == [4, 4]
    assert len(consumed) == len(set(consumed)) == 8
    assert stream.ledger.counts.started == stream.ledger.counts.consumed == 8 and not stream.ledger.outstanding
