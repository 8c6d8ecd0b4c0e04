"""Small SFT/RL sample batches for the learner tests, built with the tiny models' real processors."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cv_ray.learner.batch import TrainSample

_PROMPTS = ["what is written here", "which way is up", "count the red shapes", "read the number"]
_ANSWERS = ["the answer is 42", "rotate 90 then read", "three red shapes", "<answer>7</answer>"]


def make_samples(processor, n: int, seed: int = 0, rl: bool = False, with_images: bool = True) -> list[TrainSample]:
    """``n`` sequences: a prompt (with one real image when ``with_images``) and a trained answer.

    The prompt goes through the processor, which expands ``<|image_pad|>`` to the image's token
    count; the answer tokens (and ``<|im_end|>``) carry mask 1. RL samples get an advantage that
    alternates in sign and rollout log-probs filled in later by the caller when needed (zeros here).
    """
    rng = np.random.default_rng(seed)
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    samples = []
    for i in range(n):
        size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        images = [Image.fromarray(pixels)] if with_images else []
        vision = "<|vision_start|><|image_pad|><|vision_end|>" if with_images else ""
        text = f"<|im_start|>user\n{vision}{_PROMPTS[i % 4]}<|im_end|>\n<|im_start|>assistant\n"
        prompt = processor(text=[text], images=images or None, return_tensors="np")["input_ids"][0].tolist()
        answer = tok.encode(_ANSWERS[(i + seed) % 4], add_special_tokens=False) + [end]
        ids = prompt + answer
        mask = [0] * len(prompt) + [1] * len(answer)
        extra = {}
        if rl:
            extra = {"advantages": np.where(np.asarray(mask) > 0, 1.0 if i % 2 == 0 else -1.0, 0.0),
                     "rollout_logprobs": np.zeros(len(ids))}
        samples.append(TrainSample(input_ids=ids, loss_mask=mask, images=images, uid=f"task{i // 2}", **extra))
    return samples
