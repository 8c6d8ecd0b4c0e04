"""The learning demo's task family: the colour of the top-left corner, read after turning the image upright.

A small square image (112 px) has four quadrants coloured from a palette of four (a permutation,
so every colour appears once) and is shaded in stripes, each dark in its top half, which marks
"up". The image is turned by 0, 90, 180 or 270 degrees; the question asks for the colour of the
top-left corner *of the upright image*, so a model that ignores the shading is right 1 time in 4.
Answers are colour names (``task_type`` ``general``: exact text). ``required_ops`` are the rotation
that undoes the turn (none for an upright image) and a crop of the top-left quadrant
(``answer_box``, in the task image's frame).

Why a crop: the tool's output is then a single quadrant, and naming its colour is a global
property of a small picture, which a tiny model learns in minutes. Finding *where* a colour sits
among a picture's vision tokens needs absolute positions the tiny model has not learned (measured:
held-out accuracy stayed at chance when the answer was a corner name read off the whole image).
What remains hard, and is what SFT and RL have to teach, is seeing which way the shading points and
choosing the rotation that puts its dark side on top.

SFT trajectories (:func:`generate_demo_example`) are short and always written the same way for the
same situation: one ``<think>`` naming where the dark sides are, one tool call
(``image.transpose(...).crop(...)``, or only the crop when upright), then the answer. Every call runs
in the real sandbox through the data package's :class:`~cv_ray.data.trajectories.Recorder` (the
rollout's conversation layout and tool text).

:func:`build_demo_dataset` writes the layout the driver's SFT and RL stages read
(``rl_train.parquet``, ``rl_val.parquet``, ``sft.jsonl``, ``manifest.json``). The family is not in
the default registry (``cv_ray.data.families.FAMILIES``): it is a teaching probe, not training data
for real models, and the registry's families are what every default dataset interleaves.
"""

from __future__ import annotations

import itertools
import json
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cv_ray.data.content import PALETTE
from cv_ray.data.corruptions import apply_corruptions, fix_ops
from cv_ray.data.records import write_sft, write_tasks
from cv_ray.data.trajectories import Recorder, Sandbox, TrajectoryError
from cv_ray.types import SFTExample, Task

FAMILY = "corner_orientation"
COLOURS = ("red", "green", "blue", "yellow")
"""The quadrant colours (RGB values are the data package's PALETTE), and the answers (chance 1 in 4)."""
TURNS = ("none", "rotate_90", "rotate_180", "rotate_270")
"""The corruption applied to the upright image (PIL's counter-clockwise names), uniformly drawn."""
STRIPE = 14
"""Stripe height in pixels: one vision patch of Qwen2.5-VL / Qwen3-VL's tower (14 px), so each patch
holds one dark half and one bright half and shows by itself which way is up."""
SHADE = 0.35
"""Brightness of the dark half of a stripe (the bright half keeps the quadrant's palette colour)."""
QUESTION = ("The image is upright when its stripes are dark on top. "
            "What colour is the top-left corner of the upright image?")

# Where the dark sides of the upright image's stripes end up after each turn (PIL rotations are
# counter-clockwise, so a quarter turn moves the top edge to the left): the words of the SFT thinking.
_DARK_WHERE = {"none": "at the top", "rotate_90": "on the left", "rotate_180": "at the bottom",
              "rotate_270": "on the right"}
_TRANSPOSE = {"rotate_90": "ROTATE_90", "rotate_180": "ROTATE_180", "rotate_270": "ROTATE_270"}


def render_upright(quadrant_colours: list[str], size: int) -> tuple[Image.Image, list[float]]:
    """The upright image and the box of its top-left quadrant (the answer's region).

    ``quadrant_colours`` fill the top-left, top-right, bottom-right and bottom-left quadrants; every
    :data:`STRIPE`-high band of rows is darkened (x :data:`SHADE`) in its top half.

    Why stripes rather than one bar along the top edge: the side of a bar can be told only from
    the absolute position of its vision tokens, which the tiny model did not learn in a CPU budget
    (measured: after SFT it told a horizontal bar from a vertical one but never top from bottom or
    left from right). Patch-aligned stripes put the cue inside every patch (dark above, below, left
    or right), a linear feature of the patch embedding, and every token repeats it.
    """
    if len(quadrant_colours) != 4:
        raise ValueError(f"four quadrant colours needed, got {quadrant_colours}")
    if size % (2 * STRIPE):
        raise ValueError(f"image size {size} must be a multiple of {2 * STRIPE} (quadrants of whole stripes)")
    half = size // 2
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for (x, y), colour in zip([(0, 0), (half, 0), (half, half), (0, half)], quadrant_colours):
        draw.rectangle([x, y, x + half - 1, y + half - 1], fill=PALETTE[colour])
    pixels = np.asarray(image, dtype=np.float32)
    dark_rows = np.arange(size) % STRIPE < STRIPE // 2
    pixels[dark_rows] *= SHADE
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB"), [0.0, 0.0, float(half), float(half)]


