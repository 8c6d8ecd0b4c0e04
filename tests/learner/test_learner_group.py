"""The learner group end to end on the tiny models: 2 CPU ranks (gloo), ZeRO-2 and ZeRO-3, real Ray actors.

One group per (model, ZeRO stage) is shared by the tests of this module (DeepSpeed start-up is the
slow part); each test brings the group to the state it needs rather than relying on test order.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools

import numpy as np
import pytest
import ray
import torch
from learner_samples import make_samples
from PIL import Image
from transformers import AutoProcessor

from cv_ray.learner.checkpoint import DataPosition
from cv_ray.learner.config import LearnerConfig, LossConfig
from cv_ray.learner.group import LearnerGroup
from cv_ray.models import ModelRef

pytestmark = pytest.mark.slow

LR = 1e-3


@dataclasses.dataclass
class Setup:
    group: LearnerGroup
    family: str
    path: str
    processor: object
    model: ModelRef


#: The run's image bounds (model.min_pixels / max_pixels) every processor of the group must apply;
#: the tiny checkpoints' own bounds are 3136-50176 (Qwen2.5-VL) and 4096-65536 (Qwen3-VL) pixels.
BOUNDS = {"min_pixels": 3136, "max_pixels": 12544}


@pytest.fixture(scope="module", params=[("qwen2_5_vl", 2), ("qwen3_vl", 3)], ids=["qwen25-zero2", "qwen3-zero3"])
def setup(request, ray_local, tiny_model_dirs):
    family, stage = request.param
    path = str(tiny_model_dirs[family])
    model = ModelRef(path, **BOUNDS)
    cfg = LearnerConfig(num_ranks=2, zero_stage=stage, lr=LR, micro_batch_size=2, warmup_ratio=0.0,
                        lr_schedule="constant", loss=LossConfig(kl_coef=0.05))
    group = LearnerGroup(model, cfg, total_steps=100, seed=0)
    yield Setup(group, family, path, model.load_processor(), model)
    group.shutdown()


def _weights(group: LearnerGroup) -> dict[str, torch.Tensor]:
    return ray.get(group.gather_weights())


def _on_policy(group: LearnerGroup, samples):
    """RL samples whose rollout log-probs are the learner's own (as an exact rollout engine would give)."""
    logprobs = group.compute_logprobs(samples, "policy")
    return [dataclasses.replace(s, rollout_logprobs=np.where(s.loss_mask > 0, lp, 0.0))
            for s, lp in zip(samples, logprobs)]


def _trained_mean(samples, logprobs) -> np.ndarray:
    return np.array([lp[s.loss_mask > 0].mean() for s, lp in zip(samples, logprobs)])


def _mixed(processor, seed: int, rl: bool = False):
    """Two sequences with an image, then two without: with 2 ranks, rank 1 gets no image at all, so
    its vision tower must still run (ZeRO-3's collective gathers) or the ranks wait forever."""
    return (make_samples(processor, 2, seed=seed, rl=rl)
            + make_samples(processor, 2, seed=seed + 100, rl=rl, with_images=False))


def test_ranks_are_packed_in_one_placement_group(setup):
    """Every rank runs in the group's own PACK placement group, one bundle each (SFT and RL use this group).

    Mutant: the ranks started with plain num_cpus/num_gpus options, no placement group (issue 22,
    defect 6: ranks of one ZeRO-3 group may then land on different nodes)."""
    from ray.util.placement_group import placement_group_table

    group = setup.group
    table = placement_group_table(group.placement_group)
    assert table["strategy"] == "PACK" and table["state"] == "CREATED"
    assert len(table["bundles"]) == len(group.ranks)

    def placement_group_of(actor) -> str | None:  # runs inside each rank (a local function travels by value)
        import ray.util

        pg = ray.util.get_current_placement_group()
        return pg.id.hex() if pg else None

    inside = ray.get([rank.__ray_call__.remote(placement_group_of) for rank in group.ranks])
    assert inside == [group.placement_group.id.hex()] * len(group.ranks)


