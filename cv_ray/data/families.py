"""Synthetic task families: small generator classes in a registry, deterministic by seed.

Each family draws clean content (``cv_ray.data.content``), corrupts it (``cv_ray.data.corruptions``)
and returns a :class:`cv_ray.types.Task` whose ``required_ops`` are the fixes, whose
``answer_box`` is in the frame of the image the model is given, and whose ``extra`` records
everything needed to re-derive the answer: ``content`` (render params), ``corruptions`` (applied
in order), ``clean_box`` (answer box in the clean frame), ``family`` and ``variant``.

Task ``i`` of family ``f`` in split ``s`` uses ``numpy.random.default_rng([seed, crc32(f), crc32(s), i])``,
so any task can be regenerated alone and adding tasks never changes earlier ones.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cv_ray.data.content import CONTENT_KINDS, render_content
from cv_ray.data.corruptions import (
    ORIENTATION_CORRUPTIONS,
    apply_corruptions,
    fix_ops,
    sample_corruption,
)
from cv_ray.types import Task


def task_rng(seed: int, family: str, split: str, index: int) -> np.random.Generator:
    """The per-task generator: independent of every other task."""
    return np.random.default_rng([seed, zlib.crc32(family.encode()), zlib.crc32(split.encode()), index])


@dataclass(frozen=True)
class Draft:
    """What a family decides for one task: content, corruptions, and what else the task needs."""

    content: dict[str, Any]
    corruptions: list[dict[str, Any]]
    variant: str
    needs_crop: bool


def build_task(family: str, draft: Draft, uid: str, split: str, extra: dict[str, Any] | None = None) -> Task:
    """Render the draft and turn it into a Task (answer box mapped into the corrupted frame)."""
    scene = render_content(draft.content)
    image, box = apply_corruptions(scene.image, scene.box, draft.corruptions)
    required = fix_ops(draft.corruptions) + (["crop"] if draft.needs_crop else [])
    return Task(
        uid=uid, data_source=f"synthetic/{family}", question=scene.question, images=[image], answer=scene.answer,
        required_ops=required, answer_box=box, task_type=scene.task_type, split=split,
        extra={"family": family, "variant": draft.variant, "content": draft.content,
               "corruptions": draft.corruptions, "clean_box": scene.box, **(extra or {})},
    )


class Orientation:
    """Readable content turned by 90/180/270 degrees or mirrored: fix the orientation, then read."""

    name = "orientation"

    def draft(self, rng: np.random.Generator, size: int) -> Draft:
        content = readable_content(rng, size)
        corruption = str(rng.choice(ORIENTATION_CORRUPTIONS))
        return Draft(content, [sample_corruption(corruption, rng)], corruption, needs_crop=False)


class Zoom:
    """A code on a tag under 1% of the image (``single``) or under 0.25% (``coarse_to_fine``)."""

    name = "zoom"

    def draft(self, rng: np.random.Generator, size: int) -> Draft:
        variant = "coarse_to_fine" if rng.random() < 0.35 else "single"
        content = CONTENT_KINDS["small_label"].sample(rng, size, "tiny" if variant == "coarse_to_fine" else "small")
        return Draft(content, [], variant, needs_crop=True)


class MultiOp:
    """A small tag in a turned or mirrored image: fix the orientation, then crop."""

    name = "multi_op"

    def draft(self, rng: np.random.Generator, size: int) -> Draft:
        content = CONTENT_KINDS["small_label"].sample(rng, size, "small")
        corruption = str(rng.choice(ORIENTATION_CORRUPTIONS))
        return Draft(content, [sample_corruption(corruption, rng)], corruption, needs_crop=True)


class Degraded:
    """Low contrast, darkness or blur over readable content: enhancing helps before reading."""

    name = "degraded"
    CORRUPTIONS = ("low_contrast", "darken", "blur")

    def draft(self, rng: np.random.Generator, size: int) -> Draft:
        content = CONTENT_KINDS["text_labels"].sample(rng, size, "medium")
        corruption = str(rng.choice(self.CORRUPTIONS))
        return Draft(content, [sample_corruption(corruption, rng)], corruption, needs_crop=False)


class NoTool:
    """Clean, upright, large content: a control where a tool adds nothing."""

    name = "no_tool"

    def draft(self, rng: np.random.Generator, size: int) -> Draft:
        if rng.random() < 0.25:
            content = CONTENT_KINDS["shapes"].sample(rng, size, "")
        else:
            content = readable_content(rng, size)
        return Draft(content, [], content["kind"], needs_crop=False)


def readable_content(rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Large text labels (two thirds) or a bar/line chart: legible at the model's resolution."""
    if rng.random() < 2 / 3:
        return CONTENT_KINDS["text_labels"].sample(rng, size, "large")
    return CONTENT_KINDS["chart"].sample(rng, size, str(rng.choice(["bar", "line"])))


FAMILIES = {f.name: f for f in (Orientation(), Zoom(), MultiOp(), Degraded(), NoTool())}


def generate_task(family: str, seed: int, index: int, size: int, split: str = "train") -> Task:
    """Task ``index`` of ``family``; the same arguments always give the same task."""
    if family not in FAMILIES:
        raise KeyError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}")
    draft = FAMILIES[family].draft(task_rng(seed, family, split, index), size)
    return build_task(family, draft, f"{family}-{split}-s{seed}-{index:06d}", split,
                      {"seed": seed, "index": index})


def generate_tasks(families: list[str], count: int, seed: int, size: int, split: str = "train") -> Iterator[Task]:
    """``count`` tasks, streamed; families interleaved round-robin (task ``i`` is family ``i % len(families)``)."""
    for i in range(count):
        yield generate_task(families[i % len(families)], seed, i // len(families), size, split)