def task_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Task ``index`` of ``split``: independent of every other task (as the registry's families)."""
    return np.random.default_rng([seed, zlib.crc32(FAMILY.encode()), zlib.crc32(split.encode()), index])


def generate_demo_task(seed: int, index: int, size: int = 112, split: str = "train") -> Task:
    """Task ``index`` of ``split``; the same arguments always give the same task."""
    rng = task_rng(seed, split, index)
    quadrant_colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))]
    turn = TURNS[int(rng.integers(len(TURNS)))]
    corruptions = [] if turn == "none" else [{"name": turn, "params": {}}]
    upright, clean_box = render_upright(quadrant_colours, size)
    image, box = apply_corruptions(upright, clean_box, corruptions)
    return Task(
        uid=f"{FAMILY}-{split}-s{seed}-{index:06d}", data_source=f"synthetic/{FAMILY}", question=QUESTION,
        images=[image], answer=quadrant_colours[0], required_ops=[*fix_ops(corruptions), "crop"], answer_box=box,
        task_type="general", split=split,
        extra={"family": FAMILY, "variant": turn, "transform": turn, "quadrant_colours": quadrant_colours,
               "corruptions": corruptions, "clean_box": clean_box, "seed": seed, "index": index},
    )


def of_variants(tasks: Iterable[Task], variants: tuple[str, ...] | list[str], max_skipped: int = 100_000
                ) -> Iterator[Task]:
    """The tasks whose ``extra["variant"]`` is one of ``variants`` (all of them when empty).

    Raises ValueError after ``max_skipped`` tasks in a row of other variants (an unknown variant name).
    """
    if not variants:
        yield from tasks
        return
    skipped = 0
    for task in tasks:
        if task.extra.get("variant") in variants:
            skipped = 0
            yield task
        else:
            skipped += 1
            if skipped > max_skipped:
                raise ValueError(f"no task of the variants {list(variants)} in {max_skipped} generated "
                                 f"(seen e.g. {task.extra.get('variant')!r}): check data.rl_variants")


def generate_demo_example(task: Task, sandbox: Sandbox, system_prompt: str) -> SFTExample:
    """The one correct trajectory of ``task``, its tool call executed in ``sandbox``, under ``system_prompt``
    (the rollout's ``rollout.system_prompt``, so SFT teaches the prompt RL samples under).

    One call that undoes the turn (if any) and crops the upright top-left quadrant, then the answer
    read from the tool's output. Raises TrajectoryError when the sandbox does not trace the planned ops.
    """
    turn = task.extra["variant"]
    fix = [op for op in task.required_ops if op != "crop"]
    half = task.images[0].width // 2
    recorder = Recorder(task, sandbox, system_prompt=system_prompt)
    crop = f".crop((0, 0, {half}, {half}))"
    code = (f"result = image.transpose(Image.Transpose.{_TRANSPOSE[fix[0]]}){crop}" if fix
            else f"result = image{crop}")
    result = recorder.call(f"The dark sides are {_DARK_WHERE[turn]}.", code, recorder.current, "")
    traced = sorted(op["op"] for op in result.ops)
    if not result.ok or traced != sorted(task.required_ops):
        raise TrajectoryError(f"task {task.uid}: planned {task.required_ops}, the sandbox gave ok={result.ok} "
                              f"ops={traced} ({result.error_class}: {result.error})")
    recorder.answer("The crop shows the corner.")
    return SFTExample(uid=f"sft-{task.uid}", messages=recorder.messages, images=recorder.images,
                      kind="single_tool", task_uid=task.uid)


def build_demo_dataset(out_dir: str | Path, sandbox: Sandbox, seed: int, num_train: int, num_val: int,
                       num_sft: int, system_prompt: str, size: int = 112,
                       rl_variants: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write RL train/val tasks, SFT trajectories and ``manifest.json`` under ``out_dir``; return the manifest.

    Splits are independent streams (``train``, ``val``, ``sft``), so held-out tasks never appear in
    training and more SFT examples never change the RL tasks. ``rl_variants`` keeps only RL tasks
    (training and validation) of those turns (e.g. ``("none",)``: upright images; empty: all).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    written = {}
    for split, count in (("train", num_train), ("val", num_val)):
        tasks = of_variants((generate_demo_task(seed, i, size, split) for i in itertools.count()), rl_variants)
        written[split] = write_tasks(itertools.islice(tasks, count), out / f"rl_{split}.parquet")
    n_train, n_val = written["train"], written["val"]
    kinds: Counter[str] = Counter()

    def examples():
        for i in range(num_sft):
            example = generate_demo_example(generate_demo_task(seed, i, size, "sft"), sandbox, system_prompt)
            kinds[example.kind] += 1
            yield example

    n_sft = write_sft(examples(), out / "sft.jsonl")
    manifest = {"format": "cv_ray-data/1", "family": FAMILY, "seed": seed, "image_size": size,
                "counts": {"rl_train": n_train, "rl_val": n_val, "sft": n_sft}, "sft": {"kinds": dict(kinds)},
                "seconds": round(time.perf_counter() - start, 2)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