def test_sft_loss_decreases_on_a_fixed_batch(setup):
    samples = _mixed(setup.processor, seed=1)
    losses = [setup.group.sft_step(samples)["sft/loss"] for _ in range(6)]
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def test_rl_step_moves_the_policy_and_not_the_reference(setup):
    group = setup.group
    samples = _on_policy(group, _mixed(setup.processor, seed=2, rl=True))  # advantages +1, -1, +1, -1
    ref_before = group.compute_logprobs(samples, "reference")
    policy_before = group.compute_logprobs(samples, "policy")
    weights_before = _weights(group)

    metrics = group.rl_step(samples)

    # On-policy first update: the importance ratio is exactly 1, nothing is clipped.
    assert metrics["rl/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["rl/clip_frac_low"] == 0 and metrics["rl/clip_frac_high"] == 0
    assert metrics["rl/updates"] == 1 and np.isfinite(metrics["rl/kl"])
    weights_after = _weights(group)
    changed = [n for n in weights_before if not torch.equal(weights_before[n], weights_after[n])]
    assert any("language_model" in n for n in changed) and "lm_head.weight" in changed
    assert not any(".visual." in n for n in changed), "the vision tower is frozen (freeze_vision=True)"
    for before, after in zip(ref_before, group.compute_logprobs(samples, "reference")):
        np.testing.assert_array_equal(before, after)
    # The update raised the log-probs of the positive-advantage samples relative to the negative ones.
    delta = _trained_mean(samples, group.compute_logprobs(samples, "policy")) - _trained_mean(samples, policy_before)
    assert delta[[0, 2]].mean() > delta[[1, 3]].mean()


@ray.remote
class HFReceiver:
    """A rollout-side receiver: the rollout's HFEngine behind an actor, as a RolloutWorker holds it."""

    def __init__(self, model: ModelRef):
        from cv_ray.rollout.hf_engine import HFEngine

        self.engine = HFEngine(model)

    def update_weights(self, named_tensors) -> int:
        return asyncio.run(self.engine.update_weights(named_tensors))

    def logprobs(self, samples) -> list[np.ndarray]:
        from cv_ray.agent.chat import banned_token_ids
        from cv_ray.learner.batch import collate
        from cv_ray.learner.forward import sequence_logprobs

        model = self.engine.model
        batch = collate(samples, self.engine.processor, self.engine.pad_id)
        with torch.no_grad():
            logp, _ = sequence_logprobs(model, batch, 1.0, banned_token_ids(model.config))
        return [logp[i, :n].numpy() for i, n in enumerate(batch.lengths)]


def _token_mean(samples, values) -> float:
    """Mean of per-token values over every trained token of ``samples`` (the loss's token_mean)."""
    trained = np.concatenate([v[s.loss_mask > 0] for s, v in zip(samples, values)])
    return float(trained.mean())


def test_kl_is_measured_against_the_reference(setup):
    """``rl/kl`` is the token mean of k3(policy, reference) over trained tokens, and > 0 once the policy moved.

    Mutant: the KL term computed against the policy itself (always 0).
    """
    group = setup.group
    group.sft_step(make_samples(setup.processor, 4, seed=31))  # the policy leaves the reference
    samples = _on_policy(group, make_samples(setup.processor, 4, seed=32, rl=True))
    policy = group.compute_logprobs(samples, "policy")
    reference = group.compute_logprobs(samples, "reference")
    k3 = [np.exp(r - p) - (r - p) - 1.0 for p, r in zip(policy, reference)]  # Schulman's k3, >= 0
    expected = _token_mean(samples, k3)

    metrics = group.rl_step(samples)  # one update: its forward pass scores the policy before the step

    assert expected > 1e-4
    assert metrics["rl/kl"] == pytest.approx(expected, rel=1e-4)


def _with_cfg(group: LearnerGroup, **changes) -> LearnerGroup:
    """The same ranks driven with other driver-side settings (mini-batching, epochs, the ZeRO-3 check).

    Mini-batches, PPO epochs and their shuffle are the group's (driver-side) business; the ranks only
    see one optimizer step at a time, so a shallow copy with another config drives the same ranks.
    """
    other = copy.copy(group)
    other.cfg = dataclasses.replace(group.cfg, **changes)
    return other


def test_ppo_epochs_times_shuffled_mini_batches(setup):
    """2 epochs x 2 mini-batches of 2 = 4 updates; each epoch covers every sample once, reshuffled.

    Mutants: the mini-batches are not shuffled between epochs; an epoch skips its last mini-batch.
    """
    group = _with_cfg(setup.group, mini_batch_size=2, ppo_epochs=2)
    samples = _on_policy(group, make_samples(setup.processor, 4, seed=41, rl=True))
    samples = [dataclasses.replace(s, uid=f"s{i}") for i, s in enumerate(samples)]
    seen: list[tuple[str, ...]] = []
    run_update = group._run_update

    def recording(update, batch):
        seen.append(tuple(sorted(s.uid for s in batch)))
        return run_update(update, batch)

    group._run_update = recording
    metrics = group.rl_step(samples)

    assert metrics["rl/updates"] == 4 and len(seen) == 4
    epochs = [sorted(seen[:2]), sorted(seen[2:])]
    for epoch in epochs:
        assert sorted(uid for batch in epoch for uid in batch) == ["s0", "s1", "s2", "s3"]
    assert epochs[0] != epochs[1], "the second epoch must reshuffle the mini-batches"


def test_a_later_update_sees_a_moved_ratio_clipped_as_the_loss_says(setup):
    """The second update against the same behaviour log-probs: its ratio is no longer 1 and the clip
    fractions are exactly those the PPO clip (low 0.2, high 0.28) implies for the ratios the learner
    holds before that update.

    Mutant: the ratio taken against the current policy (old = logp.detach()) instead of the behaviour
    log-probs: ratio 1 and nothing clipped on every update.
    """
    group = setup.group
    samples = _on_policy(group, make_samples(setup.processor, 4, seed=51, rl=True))
    behaviour = [s.rollout_logprobs for s in samples]
    for _ in range(3):  # updates against the same behaviour policy move the ratio further each time
        group.rl_step(samples)
    current = group.compute_logprobs(samples, "policy")
    ratio = [np.exp(c - b) for c, b in zip(current, behaviour)]
    advantage = [s.advantages for s in samples]
    clip_high = [(a > 0) & (r > 1.28) for a, r in zip(advantage, ratio)]
    clip_low = [(a < 0) & (r < 0.8) for a, r in zip(advantage, ratio)]

    metrics = group.rl_step(samples)

    assert abs(metrics["rl/ratio"] - 1.0) > 1e-3
    assert metrics["rl/ratio"] == pytest.approx(_token_mean(samples, ratio), rel=1e-4)
    assert metrics["rl/clip_frac_high"] == pytest.approx(_token_mean(samples, clip_high), abs=1e-6)
    assert metrics["rl/clip_frac_low"] == pytest.approx(_token_mean(samples, clip_low), abs=1e-6)
    assert metrics["rl/clip_frac_high"] + metrics["rl/clip_frac_low"] > 0, "the test needs some clipped tokens"


def test_zero3_with_a_trainable_vision_tower_refuses_image_less_micro_batches(setup):
    """Refused before any rank starts (a rank without an image in a micro-batch would desynchronise
    ZeRO-3's backward trace). Mutant: the check is skipped (the step would then run)."""
    group = _with_cfg(setup.group, zero_stage=3, freeze_vision=False)
    samples = _mixed(setup.processor, seed=61)  # rank 1 gets the two image-less sequences
    with pytest.raises(ValueError, match="micro-batch without images under ZeRO-3"):
        group.sft_step(samples)
    _with_cfg(setup.group, zero_stage=3, freeze_vision=True)._check_trainable_vision(group._shard(samples))


def test_pushed_weights_reproduce_the_learners_logprobs(setup):
    group = setup.group
    samples = make_samples(setup.processor, 4, seed=4)
    group.sft_step(samples)  # make sure the policy has left its initial weights
    receiver = HFReceiver.remote(setup.model)
    learner = group.compute_logprobs(samples, "policy")
    stale = ray.get(receiver.logprobs.remote(samples))
    assert max(np.abs(a - b).max() for a, b in zip(learner, stale)) > 1e-3  # the check below can fail

    ray.get(receiver.update_weights.remote(group.gather_weights()))  # the driver's push, to one receiver

    for a, b in zip(learner, ray.get(receiver.logprobs.remote(samples))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    ray.kill(receiver)


def test_export_hf_loads_with_from_pretrained(setup, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from cv_ray.agent.chat import banned_token_ids
    from cv_ray.learner.batch import collate
    from cv_ray.learner.forward import sequence_logprobs

    group = setup.group
    samples = make_samples(setup.processor, 3, seed=5)
    group.sft_step(samples)
    out = group.export_hf(tmp_path / "export")
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    batch = collate(samples, processor, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        exported, _ = sequence_logprobs(model, batch, 1.0, banned_token_ids(model.config))
    for row, lp in enumerate(group.compute_logprobs(samples, "policy")):
        np.testing.assert_allclose(exported[row, :len(lp)].numpy(), lp, atol=1e-5, rtol=0)


def _train_until(group: LearnerGroup, batches, position: DataPosition, last_step: int, save_at: dict) -> DataPosition:
    """Train on ``batches[position.batch]`` until the learner's step reaches ``last_step``, saving on the way."""
    while group.global_step < last_step:
        if group.global_step in save_at:
            group.save_checkpoint(save_at[group.global_step], {"data": position, "note": "resume-test"})
        group.sft_step(batches[position.batch])
        position = position.advance(len(batches))
    return position


def test_checkpoint_resumes_mid_epoch_and_at_an_epoch_boundary(setup, tmp_path):
    group = setup.group
    batches = [make_samples(setup.processor, 2, seed=10 + i) for i in range(3)]  # 3 batches per epoch
    start = group.global_step
    mid, boundary = start + 1, start + 3  # saved before the 2nd batch of epoch 0, and at epoch 1's start
    dirs = {mid: tmp_path / "mid", boundary: tmp_path / "boundary"}
    end = _train_until(group, batches, DataPosition(), start + 5, dirs)
    final = _weights(group)
    assert end == DataPosition(1, 2)

    for saved_step, directory in dirs.items():
        client = group.load_checkpoint(directory)
        assert group.global_step == saved_step and client["note"] == "resume-test"
        assert client["data"] == (DataPosition(0, 1) if saved_step == mid else DataPosition(1, 0))
        resumed_end = _train_until(group, batches, client["data"], start + 5, {})
        assert resumed_end == end
        resumed = _weights(group)
        for name, tensor in final.items():
            torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=f"{name} after resume")


@pytest.mark.gpu
def test_bf16_zero3_on_one_gpu(ray_local, tiny_qwen25, processor25, tmp_path):
    """The GPU path: NCCL process group, bf16 engine, ZeRO-3, gradient checkpointing; export loads."""
    from transformers import AutoModelForImageTextToText

    cfg = LearnerConfig(num_ranks=1, gpus_per_rank=1.0, zero_stage=3, lr=LR, micro_batch_size=2, warmup_ratio=0.0,
                        gradient_checkpointing=True, loss=LossConfig(kl_coef=0.05))
    group = LearnerGroup(str(tiny_qwen25), cfg, total_steps=10)
    try:
        samples = make_samples(processor25, 4, seed=1)
        losses = [group.sft_step(samples)["sft/loss"] for _ in range(4)]
        assert losses[-1] < losses[0], losses
        weights = ray.get(group.gather_weights())
        assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in weights.values())
        model = AutoModelForImageTextToText.from_pretrained(group.export_hf(tmp_path / "export"))
        assert set(weights) <= set(model.state_dict())
    finally:
        group.shutdown()


def test_rollout_and_learner_process_an_image_identically(setup):
    """An image over the run's pixel bound becomes the same pixels and image tokens in the rollout's HF
    engine and on the learner's ranks.

    Mutants: the rank trainer (or the HF engine) loads its processor without ``model.min_pixels`` /
    ``max_pixels``. The learner's ranks then expand the image to more features than the sample has
    image tokens and refuse the micro-batch; the engine's pixel tensor differs from the learner's.
    """
    from cv_ray.agent.chat import build_model_inputs
    from cv_ray.learner.batch import collate
    from cv_ray.rollout.hf_engine import HFEngine

    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 255, size=(160, 200, 3), dtype=np.uint8))  # 32,000 px > 12,544
    (sample,) = make_samples(setup.processor, 1, seed=9)
    sample = _with_image(setup.processor, sample, image)
    image_id = setup.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    tokens = int((sample.input_ids == image_id).sum())
    unbounded = AutoProcessor.from_pretrained(setup.path)
    assert tokens < int((np.asarray(_with_image(unbounded, sample, image).input_ids) == image_id).sum())

    engine = HFEngine(setup.model)
    rollout_inputs = build_model_inputs(engine.processor, [sample.input_ids.tolist()], [[image]], pad_id=0)
    learner_inputs = collate([sample], setup.processor, 0).inputs
    assert torch.equal(rollout_inputs["pixel_values"], learner_inputs["pixel_values"])
    assert torch.equal(rollout_inputs["image_grid_thw"], learner_inputs["image_grid_thw"])
    (logprobs,) = setup.group.compute_logprobs([sample], "policy")  # the ranks accept the image tokens
    assert np.isfinite(logprobs).all() and len(logprobs) == len(sample.input_ids)


