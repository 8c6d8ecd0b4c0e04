"""Chat rendering and token accounting for the Qwen-VL families (token-in/token-out).

The agent loop never re-renders earlier turns. It starts from the prompt's ids and appends:

* the ids the policy sampled, verbatim (mask 1), ending with the end-of-turn token ``<|im_end|>``;
* the turn separator that the chat template writes after ``<|im_end|>`` (``\\n``, mask 0);
* for a run of tool messages, exactly the text the chat template renders for them followed by the
  generation prompt (``<|im_start|>user\\n<tool_response>\\n...\\n</tool_response><|im_end|>\\n
  <|im_start|>assistant\\n``), each ``<|image_pad|>`` expanded for its tool image to
  ``grid_t * grid_h * grid_w / merge**2`` copies, as the processor expands it (mask 0).

Every piece is *derived from the processor's own chat template* by rendering small dummy
conversations and taking differences (:class:`ChatCodec`), so the same code serves the tiny test
models and real Qwen2.5-VL / Qwen3-VL checkpoints. Segment boundaries always fall on special
tokens (``<|im_end|>``, ``<|im_start|>``), where byte-level BPE cannot merge across, so the
concatenation equals the template applied to the whole conversation; tests/agent/test_chat_golden.py
checks this id for id.

The same machinery encodes supervised conversations (:func:`encode_sft`), so SFT trains on exactly
the token layout the policy sees at rollout time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from cv_ray.agent.prompts import SYSTEM_PROMPT, TOOL_SCHEMA
from cv_ray.types import SFTExample

# The placeholder tokens a vision-language model must never sample: the engine masks their logits
# and the learner scores tokens under the same mask (cv_ray.logprobs).
_PLACEHOLDER_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
_PLACEHOLDER_CONFIG_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

_IMAGE_PAD = "<|image_pad|>"

# Markers used only inside the dummy conversations that derive the template's pieces.
_MARK_USER = "cv-ray-user-mark"
_MARK_ASSISTANT = "cv-ray-assistant-mark"


def banned_token_ids(tokenizer_or_config: Any) -> list[int]:
    """Ids of the image/video placeholder tokens (never sampled, masked in every log-prob).

    Accepts a tokenizer, a processor (its ``.tokenizer`` is used) or a model config (its
    ``image_token_id``, ``video_token_id``, ``vision_start_token_id``, ``vision_end_token_id``), so
    the rollout side (which has the processor) and the learner side (which has the model) compute
    the same sorted list.
    """
    source = getattr(tokenizer_or_config, "tokenizer", tokenizer_or_config)
    if hasattr(source, "convert_tokens_to_ids"):
        ids = []
        for token in _PLACEHOLDER_TOKENS:
            token_id = source.convert_tokens_to_ids(token)
            if token_id is None or token_id == source.unk_token_id:
                raise ValueError(f"the tokenizer has no {token} token; is this a Qwen-VL processor?")
            ids.append(int(token_id))
        return sorted(set(ids))
    ids = []
    for key in _PLACEHOLDER_CONFIG_KEYS:
        value = getattr(source, key, None)
        if value is None:
            raise ValueError(f"the model config has no {key}; is this a Qwen-VL config?")
        ids.append(int(value))
    return sorted(set(ids))


def count_image_parts(messages: Sequence[dict[str, Any]]) -> int:
    """Number of image placeholders the chat template writes for ``messages``."""
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(1 for part in content if part.get("type") == "image" or "image" in part)
    return count


@dataclass
class Segment:
    """A run of token ids appended to a sequence, with the images whose placeholders it holds."""

    ids: list[int]
    images: list[Image.Image] = field(default_factory=list)


class ChatCodec:
    """The pieces of one processor's chat template, derived once, and the encoders built on them.

    ``end_of_turn_id`` ends every assistant turn (sampled, mask 1); ``separator_ids`` follow it in
    the template (inserted, mask 0); :meth:`encode_prompt` and :meth:`encode_after_assistant` render
    the non-sampled parts.
    """

    def __init__(self, processor: Any, system_prompt: str = SYSTEM_PROMPT, tools: Sequence[dict] = (TOOL_SCHEMA,)):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.system_prompt = system_prompt
        self.tools = list(tools)
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
        self.video_token_id = int(self.tokenizer.convert_tokens_to_ids("<|video_pad|>"))
        self.banned_ids = banned_token_ids(self.tokenizer)

        # What the template writes after an assistant's content: "<|im_end|>" + separator.
        base = [{"role": "user", "content": _MARK_USER}, {"role": "assistant", "content": _MARK_ASSISTANT}]
        self._base_text = self.render(base)
        tail = self._base_text[self._base_text.rindex(_MARK_ASSISTANT) + len(_MARK_ASSISTANT):]
        tail_ids = self.tokenizer.encode(tail, add_special_tokens=False)
        if not tail_ids or self.tokenizer.convert_ids_to_tokens(tail_ids[0]) not in self.tokenizer.all_special_tokens:
            raise ValueError(f"the chat template ends an assistant turn with {tail!r}, not with a special token")
        self.end_of_turn_id: int = tail_ids[0]
        self.separator_ids: list[int] = tail_ids[1:]
        # The generation prompt ("<|im_start|>assistant\n").
        user_only = base[:1]
        with_prompt = self.render(user_only, add_generation_prompt=True)
        without_prompt = self.render(user_only)
        if not with_prompt.startswith(without_prompt):
            raise ValueError("the chat template re-renders earlier turns when adding the generation prompt")
        self.generation_prompt = with_prompt[len(without_prompt):]

    # -- rendering ---------------------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages`` (with this codec's tools), image placeholders unexpanded."""
        return self.processor.apply_chat_template(
            list(messages), tools=self.tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tokenize(self, text: str, images: Sequence[Image.Image]) -> list[int]:
        """Token ids of ``text`` with each ``<|image_pad|>`` expanded for its image.

        The count per image is the image processor's own ``get_number_of_image_patches`` (its
        smart-resize to the patch grid) divided by ``merge_size**2``, the processor's expansion
        without computing any pixels; the golden tests compare with ``processor(text, images)``.
        """
        images = list(images)
        pieces = text.split(_IMAGE_PAD)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"{len(pieces) - 1} image placeholders in the text but {len(images)} images")
        image_processor = self.processor.image_processor
        per_token = image_processor.merge_size ** 2
        expanded = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            patches = image_processor.get_number_of_image_patches(image.height, image.width)
            expanded.append(_IMAGE_PAD * (patches // per_token) + piece)
        return self.tokenizer.encode("".join(expanded), add_special_tokens=False)

    # -- encoders ----------------------------------------------------------------------------

    def prompt_messages(self, question: str, num_images: int) -> list[dict[str, Any]]:
        """The system and user messages of a task: the images first, then the question (Qwen's habit)."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": question})
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": content}]

    def encode_messages(self, messages: Sequence[dict[str, Any]], images: Sequence[Image.Image],
                        add_generation_prompt: bool) -> Segment:
        """A conversation's opening messages (no assistant turn yet), rendered and tokenized."""
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        return Segment(self.tokenize(text, images), list(images))

    def encode_prompt(self, question: str, images: Sequence[Image.Image]) -> Segment:
        """Prompt ids of a task: system (with the tool schema), user (images + question), generation prompt."""
        return self.encode_messages(self.prompt_messages(question, len(images)), images, add_generation_prompt=True)

    def encode_after_assistant(self, messages: Sequence[dict[str, Any]], images: Sequence[Image.Image],
                               add_generation_prompt: bool = True) -> Segment:
        """Ids of non-assistant messages (tool messages, a user turn) that follow an assistant turn.

        They are rendered after a dummy assistant turn and cut off where that turn's rendering ends
        (after its separator), so consecutive tool messages share one ``<|im_start|>user`` turn
        exactly as the template writes them.
        """
        if not messages:
            raise ValueError("no messages to encode")
        base = [{"role": "user", "content": _MARK_USER}, {"role": "assistant", "content": _MARK_ASSISTANT}]
        full = self.render(base + list(messages), add_generation_prompt=add_generation_prompt)
        if not full.startswith(self._base_text):
            raise ValueError("the chat template re-renders the assistant turn when later messages are added; "
                             "token-in/token-out accounting is impossible with this template")
        return Segment(self.tokenize(full[len(self._base_text):], images), list(images))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of sampled ids, special tokens kept (so it re-encodes to the same ids)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def build_model_inputs(processor: Any, sequences: Sequence[Sequence[int]], images: Sequence[Sequence[Image.Image]],
                       pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Padded model inputs for token sequences with expanded image placeholders.

    sequences: ``B`` id lists; images: per sequence, its images in placeholder order. Returns
    ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` ``[B, T]`` (0 text, 1 image, 2 video;
    Qwen-VL's 3-D RoPE needs it) and, when there are images, ``pixel_values [sum patches, C*P*P]``
    and ``image_grid_thw [num images, 3]`` in sequence order. Raises when a sequence's placeholder
    count does not match its images (the "image features and image tokens do not match" failure,
    caught before the model sees it).
    """
    if len(sequences) != len(images):
        raise ValueError(f"{len(sequences)} sequences but {len(images)} image lists")
    tokenizer = processor.tokenizer
    image_id = int(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    video_id = int(tokenizer.convert_tokens_to_ids("<|video_pad|>"))
    length = max(len(s) for s in sequences)
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids = torch.tensor(list(seq), dtype=torch.long)
        span = slice(length - len(seq), length) if padding_side == "left" else slice(0, len(seq))
        input_ids[row, span] = ids
        attention_mask[row, span] = 1
    mm_token_type_ids = torch.zeros_like(input_ids)
    mm_token_type_ids[(input_ids == image_id) & (attention_mask == 1)] = 1
    mm_token_type_ids[(input_ids == video_id) & (attention_mask == 1)] = 2
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                       "mm_token_type_ids": mm_token_type_ids}
    flat_images = [im for per_seq in images for im in per_seq]
    if flat_images:
        vision = processor.image_processor(images=flat_images, return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = processor.image_processor.merge_size
        tokens_per_image = (grid.prod(-1) // (merge * merge)).tolist()
        start = 0
        for row, per_seq in enumerate(images):
            expected = sum(tokens_per_image[start:start + len(per_seq)])
            start += len(per_seq)
            found = int((input_ids[row] == image_id).sum())
            if found != expected:
                raise ValueError(f"sequence {row} has {found} image placeholder tokens but its {len(per_seq)} "
                                 f"images need {expected}")
        inputs["pixel_values"] = vision["pixel_values"]
        inputs["image_grid_thw"] = grid
    elif int((input_ids == image_id).sum()):
        raise ValueError("image placeholder tokens but no images")
    return inputs


def codec_from_config(processor: Any, cfg: Any) -> ChatCodec:
    """The codec of ``cfg`` (a RolloutConfig): its system prompt and whether the tool schema is listed.

    The rollout and the SFT stage both build their codec here, so SFT trains on the prompt layout
    the policy later sees.
    """
    return ChatCodec(processor, system_prompt=cfg.system_prompt or SYSTEM_PROMPT,
                     tools=(TOOL_SCHEMA,) if cfg.tools_in_prompt else ())


def encode_sft(processor: Any, example: SFTExample,
               codec: ChatCodec | None = None) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
    """Ids of a whole supervised conversation, its loss mask and its model inputs.

    The mask is 1 on what the assistant produces (its content, tool-call text included, and its
    ``<|im_end|>``) and 0 elsewhere (prompt, separators, tool responses, generation prompts). The
    ids are built segment by segment exactly as the rollout builds them, and equal the chat template
    applied to the whole conversation (golden-tested). ``model_inputs`` is
    :func:`build_model_inputs` for the one sequence (no padding). Pass ``codec`` to reuse one
    across many examples.
    """
    codec = codec or ChatCodec(processor)
    messages = example.messages
    images = list(example.images)
    if count_image_parts(messages) != len(images):
        raise ValueError(f"example {example.uid}: {count_image_parts(messages)} image parts but {len(images)} images")
    first_assistant = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first_assistant is None or first_assistant == 0:
        raise ValueError(f"example {example.uid}: needs opening messages followed by an assistant turn")

    used = count_image_parts(messages[:first_assistant])
    prompt = codec.encode_messages(messages[:first_assistant], images[:used], add_generation_prompt=True)
    ids, mask = list(prompt.ids), [0] * len(prompt.ids)
    i = first_assistant
    while i < len(messages):
        message = messages[i]
        if message["role"] == "assistant":
            content = message.get("content")
            if not isinstance(content, str) or message.get("tool_calls"):
                raise ValueError(f"example {example.uid}: assistant content must be raw text (tool calls inline)")
            turn = codec.tokenizer.encode(content, add_special_tokens=False) + [codec.end_of_turn_id]
            ids += turn + codec.separator_ids
            mask += [1] * len(turn) + [0] * len(codec.separator_ids)
            i += 1
            continue
        run_end = i
        while run_end < len(messages) and messages[run_end]["role"] != "assistant":
            run_end += 1
        run = messages[i:run_end]
        n = count_image_parts(run)
        segment = codec.encode_after_assistant(run, images[used:used + n], add_generation_prompt=run_end < len(messages))
        used += n
        ids += segment.ids
        mask += [0] * len(segment.ids)
        i = run_end
    model_inputs = build_model_inputs(processor, [ids], [images], pad_id=codec.tokenizer.pad_token_id or 0)
    return ids, mask, model_inputs
