"""Golden tokenization: the loop's appended ids equal the chat template applied to the whole conversation.

For 0 to 4 tool turns (parse errors, runtime errors, out-of-range image_index, images, two calls in
one turn = consecutive tool messages), run through the real sandbox, on both tiny architectures, the trajectory's
``prompt_ids + response_ids`` is compared id for id with
``processor(text=processor.apply_chat_template(conversation, tools=[TOOL_SCHEMA]), images=model_images)``,
where the conversation is rebuilt independently from the script and the trajectory's tool records.
``encode_sft`` of the same conversation must give the same ids and the same mask.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
from agent_testlib import CROP, FAILING, ROTATE_90, noise_image

from cv_ray.agent.chat import banned_token_ids, encode_sft
from cv_ray.agent.config import LoopSettings
from cv_ray.agent.loop import AgentLoop
from cv_ray.agent.prompts import SYSTEM_PROMPT, TOOL_SCHEMA
from cv_ray.agent.tool_format import format_tool_call, tool_error_content, tool_response_content
from cv_ray.agent.tool_parser import parse_tool_calls
from cv_ray.rollout.scripted_engine import ScriptedEngine
from cv_ray.types import SFTExample, Task

ANSWER = "<think>the text reads 7</think><answer>7</answer>"
BAD_JSON = "<think>rotate</think><tool_call>\n{\"name\": \"code_image_tool\", \"arguments\": {\"code\": \n</tool_call>"
UNKNOWN_TOOL = "<tool_call>\n" + json.dumps({"name": "zoom", "arguments": {"code": "x", "image_index": 0}}) + "\n</tool_call>"

SCRIPTS = {
    "0_tools": [ANSWER],
    "1_tool": ["<think>the image is rotated</think>" + format_tool_call(ROTATE_90, 0, "fix orientation"), ANSWER],
    "2_tools": [format_tool_call(ROTATE_90, 0), format_tool_call(CROP, 1, "zoom"), ANSWER],
    "3_tools_errors_and_two_calls": [
        BAD_JSON,
        format_tool_call(FAILING, 0),
        format_tool_call(ROTATE_90, 0) + "\n" + format_tool_call(CROP, 1),
        ANSWER,
    ],
    "4_tools": [
        format_tool_call(ROTATE_90, 0),
        format_tool_call(CROP, 7),
        UNKNOWN_TOOL + format_tool_call(CROP, 1),
        format_tool_call(CROP, 0) + format_tool_call(FAILING, 2),
        ANSWER,
    ],
}

# Small tool-image bounds so that rotated outputs get resized for the model.
CFG = LoopSettings(max_turns=8, max_new_tokens_per_turn=512, max_response_tokens=8192,
                   tool_image_min_pixels=28 * 28, tool_image_max_pixels=28 * 28 * 3)


def rebuild_conversation(task: Task, texts: list[str], trajectory) -> list[dict]:
    """The conversation the trajectory stands for, from the script and the tool records only."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "image"}] * len(task.images) + [{"type": "text", "text": task.question}]}]
    records = iter(trajectory.tool_calls)
    for text in texts[: trajectory.num_turns]:
        messages.append({"role": "assistant", "content": text})
        for call in parse_tool_calls(text):
            record = next(records)
            if not record.parsed:
                content = tool_error_content(call.error)
            else:
                image = trajectory.images[record.output_index] if record.output_index is not None else None
                content = tool_response_content(replace(record.result, image=image), record.output_index)
            messages.append({"role": "tool", "content": content})
    assert next(records, None) is None
    return messages