def _with_image(processor, sample, image):
    """``sample`` with its one image replaced by ``image``, its placeholders re-expanded by ``processor``."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    ids = [int(t) for t in sample.input_ids]
    first = ids.index(image_id)
    last = len(ids) - ids[::-1].index(image_id)
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    count = int(grid.prod()) // processor.image_processor.merge_size ** 2
    new_ids = ids[:first] + [image_id] * count + ids[last:]
    mask = np.concatenate([np.zeros(first + count), np.asarray(sample.loss_mask[last:])])
    return dataclasses.replace(sample, input_ids=np.asarray(new_ids), loss_mask=mask, images=[image])



def test_truncated_importance_weights_against_the_pre_update_policy(ray_local, tiny_model_dirs):
    """``loss.tis_cap`` (the asynchronous loop's correction) with two updates per step: every update's
    ratio is taken against the policy as it was before the step (computed once, first), and each token
    is weighted by min(pi_before / pi_sampler, cap). The sampler's log-probs are set 3x less likely than
    the learner's on samples 0 and 2 (weight capped at 2) and 2x more likely on samples 1 and 3 (weight
    0.5), so each update's ``tis_weight`` and ``tis_capped_frac`` are known from which samples its
    mini-batch holds.

    Mutant: no pre-pass (the second update takes the moved policy as its "before"): samples 1 and 3,
    whose advantage is negative, then weigh 0.5 x (a ratio below 1) in the second update.
    """
    path = str(tiny_model_dirs["qwen2_5_vl"])
    model = ModelRef(path, **BOUNDS)
    cfg = LearnerConfig(num_ranks=1, zero_stage=0, lr=LR, micro_batch_size=2, mini_batch_size=2,
                        warmup_ratio=0.0, lr_schedule="constant", loss=LossConfig(kl_coef=0.0, tis_cap=2.0))
    with LearnerGroup(model, cfg, total_steps=10, seed=0) as group:
        samples = make_samples(model.load_processor(), 4, seed=71, rl=True)
        samples = [dataclasses.replace(s, uid=f"s{i}") for i, s in enumerate(samples)]
        before = group.compute_logprobs(samples, "policy")
        shift = [np.log(3.0), -np.log(2.0), np.log(3.0), -np.log(2.0)]
        samples = [dataclasses.replace(s, rollout_logprobs=np.where(s.loss_mask > 0, lp - d, 0.0))
                   for s, lp, d in zip(samples, before, shift)]
        weight = {"s0": 2.0, "s1": 0.5, "s2": 2.0, "s3": 0.5}
        batches: list[list] = []
        run_update = group._run_update

        def recording(update, batch):
            batches.append(list(batch))
            return run_update(update, batch)

        group._run_update = recording
        metrics = group.rl_step(samples)

    assert metrics["rl/updates"] == 2 and len(batches) == 2
    per_update = [_token_mean(b, [np.full(len(s.loss_mask), weight[s.uid]) for s in b]) for b in batches]
    capped = [_token_mean(b, [np.full(len(s.loss_mask), float(weight[s.uid] == 2.0)) for s in b]) for b in batches]
    assert metrics["rl/tis_weight"] == pytest.approx(np.mean(per_update), rel=1e-5)
    assert metrics["rl/tis_capped_frac"] == pytest.approx(np.mean(capped), abs=1e-6)
