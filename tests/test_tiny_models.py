"""The tiny Qwen-VL models: built offline, reloaded through the real loading path, and usable."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from cv_ray.agent.prompts import SYSTEM_PROMPT, TOOL_SCHEMA
from cv_ray.agent.tool_format import format_tool_call
from cv_ray.models import detect_family

EXPECTED_CLASSES = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
}


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def loaded(request, tiny_model_dirs):
    family = request.param
    model_dir = tiny_model_dirs[family]
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    return family, model_dir, processor, model


def test_reload_uses_the_real_classes(loaded):
    family, model_dir, processor, model = loaded
    model_cls, processor_cls = EXPECTED_CLASSES[family]
    assert type(model).__name__ == model_cls
    assert type(processor).__name__ == processor_cls
    assert detect_family(model_dir) == family
    tok = processor.tokenizer
    for special in ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                    "<tool_call>", "</tool_call>"]:
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1, f"{special} must be a single token, got {ids}"
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    if family == "qwen3_vl":  # Qwen3's vocabulary has the thinking and tool-response markers
        assert len(tok.encode("<think>", add_special_tokens=False)) == 1
        assert len(tok.encode("<tool_response>", add_special_tokens=False)) == 1
    # Text round-trips through the byte-level BPE, including characters unseen in training.
    text = "rotate 90° then read: 12.5% — 数字"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_generate_from_image_and_text(loaded):
    family, _, processor, model = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = _image(120, 90, seed=1)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    merge = processor.image_processor.merge_size
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert grid.shape == (1, 3)
    assert n_image_tokens == int(grid.prod()) // merge**2
    # pixel_values: one row per patch, each patch = channels * temporal * patch * patch values
    patch = processor.image_processor.patch_size
    assert inputs["pixel_values"].shape == (int(grid.prod()), 3 * 2 * patch * patch)
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=True)
    assert out.shape[0] == 1
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 6


def test_tool_conversation_renders_and_tokenizes(loaded):
    family, _, processor, model = loaded
    call = format_tool_call("result = image.rotate(90, expand=True)", image_index=0, description="fix orientation")
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the word."}]},
        {"role": "assistant", "content": f"<think>It is rotated.</think>\n{call}"},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Image 1 (90x120) is the result."}]},
        {"role": "tool", "content": "Error: NameError: name 'imgg' is not defined (line 1)"},
        {"role": "assistant", "content": "<think>Now it is upright.</think><answer>cat</answer>"},
    ]
    text = processor.apply_chat_template(messages, tools=[TOOL_SCHEMA], tokenize=False)
    assert json.dumps(TOOL_SCHEMA) in text  # the schema sits in the system turn
    assert "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>Image 1" in text
    assert "</tool_response>\n<tool_response>\nError: NameError" in text  # consecutive tool messages share a turn
    assert text.count("<|im_start|>user") == 2
    images = [_image(120, 90, seed=2), _image(90, 120, seed=3)]
    inputs = processor(text=[text], images=images, return_tensors="pt")
    merge = processor.image_processor.merge_size
    expected = int(inputs["image_grid_thw"].prod(-1).sum()) // merge**2
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == expected
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()
