"""The plain dataclasses that cross actor boundaries, defined once.

Every record that travels between the driver and the Ray actors (rollout workers, sandbox
executors, reward workers, learner ranks) is one of these. They hold only picklable values:
builtins, numpy arrays, torch tensors and PIL images. No behaviour lives here beyond small,
obvious helpers; the math and the orchestration live in their own modules.

Coordinate conventions used throughout the project:

* Pixel coordinates are continuous: pixel ``(col, row)`` covers ``[col, col+1) x [row, row+1)``.
  A box is ``[x1, y1, x2, y2]`` with ``x2``/``y2`` exclusive, so a crop of the whole ``W x H``
  image is ``[0, 0, W, H]``.
* A geometric map between two images is a 3x3 row-major matrix ``M`` acting on homogeneous column
  vectors: ``[x_dst, y_dst, 1]^T = M @ [x_src, y_src, 1]^T``. ``ExecResult.to_input`` maps
  *result* pixels to *input* pixels; ``Trajectory.image_to_origin[k]`` maps image ``k``'s pixels
  to image 0's pixels.
* Rotation names are counter-clockwise (PIL's convention): ``rotate_90`` is
  ``Image.transpose(Image.ROTATE_90)``; ``cv2.ROTATE_90_CLOCKWISE`` is ``rotate_270``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

Matrix3 = list[list[float]]
Box = list[float]

#: The six "core" ops of the method: the fixes for orientation and the crop/zoom.
CORE_OPS: frozenset[str] = frozenset(
    {"rotate_90", "rotate_180", "rotate_270", "flip_horizontal", "flip_vertical", "crop"}
)
#: The orientation subset of the core ops.
ORIENTATION_OPS: frozenset[str] = CORE_OPS - {"crop"}


@dataclass
class Task:
    """One question about one or more images: the unit of data for RL, SFT and evaluation."""

    uid: str
    """Stable identifier; the GRPO group key (all samples of one task share it)."""
    data_source: str
    """Which generator or dataset the task came from (e.g. ``synthetic/orientation``)."""
    question: str
    """The user's question text, without image placeholders."""
    images: list[Image.Image]
    """The images the model is given, in order; image 0 is what ``image_index=0`` refers to."""
    answer: str
    """The ground-truth answer (for multiple choice: the letter of the correct choice)."""
    choices: list[str] | None = None
    """Options of a multiple-choice question, in order (``A``, ``B``, ...); None otherwise."""
    required_ops: list[str] = field(default_factory=list)
    """Fixes the model must apply, in the sandbox's op names (e.g. ``["rotate_270", "crop"]``)."""
    answer_box: Box | None = None
    """Where the answer is, in the pixel frame of image 0 as given to the model."""
    task_type: str = "general"
    """Answer-checking family: ``ocr``, ``math``, ``count``, ``choice`` or ``general``."""
    split: str = "train"
    """``train``, ``val``, ``test`` or a benchmark suite's name."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else a source records (the corruption applied, the base question id, ...)."""


@dataclass
class ExecResult:
    """What the sandbox did with one piece of model-written code."""

    ok: bool
    """True when the code ran and left a valid image in ``result`` / ``output``."""
    image: Image.Image | None = None
    """The result image (None on failure)."""
    error: str | None = None
    """Exactly the text the model will read on failure (no host paths, no sandbox internals)."""
    error_class: str | None = None
    """Counted failure class: ``syntax``, ``runtime``, ``timeout``, ``memory``, ``forbidden``,
    ``import``, ``no_result``, ``bad_result``, ``bad_image``, ``image_index``, ``code_too_long``,
    ``sandbox`` (an infrastructure failure, not the model's fault)."""
    ops: list[dict[str, Any]] = field(default_factory=list)
    """Ops actually applied, in order, e.g. ``{"op": "rotate_90"}``,
    ``{"op": "crop", "box": [x1, y1, x2, y2], "frame_box": [...]}``, ``{"op": "contrast_up", "factor": 1.8}``.

    Every ``crop`` carries two boxes: ``box`` in the pixels of the call's input image, and
    ``frame_box``, the box exactly as the code passed it (before PIL rounds it), in the pixels of
    the image the crop was applied to inside the call (e.g. after a ``rotate`` in the same call),
    not mapped to the input. For a crop recognised from pixels alone (``"via": "pixels"``) the
    code's own frame is unknown and ``frame_box`` equals ``box``. Ops the sandbox could not check
    against the pixels carry ``"unverified": True``; see ``docs/sandbox_ops.md``."""
    to_input: Matrix3 | None = None
    """Maps result pixels to input pixels when the result is a geometric view of the input
    (90-degree turns, flips, crops, resizes and their compositions); else None."""
    stdout: str = ""
    """What the code printed (capped)."""
    seconds: float = 0.0
    """Wall time of the call as seen by the caller."""


