"""The learner's chunked log-probs (lm_head per chunk of positions) equal the full-logits computation.

On the tiny Qwen2.5-VL and Qwen3-VL models with a padded multimodal batch, then through a 2-rank
ZeRO-3 learner group (partitioned lm_head; the ranks have different numbers of chunks) against the
unchunked computation on a plain model in this process.
"""

from __future__ import annotations

import pytest
import torch
from learner_samples import make_samples

from cv_ray.errors import ConfigError
from cv_ray.learner.batch import collate
from cv_ray.learner.config import LearnerConfig, LossConfig
from cv_ray.learner.forward import sequence_logprobs

TEMPERATURE = 0.7


def _model_and_batch(path, processor):
    from transformers import AutoModelForImageTextToText

    from cv_ray.agent.chat import banned_token_ids

    model = AutoModelForImageTextToText.from_pretrained(path)
    model.get_submodule("model.visual").requires_grad_(False)
    samples = make_samples(processor, 3, seed=3) + make_samples(processor, 1, seed=5, with_images=False)
    return model, collate(samples, processor, processor.tokenizer.pad_token_id), banned_token_ids(model.config)


def _loss(batch, logp, entropy):
    tokens = batch.loss_mask.sum()
    return -(logp * batch.loss_mask).sum() / tokens - 0.1 * (entropy * batch.loss_mask).sum() / tokens


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_chunked_logprobs_and_gradients_equal_the_full_computation(family, tiny_model_dirs, request):
    """Mutants: scores put back at position t instead of t + 1; hidden states of padding scored in
    place of real positions; the entropy's gradient dropped."""
    processor = request.getfixturevalue("processor25" if family == "qwen2_5_vl" else "processor3")
    model, batch, banned = _model_and_batch(tiny_model_dirs[family], processor)
    results = {}
    for chunk in (0, 5):  # 5 positions: every sequence spans several chunks, the last one partial
        model.zero_grad()
        logp, entropy = sequence_logprobs(model, batch, TEMPERATURE, banned, chunk_tokens=chunk)
        _loss(batch, logp, entropy).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[chunk] = logp.detach(), entropy.detach(), grads
    (lp_full, ent_full, g_full), (lp, ent, g) = results[0], results[5]
    assert "forward" not in vars(model.get_output_embeddings())  # the patched forward is gone again
    torch.testing.assert_close(lp, lp_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_full, atol=1e-5, rtol=0)
    assert (lp_full[batch.loss_mask > 0] < 0).all() and (ent_full[batch.loss_mask > 0] > 0).all()
    assert g.keys() == g_full.keys() and "lm_head.weight" in g and any("layers.0." in n for n in g)
    for name in g:
        torch.testing.assert_close(g[name], g_full[name], atol=1e-5, rtol=0, msg=name)


def test_no_vocabulary_sized_tensor_is_saved_for_the_backward(tiny_qwen25, processor25):
    """Mutant: the model's full logits computed and scored in chunks (the [B, T, vocab] logits and
    their log-softmax still saved for the backward)."""
    model, batch, banned = _model_and_batch(tiny_qwen25, processor25)
    vocab = model.config.text_config.vocab_size
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def logits_sized(chunk: int) -> list[torch.Size]:
        saved: list[torch.Size] = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in parameters:  # lm_head's weight is [vocab, hidden]
                saved.append(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sequence_logprobs(model, batch, TEMPERATURE, banned, chunk_tokens=chunk)
        return [s for s in saved if len(s) >= 2 and s[-1] == vocab]

    assert logits_sized(0)  # the check can fail: the full computation saves several
    assert logits_sized(8) == []


def test_chunk_setting_is_validated():
    LearnerConfig(logprob_chunk_tokens=0).validate()
    with pytest.raises(ConfigError) as err:
        LearnerConfig(logprob_chunk_tokens=-2).validate()
    assert err.value.key == "learner.logprob_chunk_tokens"


@pytest.mark.slow
def test_zero3_two_ranks_chunked_match_the_full_computation(ray_local, tiny_qwen25, processor25):
    """ZeRO-3 partitions lm_head: its hooks must gather the weight for the patched forward and again for
    the backward, and the ranks (different lengths, so different chunk counts) must stay in step.
    The group's SFT loss, gradient norm and log-probs equal the unchunked ones computed here.

    Mutants: ``head.weight`` read outside the lm_head call (an empty ZeRO-3 partition: an error); the
    head called as a module once per chunk (the ranks' gathers fall out of step and both ranks block:
    the test fails at the suite's timeout).
    """
    from cv_ray.learner.group import LearnerGroup
    from cv_ray.learner.losses import sft_loss

    samples = make_samples(processor25, 4, seed=7)
    # Contiguous shards and micro-batches of one: rank 0 scores samples 0 then 1 while rank 1 scores
    # 2 then 3, each in ceil((length - 1) / 5) chunks; the ranks' chunk counts differ both times.
    chunks = [-(-(len(s.input_ids) - 1) // 5) for s in samples]
    assert chunks[0] != chunks[2] and chunks[1] != chunks[3], chunks
    cfg = LearnerConfig(num_ranks=2, zero_stage=3, micro_batch_size=1, logprob_chunk_tokens=5, lr=1e-4,
                        warmup_ratio=0.0, lr_schedule="constant", grad_clip=0.0, loss=LossConfig(kl_coef=0.0))
    group = LearnerGroup(str(tiny_qwen25), cfg, total_steps=10, seed=0)
    try:
        policy = group.compute_logprobs(samples, "policy")
        metrics = group.sft_step(samples)
    finally:
        group.shutdown()

    model, _, banned = _model_and_batch(tiny_qwen25, processor25)
    batch = collate(samples, processor25, processor25.tokenizer.pad_token_id)
    logp, entropy = sequence_logprobs(model, batch, 1.0, banned, chunk_tokens=0)
    loss, _ = sft_loss(logp, entropy, batch.loss_mask, float(batch.loss_mask.sum()))
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    for row, lp in enumerate(policy):
        torch.testing.assert_close(torch.tensor(lp), logp[row, :len(lp)].detach(), atol=1e-5, rtol=0)
    assert metrics["sft/loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert metrics["sft/grad_norm"] == pytest.approx(float(grad_norm), rel=1e-4)
