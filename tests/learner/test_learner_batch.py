"""TrainSample construction, collation with the real processors, and padded multimodal log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from learner_samples import make_samples
from PIL import Image

from cv_ray.learner.batch import TrainSample, collate, rl_sample, sft_sample
from cv_ray.learner.forward import sequence_logprobs
from cv_ray.types import SFTExample, Trajectory


def _trajectory(**overrides) -> Trajectory:
    fields = {"uid": "t0", "sample_index": 1, "prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10, 11],
              "response_mask": [1, 1, 0, 1], "rollout_logprobs": [-0.1, -0.2, 0.0, -0.3], "images": [],
              "model_images": [], "image_to_origin": [], "image_parent": []}
    fields.update(overrides)
    return Trajectory(**fields)


def test_rl_sample_aligns_prompt_and_response():
    sample = rl_sample(_trajectory(), advantage=0.7)
    assert sample.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert sample.loss_mask.tolist() == [0, 0, 0, 1, 1, 0, 1]
    np.testing.assert_allclose(sample.advantages, [0, 0, 0, 0.7, 0.7, 0.7, 0.7], atol=1e-7)
    np.testing.assert_allclose(sample.rollout_logprobs, [0, 0, 0, -0.1, -0.2, 0, -0.3], atol=1e-7)
    dense = rl_sample(_trajectory(), advantage=[1.0, 2.0, 0.0, 3.0])
    np.testing.assert_allclose(dense.advantages, [0, 0, 0, 1, 2, 0, 3])
    with pytest.raises(ValueError, match="per-token advantages"):
        rl_sample(_trajectory(), advantage=[1.0, 2.0])
    with pytest.raises(ValueError, match="differ in length"):
        rl_sample(_trajectory(response_mask=[1, 1]), advantage=1.0)


def test_train_sample_rejects_bad_records():
    with pytest.raises(ValueError, match=r"loss_mask\[0\]"):
        TrainSample(input_ids=[1, 2, 3], loss_mask=[1, 1, 1])
    with pytest.raises(ValueError, match="shape"):
        TrainSample(input_ids=[1, 2, 3], loss_mask=[0, 1])
    with pytest.raises(ValueError, match="NaN"):
        TrainSample(input_ids=[1, 2], loss_mask=[0, 1], advantages=[0.0, float("nan")])


def test_collate_pads_right_and_encodes_images_per_sample(processor25):
    samples = make_samples(processor25, 3, rl=True)
    pad = processor25.tokenizer.pad_token_id
    batch = collate(samples, processor25, pad)
    ids = batch.inputs["input_ids"]
    T = max(len(s.input_ids) for s in samples)
    assert ids.shape == (3, T) and batch.loss_mask.shape == (3, T)
    image_id = processor25.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        assert ids[row, :n].tolist() == sample.input_ids.tolist()
        assert (ids[row, n:] == pad).all() and (batch.inputs["attention_mask"][row, n:] == 0).all()
        assert batch.loss_mask[row, n:].sum() == 0 and batch.advantages[row, n:].abs().sum() == 0
        assert batch.inputs["mm_token_type_ids"][row].tolist() == (ids[row] == image_id).long().tolist()
    grid = batch.inputs["image_grid_thw"]
    assert grid.shape == (3, 3) and batch.inputs["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    # An image the sequence has no placeholders for is caught before the model sees it.
    wrong = TrainSample(input_ids=samples[0].input_ids, loss_mask=samples[0].loss_mask,
                        images=samples[0].images + [Image.new("RGB", (56, 56))])
    with pytest.raises(ValueError, match="placeholder"):
        collate([wrong], processor25, pad)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_logprobs_of_a_padded_batch_equal_each_sequence_alone(family, tiny_model_dirs, request):
    """Right padding and per-sample images must not change any sequence's log-probs (mRoPE positions
    come from the model's own rope index over each row's images; pixel rows follow the samples)."""
    from transformers import AutoModelForImageTextToText

    from cv_ray.agent.chat import banned_token_ids

    processor = request.getfixturevalue("processor25" if family == "qwen2_5_vl" else "processor3")
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs[family]).eval()
    banned = banned_token_ids(model.config)
    samples = make_samples(processor, 3, seed=3)
    samples.append(make_samples(processor, 1, seed=5, with_images=False)[0])
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        together, entropy = sequence_logprobs(model, collate(samples, processor, pad), 1.0, banned)
        for row, sample in enumerate(samples):
            alone, _ = sequence_logprobs(model, collate([sample], processor, pad), 1.0, banned)
            n = len(sample.input_ids)
            torch.testing.assert_close(together[row, :n], alone[0], atol=2e-5, rtol=0)
            assert together[row, n:].abs().sum() == 0
    trained = torch.stack([torch.nn.functional.pad(torch.tensor(s.loss_mask), (0, together.shape[1] - len(s.loss_mask)))
                           for s in samples]) > 0
    assert (together[trained] < 0).all() and torch.isfinite(together).all()
    assert (entropy[trained] > 0).all()


def test_sft_sample_uses_the_rollout_encoder(processor25):
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    example = SFTExample(uid="ex", images=[image], messages=[
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is this"}]},
        {"role": "assistant", "content": "<answer>red</answer>"},
    ])
    sample = sft_sample(processor25, example)
    trained = sample.input_ids[sample.loss_mask > 0]
    text = processor25.tokenizer.decode(trained.tolist())
    assert text.startswith("<answer>red</answer>") and text.endswith("<|im_end|>")
    collate([sample], processor25, processor25.tokenizer.pad_token_id)  # placeholders match the image