def template_ids(processor, messages, images) -> list[int]:
    text = processor.apply_chat_template(messages, tools=[TOOL_SCHEMA], tokenize=False)
    return processor(text=[text], images=list(images) or None, return_tensors="pt")["input_ids"][0].tolist()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_loop_ids_equal_chat_template(family, script, processors, codecs, sandbox_tools):
    processor, codec = processors[family], codecs[family]
    texts = SCRIPTS[script]
    task = Task(uid="t0", data_source="test", question="What number is written?", images=[noise_image(64, 48)],
                answer="7")
    trajectory = asyncio.run(AgentLoop(ScriptedEngine(codec, texts), codec, sandbox_tools, CFG).run(task))

    assert trajectory.stop_reason == "answer"
    assert trajectory.num_turns == len(texts)
    messages = rebuild_conversation(task, texts, trajectory)
    assert sum(1 for m in messages if m["role"] == "tool") == sum(len(parse_tool_calls(t)) for t in texts)
    expected = template_ids(processor, messages, trajectory.model_images)
    assert trajectory.prompt_ids + trajectory.response_ids == expected

    # Mask 1 exactly on the scripted tokens and each turn's <|im_end|>; log-probs only there.
    sampled = [t for t, m in zip(trajectory.response_ids, trajectory.response_mask) if m]
    scripted = [t for text in texts for t in codec.tokenizer.encode(text, add_special_tokens=False) + [codec.end_of_turn_id]]
    assert sampled == scripted
    assert all(lp == 0.0 for lp, m in zip(trajectory.rollout_logprobs, trajectory.response_mask) if not m)
    assert trajectory.response_text == "\n".join(texts)

    # The SFT encoder, fed the same conversation, produces the same ids and the same mask.
    example = SFTExample(uid="e0", messages=messages, images=trajectory.model_images)
    ids, mask, inputs = encode_sft(processor, example, codec)
    assert ids == expected
    assert mask == [0] * len(trajectory.prompt_ids) + trajectory.response_mask
    assert inputs["input_ids"][0].tolist() == ids


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_encode_sft_masks_assistant_tokens_only(family, processors, codecs):
    """A hand-written conversation: the mask-1 tokens decode to the assistant contents plus <|im_end|>."""
    processor, codec = processors[family], codecs[family]
    first = "<think>rotated</think>" + format_tool_call(ROTATE_90, 0)
    second = format_tool_call(CROP, 1) + "\n" + format_tool_call(FAILING, 0)
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the number."}]},
        {"role": "assistant", "content": first},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Image 1 (48x64) is the result."}]},
        {"role": "assistant", "content": second},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Image 2 (32x24) is the result."}]},
        {"role": "tool", "content": "Error: NameError: name 'undefined_name' is not defined"},
        {"role": "assistant", "content": ANSWER},
    ]
    images = [noise_image(64, 48, 1), noise_image(48, 64, 2), noise_image(32, 24, 3)]
    ids, mask, inputs = encode_sft(processor, SFTExample(uid="e1", messages=messages, images=images), codec)
    assert ids == template_ids(processor, messages, images)
    assert len(mask) == len(ids)
    # Split the mask-1 tokens into runs; each run is one assistant turn.
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    assert [codec.decode(r) for r in runs] == [first + "<|im_end|>", second + "<|im_end|>", ANSWER + "<|im_end|>"]
    assert inputs["image_grid_thw"].shape == (3, 3)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_banned_ids_agree_between_tokenizer_and_model_config(family, processors, tiny_model_dirs):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dirs[family])
    tokenizer = processors[family].tokenizer
    expected = sorted(tokenizer.convert_tokens_to_ids(t) for t in
                      ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    assert banned_token_ids(tokenizer) == banned_token_ids(processors[family]) == banned_token_ids(config) == expected


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_codec_from_config_sets_the_prompt_and_the_tools_block(family, processors):
    """`rollout.system_prompt` / `rollout.tools_in_prompt`: the SFT encoding under such a codec is
    still the chat template's own rendering of the conversation (no tools block when they are off)."""
    from cv_ray.agent.chat import codec_from_config
    from cv_ray.rollout.config import RolloutConfig

    processor = processors[family]
    default = codec_from_config(processor, RolloutConfig())
    assert default.system_prompt == SYSTEM_PROMPT and default.tools == [TOOL_SCHEMA]

    short = "Fix the image with the tool, then answer."
    codec = codec_from_config(processor, RolloutConfig(system_prompt=short, tools_in_prompt=False))
    prompt = codec.render(codec.prompt_messages("Which way is up?", 1), add_generation_prompt=True)
    assert short in prompt and "<tools>" not in prompt and SYSTEM_PROMPT not in prompt

    messages = [
        {"role": "system", "content": short},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the number."}]},
        {"role": "assistant", "content": "<think>rotated</think>" + format_tool_call(ROTATE_90, 0)},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Image 1 (48x64) is the result."}]},
        {"role": "assistant", "content": ANSWER},
    ]
    images = [noise_image(64, 48, 1), noise_image(48, 64, 2)]
    ids, mask, _ = encode_sft(processor, SFTExample(uid="e2", messages=messages, images=images), codec)
    text = processor.apply_chat_template(messages, tokenize=False)
    assert ids == processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()
    with_tools, _, _ = encode_sft(processor, SFTExample(uid="e2", messages=messages, images=images), default)
    assert len(with_tools) - len(ids) > 100  # the schema block is what the setting leaves out
