"""Correct multi-turn SFT trajectories (CodeVision style), every tool call executed in the sandbox.

For a synthetic task (``cv_ray.data.families``) the generator plans the fixes the task needs
(orientation, enhancement, crop; coarse-to-fine for the tiniest targets), writes each as code in a
randomly chosen style (PIL / NumPy / OpenCV), runs it in the sandbox and records exactly what the
sandbox returned: the tool images and, for error-recovery trajectories, the real error text of a
first call that really fails. Kinds: ``single_tool``, ``multi_tool``, ``multi_crop``,
``error_recovery``, ``no_tool``.

Conversation layout (the rollout's): system prompt; user = task images then the question;
assistant turns = ``<think>...</think>`` + one tool call (``format_tool_call``); tool turns =
``tool_response_content(result, output_index)``; last assistant turn =
``<think>...</think>\\n<answer>...</answer>``. ``SFTExample.images`` holds the task images then each
successful tool output, in placeholder order.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageChops

from cv_ray.agent.prompts import SYSTEM_PROMPT
from cv_ray.agent.tool_format import format_tool_call, tool_response_content
from cv_ray.agent.tool_parser import parse_tool_calls
from cv_ray.data.code_styles import CROP_STYLES, ENHANCE_STYLES, ORIENTATION_STYLES, pick
from cv_ray.data.corruptions import get_corruption
from cv_ray.geometry import map_box
from cv_ray.types import ORIENTATION_OPS, Box, ExecResult, SFTExample, Task

SFT_KINDS = ("single_tool", "multi_tool", "multi_crop", "error_recovery", "no_tool")
ERROR_KINDS = ("name_error", "image_index", "no_result", "crop_order")
CROP_TARGET_SIDE = 336
"""Crops are enlarged by an integer factor towards this long side (at most 6x)."""


class Sandbox(Protocol):
    """What the generator needs from ``cv_ray.sandbox.SandboxPool``."""

    def run(self, code: str, images: list[Image.Image], image_index: int = 0) -> ExecResult: ...


class TrajectoryError(RuntimeError):
    """The sandbox did not do what a planned (known-correct) call should do: a generator or sandbox bug."""


@dataclass
class Call:
    """One planned tool call: the reasoning before it and the code."""

    think: str
    code: str
    description: str
    ops: list[str]
    """Op names this call applies (checked against the sandbox's traced ops)."""
    box_after: Box | None
    """The answer box in the frame of this call's output."""
    output_size: tuple[int, int]
    """(width, height) of this call's output."""


@dataclass
class Recorder:
    """Builds the conversation while running calls in the sandbox."""

    task: Task
    sandbox: Sandbox
    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    """Every image of the episode (task images, then successful outputs): what ``image_index`` indexes."""
    traced_ops: list[str] = field(default_factory=list)
    error_classes: list[str] = field(default_factory=list)
    system_prompt: str = SYSTEM_PROMPT
    """The episode's system message (the rollout's ``rollout.system_prompt``)."""

    def __post_init__(self) -> None:
        self.images = list(self.task.images)
        content: list[dict[str, Any]] = [{"type": "image"} for _ in self.task.images]
        content.append({"type": "text", "text": self.task.question})
        self.messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": content}]

    @property
    def current(self) -> int:
        return len(self.images) - 1

    def call(self, think: str, code: str, image_index: int, description: str) -> ExecResult:
        result = self.sandbox.run(code, images=self.images, image_index=image_index)
        output_index = None
        if result.ok and result.image is not None:
            output_index = len(self.images)
            self.images.append(result.image)
            self.traced_ops.extend(op["op"] for op in result.ops)
        elif result.error_class:
            self.error_classes.append(result.error_class)
        self.messages.append({"role": "assistant",
                              "content": f"<think>{think}</think>\n{format_tool_call(code, image_index, description)}"})
        self.messages.append({"role": "tool", "content": tool_response_content(result, output_index)})
        return result

    def run_planned(self, planned: Call) -> ExecResult:
        result = self.call(planned.think, planned.code, self.current, planned.description)
        if not result.ok:
            raise TrajectoryError(f"task {self.task.uid}: a planned call failed ({result.error_class}: {result.error})"
                                  f"\n{planned.code}")
        return result

    def answer(self, think: str) -> None:
        self.messages.append({"role": "assistant", "content": f"<think>{think}</think>\n<answer>{self.task.answer}</answer>"})


# ------------------------------------------------------------------------------------------------------------
# planning the calls


_ORIENTATION_SEEN = {  # fix op -> how the corrupted image looks
    "rotate_270": "turned 90 degrees counter-clockwise: the text runs from bottom to top",
    "rotate_90": "turned 90 degrees clockwise: the text runs from top to bottom",
    "rotate_180": "upside down",
    "flip_horizontal": "mirrored left to right: the letters are reversed",
    "flip_vertical": "flipped vertically: the letters are upside down and mirrored",
}
_ORIENTATION_FIX = {
    "rotate_270": "rotate it 90 degrees clockwise", "rotate_90": "rotate it 90 degrees counter-clockwise",
    "rotate_180": "rotate it by 180 degrees", "flip_horizontal": "flip it horizontally",
    "flip_vertical": "flip it vertically",
}
_ENHANCE_SEEN = {"contrast_up": ("has very low contrast", "increase the contrast"),
                 "brightness_up": ("is very dark", "brighten it"),
                 "sharpen": ("is blurry", "sharpen it")}


def _src(rng: np.random.Generator) -> str:
    return "image" if rng.random() < 0.6 else "img"


def _orientation_call(op: str, size: tuple[int, int], box: Box | None, rng: np.random.Generator) -> Call:
    _, style = pick(ORIENTATION_STYLES[op], rng)
    mapped = map_box(get_corruption(op).frame_map(*size), box) if box is not None else None
    turned = op in ("rotate_90", "rotate_270")
    think = f"The image is {_ORIENTATION_SEEN[op]}. I should {_ORIENTATION_FIX[op]} before reading anything."
    return Call(think, style(_src(rng)), f"fix orientation ({op})", [op], mapped,
                (size[1], size[0]) if turned else size)


def _enhance_call(op: str, size: tuple[int, int], box: Box | None, rng: np.random.Generator) -> Call:
    _, style = pick(ENHANCE_STYLES[op], rng)
    seen, fix = _ENHANCE_SEEN[op]
    think = f"The image {seen}, so the text is hard to make out. I'll {fix} first."
    return Call(think, style(_src(rng)), fix, [op], box, size)


def padded_crop(box: Box, size: tuple[int, int], margin_fraction: float, min_margin: int) -> list[int]:
    """Integer crop box around ``box`` with a margin, clipped to the image."""
    width, height = size
    margin = max(min_margin, margin_fraction * max(box[2] - box[0], box[3] - box[1]))
    return [max(0, math.floor(box[0] - margin)), max(0, math.floor(box[1] - margin)),
            min(width, math.ceil(box[2] + margin)), min(height, math.ceil(box[3] + margin))]


def _crop_call(box: Box, crop: list[int], think: str, src: str, rng: np.random.Generator) -> Call:
    width, height = crop[2] - crop[0], crop[3] - crop[1]
    scale = max(1, min(6, CROP_TARGET_SIDE // max(width, height)))
    _, style = pick(CROP_STYLES, rng)
    inside = [(box[0] - crop[0]) * scale, (box[1] - crop[1]) * scale, (box[2] - crop[0]) * scale,
              (box[3] - crop[1]) * scale]
    return Call(think, style(src, crop, scale), "crop and enlarge the region", ["crop"], inside,
                (width * scale, height * scale))


def _crop_calls(size: tuple[int, int], box: Box, rng: np.random.Generator, coarse_to_fine: bool,
                src: str) -> list[Call]:
    """One crop, or a coarse crop then a fine crop on its output."""
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    where = f"near x={centre[0]:.0f}, y={centre[1]:.0f}"
    if not coarse_to_fine:
        think = f"The target is small ({where}). I'll crop around it and enlarge it to read it."
        return [_crop_call(box, padded_crop(box, size, 0.35, 6), think, src, rng)]
    side = max(96, 4 * max(box[2] - box[0], box[3] - box[1]))
    jitter = rng.uniform(-0.25, 0.25, size=2) * side
    # The coarse window is jittered around the target but always contains it.
    coarse_box = [min(centre[0] - side / 2 + jitter[0], box[0]), min(centre[1] - side / 2 + jitter[1], box[1]),
                  max(centre[0] + side / 2 + jitter[0], box[2]), max(centre[1] + side / 2 + jitter[1], box[3])]
    first = _crop_call(box, padded_crop(coarse_box, size, 0.0, 0),
                       f"The target is tiny ({where}). I'll first zoom into the area around it.", src, rng)
    second = _crop_call(first.box_after, padded_crop(first.box_after, first.output_size, 0.35, 6),
                        "The region is larger now, but the text is still small. I'll crop tighter around it.",
                        _src(rng), rng)
    return [first, second]


def plan_calls(task: Task, rng: np.random.Generator, compose: bool = False) -> list[Call]:
    """The correct calls for the task's ``required_ops``, in order.

    ``compose``: write an orientation fix and the crop after it as one program (one call).
    """
    size = task.images[0].size
    box = list(task.answer_box) if task.answer_box is not None else None
    calls: list[Call] = []
    for op in task.required_ops:
        if op in ORIENTATION_OPS:
            calls.append(_orientation_call(op, size, box, rng))
        elif op in ENHANCE_STYLES:
            calls.append(_enhance_call(op, size, box, rng))
        elif op == "crop":
            if box is None:
                raise TrajectoryError(f"task {task.uid}: a crop is required but the task has no answer_box")
            merge = compose and len(calls) == 1 and calls[0].ops[0] in ORIENTATION_OPS
            crops = _crop_calls(size, box, rng, task.extra.get("variant") == "coarse_to_fine",
                                "result" if merge else _src(rng))
            if merge:
                first = calls.pop()
                crops[0] = Call(f"{first.think} Then I will crop: {crops[0].think[0].lower()}{crops[0].think[1:]}",
                                f"{first.code}\n{crops[0].code}", "fix orientation, then crop and enlarge",
                                first.ops + crops[0].ops, crops[0].box_after, crops[0].output_size)
            calls.extend(crops)
        else:
            raise TrajectoryError(f"task {task.uid}: no code style for op {op!r}")
        size, box = calls[-1].output_size, calls[-1].box_after
    return calls


# ------------------------------------------------------------------------------------------------------------
# error recovery: a first call that really fails


def _broken_call(error_kind: str, planned: Call, num_images: int, current: int) -> tuple[str, int, str]:
    """(code, image_index, what the recovery turn says) for a call that must fail."""
    if error_kind == "name_error":
        variable = "picture"
        broken = planned.code.replace("image", variable, 1) if "image" in planned.code else planned.code.replace(
            "img", variable, 1)
        return broken, current, f"There is no variable `{variable}`: the input image is called `image` (or `img`)."
    if error_kind == "image_index":
        return planned.code, num_images, f"Image {num_images} does not exist; the image I want is image {current}."
    if error_kind == "no_result":
        lines = planned.code.split("\n")
        lines[-1] = lines[-1].replace("result = ", "output_image = ", 1)
        return "\n".join(lines), current, "I forgot to store the final image in `result`."
    if error_kind == "crop_order":
        start = planned.code.index(".crop((") + len(".crop((")
        end = planned.code.index("))", start)
        x1, y1, x2, y2 = (v.strip() for v in planned.code[start:end].split(","))
        broken = planned.code[:start] + f"{x2}, {y1}, {x1}, {y2}" + planned.code[end:]
        return broken, current, "I swapped left and right in the crop box; left must be smaller than right."
    raise ValueError(f"unknown error kind {error_kind!r}")


def error_kinds_for(call: Call) -> list[str]:
    """The error kinds that can break ``call`` (``no_result`` only when ``result`` is assigned once)."""
    kinds = ["image_index"]
    if call.code.count("result") == 1:
        kinds.append("no_result")
    if "image" in call.code or "img" in call.code:
        kinds.append("name_error")
    if ".crop((" in call.code:
        kinds.append("crop_order")
    return kinds


# ------------------------------------------------------------------------------------------------------------
# the whole trajectory


def _final_think(task: Task, used_tools: bool) -> str:
    answer = task.answer
    if task.task_type == "count":
        reading = f"Counting them one by one, I get {answer}."
    elif task.data_source.endswith("zoom") or task.data_source.endswith("multi_op"):
        reading = f"The enlarged tag clearly reads '{answer}'."
    elif task.task_type == "ocr":
        reading = f"The text reads '{answer}'."
    else:
        reading = f"The value shown there is {answer}."
    if used_tools:
        return f"Now the content is easy to read. {reading}"
    return f"The image is upright and clear, so no processing is needed. {reading}"


def example_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(b"sft-trajectory"), index])


def choose_kind(task: Task, rng: np.random.Generator, error_rate: float) -> str:
    """The SFT kind for a task: decided by what it requires, plus a share of error-recovery ones."""
    if not task.required_ops:
        return "no_tool"
    if rng.random() < error_rate:
        return "error_recovery"
    if task.extra.get("variant") == "coarse_to_fine":
        return "multi_crop"
    return "multi_tool" if len(task.required_ops) > 1 else "single_tool"


def generate_example(task: Task, sandbox: Sandbox, rng: np.random.Generator, kind: str,
                     error_kind: str | None = None, system_prompt: str = SYSTEM_PROMPT) -> tuple[SFTExample, dict]:
    """One correct trajectory of ``kind`` for ``task``; returns it and its counts (ops, errors).

    ``error_kind`` (error-recovery only): one of ``ERROR_KINDS`` that fits the first call; random if None.
    ``system_prompt``: the episode's system message (the rollout's, so SFT teaches what RL samples under).
    """
    recorder = Recorder(task, sandbox, system_prompt=system_prompt)
    calls = plan_calls(task, rng, compose=kind == "multi_tool" and rng.random() < 0.3)
    if kind == "no_tool":
        if calls:
            raise ValueError(f"task {task.uid} requires {task.required_ops}; it cannot have a no-tool trajectory")
    elif not calls:
        raise ValueError(f"task {task.uid} requires no op; only a no_tool trajectory fits it")
    if kind == "error_recovery":
        possible = error_kinds_for(calls[0])
        if error_kind is None:
            error_kind = str(rng.choice(possible))
        elif error_kind not in possible:
            raise ValueError(f"error kind {error_kind!r} cannot break the first call of {task.uid}; use {possible}")
        code, image_index, recovery = _broken_call(error_kind, calls[0], len(recorder.images), recorder.current)
        failed = recorder.call(calls[0].think, code, image_index, calls[0].description)
        if failed.ok:
            raise TrajectoryError(f"task {task.uid}: the {error_kind} call should fail but succeeded:\n{code}")
        reason = failed.error.splitlines()[-1].rstrip(".") if failed.error else "unknown error"
        calls[0] = Call(f"The call failed: {reason}. "
                        f"{recovery} Let me fix it.", calls[0].code, calls[0].description, calls[0].ops,
                        calls[0].box_after, calls[0].output_size)
    for call in calls:
        recorder.run_planned(call)
    recorder.answer(_final_think(task, used_tools=bool(calls)))
    missing = [op for op in task.required_ops if op not in recorder.traced_ops]
    counts = {"ops_missing": len(missing), "calls": sum(1 for m in recorder.messages if m["role"] == "tool"),
              "errors": Counter(recorder.error_classes)}
    example = SFTExample(uid=f"sft-{task.uid}", messages=recorder.messages, images=recorder.images, kind=kind,
                         task_uid=task.uid)
    return example, counts


def images_equal(a: Image.Image, b: Image.Image) -> bool:
    if a.size != b.size:
        return False
    if a.mode != b.mode:
        a, b = a.convert("RGBA"), b.convert("RGBA")
    return ImageChops.difference(a, b).getbbox() is None


def verify_example(example: SFTExample, sandbox: Sandbox) -> list[str]:
    """Re-run every tool call of ``example`` in the sandbox; the problems found (empty when it replays).

    Checks that each call succeeds or fails as recorded, that each output equals the recorded
    image, and that each tool message's text is what the sandbox's result gives now.
    """
    problems: list[str] = []
    num_task_images = sum(1 for part in example.messages[1]["content"] if part.get("type") == "image")
    images = list(example.images[:num_task_images])
    recorded = iter(example.images[num_task_images:])
    messages = example.messages
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        for call in parse_tool_calls(message["content"]):
            if not call.ok:
                problems.append(f"message {k}: unparseable tool call ({call.error})")
                continue
            result = sandbox.run(call.code, images=images, image_index=call.image_index)
            output_index = len(images) if result.ok else None
            if result.ok and result.image is not None:
                images.append(result.image)
                expected = next(recorded, None)
                if expected is None or not images_equal(expected, result.image):
                    problems.append(f"message {k}: the tool output differs from the recorded image")
            if tool_response_content(result, output_index) != messages[k + 1]["content"]:
                problems.append(f"message {k + 1}: the tool response differs ({result.error_class}: {result.error})")
    if next(recorded, None) is not None:
        problems.append("more recorded images than successful tool calls")
    return problems