@dataclass
class ToolCallRecord:
    """One tool call inside a trajectory, as the reward needs it."""

    turn: int
    """Assistant turn (0-based) that made the call."""
    parsed: bool
    """False when the call could not be parsed or validated (malformed JSON, unknown tool, bad
    arguments); then ``result`` is None and ``parse_error_class`` says why."""
    parse_error_class: str | None = None
    """``malformed_json``, ``unknown_tool``, ``missing_argument``, ``bad_argument``."""
    code: str = ""
    description: str = ""
    """The call's ``description`` argument (empty when absent or when the call did not parse)."""
    payload: str | None = None
    """The text between ``<tool_call>`` and ``</tool_call>`` exactly as the model wrote it; None for a
    call without its closing tag. The reference-compatible reward re-reads calls from it with the
    reference release's own (more lenient) parser."""
    image_index: int = 0
    """Which trajectory image the code ran on."""
    output_index: int | None = None
    """Index of the produced image in ``Trajectory.images`` (None when the call failed)."""
    result: ExecResult | None = None
    """The sandbox's report; its ``image`` is dropped (it lives in ``Trajectory.images``)."""

    @property
    def ok(self) -> bool:
        return self.parsed and self.result is not None and self.result.ok


@dataclass
class Trajectory:
    """One sampled multi-turn episode: everything the reward and the learner need.

    Token accounting invariant: ``prompt_ids + response_ids`` is exactly the token sequence the
    engine saw, turn after turn (never re-rendered), and it equals the chat template applied to
    the whole conversation. ``response_mask`` is 1 on tokens sampled by the policy (including each
    assistant turn's end token) and 0 on tool responses and other inserted tokens.
    """

    uid: str
    """The task's uid (the GRPO group key)."""
    sample_index: int
    """Which of the ``n`` samples of the task this is."""
    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    """Same length as ``response_ids``."""
    rollout_logprobs: list[float]
    """Log-prob of each response token under the rollout engine (0.0 where the mask is 0)."""
    images: list[Image.Image]
    """Every image of the episode at full resolution: the task's images, then each tool output."""
    model_images: list[Image.Image]
    """The resized copies actually placed in the token sequence, in placeholder order."""
    image_to_origin: list[Matrix3 | None]
    """Per image in ``images``: the map from its pixels to image 0's pixels (None when the image is
    not a geometric view of image 0)."""
    image_parent: list[int | None]
    """Per image in ``images``: the image it was produced from (None for task images)."""
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    response_text: str = ""
    """Decoded assistant text of the whole episode with tool responses removed."""
    turn_texts: list[str] = field(default_factory=list)
    """Decoded text of each assistant turn, in order (``response_text`` is them joined by newlines)."""
    num_turns: int = 0
    """Assistant turns generated."""
    stop_reason: str = ""
    """``answer``, ``no_tool_call``, ``max_turns``, ``max_tokens`` or ``error``."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Per-trajectory timings and counts (generation seconds, tool seconds, ...)."""
    token_versions: list[int] = field(default_factory=list)
    """Per response token: the weight version of the engine that sampled it (one version per turn;
    a later turn may come from newer weights), -1 on tokens that were not sampled (tool responses,
    separators). Empty for a trajectory not produced by an engine."""

    def oldest_version(self) -> int:
        """The oldest weight version that sampled any token of this trajectory (what staleness is
        measured from). Raises ValueError when no token carries a version."""
        sampled = [v for v in self.token_versions if v >= 0]
        if not sampled:
            raise ValueError(f"trajectory {self.uid}/{self.sample_index} has no token with a weight version")
        return min(sampled)


@dataclass
class RewardBreakdown:
    """The reward of one trajectory: the total, the terms it was made from, and log-only statistics."""

    total: float
    terms: dict[str, float] = field(default_factory=dict)
    """The unweighted value of every term the total is a weighted sum of (``acc``, ``fmt``,
    ``mandatory``, ``necessity``, ``exact``, ``emerge``, ``usage``, ``spurious``; see
    ``cv_ray.reward.dense.term_weights``). Nothing else: ``total == sum(weight * term)``."""
    stats: dict[str, float] = field(default_factory=dict)
    """Statistics logged beside the reward but not part of it (``iou``, ``calls``, ``tool_errors``)."""
    correct: bool = False
    """The answer verdict (rules, math-verify or the judge)."""
    judge_failed: bool = False
    """True when the LLM judge was asked and failed; the accuracy term is then a flagged 0."""


@dataclass
class SFTExample:
    """One supervised multi-turn conversation (a correct CodeVision-style trajectory).

    ``messages`` use the Hugging Face chat format: ``{"role": ..., "content": str | list[part]}``
    with ``{"type": "image"}`` parts where images go (user and tool messages) and
    ``{"type": "text", "text": ...}`` parts for text. Assistant messages hold the raw text the
    model should produce, tool calls included (``<tool_call>\\n{json}\\n</tool_call>``), exactly
    as the policy generates it at rollout time. The tool schema is not in the messages: the
    encoder passes it to the chat template, as the rollout does.
    """

    uid: str
    messages: list[dict[str, Any]]
    images: list[Image.Image]
    """The images in placeholder order (task images and tool outputs as the model saw them)."""
    kind: str = "single_tool"
    """``single_tool``, ``multi_tool``, ``multi_crop``, ``error_recovery`` or ``no_tool``."""
    task_uid: str = ""
    """The task the conversation solves."""
