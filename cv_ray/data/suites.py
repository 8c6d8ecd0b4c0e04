"""Benchmark suites: versioned by name, deterministic by seed, generated on demand (never committed).

* ``orientation-v1``: each base question at ``identity``, ``rotate_90/180/270``, ``flip_horizontal``,
  ``flip_vertical``; grouped by ``extra["base_id"]`` with ``extra["transform"]``, so accuracy per
  transform and consistency across a question's variants can be computed.
* ``corruption-v1``: each base question clean and under noise, blur, low contrast, darkness and JPEG
  artefacts (grouped the same way).
* ``small_region-v1``, ``multi_op-v1``, ``no_tool-v1``: tasks of the matching family.

A suite's tasks are seeded by ``(seed, suite name, index)``, independent of the training families'
streams. Changing what a suite generates means a new version name, never an edit of an old one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cv_ray.data.content import CONTENT_KINDS
from cv_ray.data.corruptions import NATURAL_CORRUPTIONS, ORIENTATION_CORRUPTIONS, sample_corruption
from cv_ray.data.families import FAMILIES, Draft, build_task, readable_content, task_rng
from cv_ray.types import Task


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    build: Callable[[str, int, int, int], list[Task]]
    """``(name, seed, base_questions, image_size) -> tasks``."""


def _grouped(family: str, transforms: tuple[str, ...], content_for: Callable) -> Callable[[str, int, int, int], list[Task]]:
    def build(name: str, seed: int, count: int, size: int) -> list[Task]:
        tasks = []
        for base in range(count):
            rng = task_rng(seed, name, "base", base)
            content = content_for(rng, size)
            base_id = f"{name}-{base:04d}"
            for transform in transforms:
                corruptions = [] if transform in ("identity", "clean") else [sample_corruption(transform, rng)]
                draft = Draft(content, corruptions, transform, needs_crop=False)
                tasks.append(build_task(family, draft, f"{base_id}-{transform}", name,
                                        {"suite": name, "base_id": base_id, "transform": transform}))
        return tasks
    return build


def _family(family: str) -> Callable[[str, int, int, int], list[Task]]:
    def build(name: str, seed: int, count: int, size: int) -> list[Task]:
        return [build_task(family, FAMILIES[family].draft(task_rng(seed, name, "task", i), size), f"{name}-{i:04d}",
                           name, {"suite": name, "base_id": f"{name}-{i:04d}", "transform": "none"})
                for i in range(count)]
    return build


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("orientation-v1", "readable content at 0/90/180/270 degrees and both mirrors",
          _grouped("orientation", ("identity", *ORIENTATION_CORRUPTIONS), readable_content)),
    Suite("corruption-v1", "readable content clean and under five natural corruptions",
          _grouped("degraded", ("clean", *NATURAL_CORRUPTIONS),
                   lambda rng, size: CONTENT_KINDS["text_labels"].sample(rng, size, "medium"))),
    Suite("small_region-v1", "codes on tags under 1% of the image", _family("zoom")),
    Suite("multi_op-v1", "small tags in turned or mirrored images", _family("multi_op")),
    Suite("no_tool-v1", "clean upright content: a tool adds nothing", _family("no_tool")),
)}


def resolve_suite_name(name: str) -> str:
    """``orientation`` -> the latest version (``orientation-v1``); a versioned name is returned as is."""
    if name in SUITES:
        return name
    versions = sorted((s for s in SUITES if s.rsplit("-v", 1)[0] == name), key=lambda s: int(s.rsplit("-v", 1)[1]))
    if not versions:
        raise KeyError(f"unknown benchmark suite {name!r}; known: {', '.join(SUITES)}")
    return versions[-1]


def build_suite(name: str, seed: int, base_questions: int, image_size: int) -> list[Task]:
    """The tasks of suite ``name`` (a versioned name or a bare one meaning its latest version)."""
    suite = SUITES[resolve_suite_name(name)]
    return suite.build(suite.name, seed, base_questions, image_size)
