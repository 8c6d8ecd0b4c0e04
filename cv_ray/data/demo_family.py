"""The learning demo's task family: find the red corner after turning the image upright with code.

A small square image (112 px) has four quadrants coloured from a palette of four (a permutation,
so every colour appears once) and a black bar along its top edge, which marks "up". The image is
turned by 0, 90, 180 or 270 degrees; the question asks which corner *of the upright image* is red,
so the answer can be read off the picture only once it is upright, and a model that ignores the bar
is right 1 time in 4. Answers are corner names, ``top-left`` ... (``task_type`` ``general``: exact
text). ``required_ops`` is the rotation that undoes the turn
(``[]`` for an upright image), in the sandbox's op names.

SFT trajectories (:func:`generate_demo_example`) are short and always written the same way for the
same situation, so a tiny model can learn them in minutes on a CPU: one ``<think>`` naming where
the bar is, one tool call whose code is a single ``Image.transpose``, then the answer after reading
the tool's output. Every call runs in the real sandbox through the data package's
:class:`~cv_ray.data.trajectories.Recorder` (the rollout's conversation layout and tool text).

:func:`build_demo_dataset` writes the layout the driver's SFT and RL stages read
(``rl_train.parquet``, ``rl_val.parquet``, ``sft.jsonl``, ``manifest.json``). The family is not in
the default registry (``cv_ray.data.families.FAMILIES``): it is a teaching probe, not training data
for real models, and the registry's families are what every default dataset interleaves.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter
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
"""The quadrant colours (RGB values are the data package's PALETTE); TARGET is the one asked about."""
TARGET = "red"
TURNS = ("none", "rotate_90", "rotate_180", "rotate_270")
"""The corruption applied to the upright image (PIL's counter-clockwise names), uniformly drawn."""
CORNERS = ("top-left", "top-right", "bottom-right", "bottom-left")
"""The answers (chance is 1 in 4), in the order of ``corner_colours``."""
BAR = (20, 20, 20)
QUESTION = f"The image is upright when the black bar is at the top. Which corner of the upright image is {TARGET}?"

# Where the bar of the upright image ends up after each turn (PIL rotations are counter-clockwise,
# so a quarter turn moves the top edge to the left): the words of the SFT thinking.
_BAR_WHERE = {"none": "at the top", "rotate_90": "on the left", "rotate_180": "at the bottom",
              "rotate_270": "on the right"}
_TRANSPOSE = {"rotate_90": "ROTATE_90", "rotate_180": "ROTATE_180", "rotate_270": "ROTATE_270"}


def render_upright(corner_colours: list[str], size: int) -> tuple[Image.Image, list[float]]:
    """The upright image and the box of the :data:`TARGET` quadrant (clean frame).

    ``corner_colours`` in :data:`CORNERS` order, each filling its quadrant; the bar is a black strip
    ``size // 8`` high along the whole top edge. At 112 px each quadrant is 2 x 2 vision tokens of
    Qwen2.5-VL (28 px each after the 2x2 merge) and the bar lies in the four tokens of one edge.
    """
    if len(corner_colours) != 4:
        raise ValueError(f"four corner colours needed, got {corner_colours}")
    half = size // 2
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    origins = [(0, 0), (half, 0), (half, half), (0, half)]
    for (x, y), colour in zip(origins, corner_colours):
        draw.rectangle([x, y, x + half - 1, y + half - 1], fill=PALETTE[colour])
    draw.rectangle([0, 0, size - 1, size // 8 - 1], fill=BAR)
    x, y = origins[corner_colours.index(TARGET)]
    return image, [float(x), float(y), float(x + half), float(y + half)]


def task_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Task ``index`` of ``split``: independent of every other task (as the registry's families)."""
    return np.random.default_rng([seed, zlib.crc32(FAMILY.encode()), zlib.crc32(split.encode()), index])


def generate_demo_task(seed: int, index: int, size: int = 112, split: str = "train") -> Task:
    """Task ``index`` of ``split``; the same arguments always give the same task."""
    rng = task_rng(seed, split, index)
    corner_colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))]
    turn = TURNS[int(rng.integers(len(TURNS)))]
    corruptions = [] if turn == "none" else [{"name": turn, "params": {}}]
    upright, clean_box = render_upright(corner_colours, size)
    image, box = apply_corruptions(upright, clean_box, corruptions)
    return Task(
        uid=f"{FAMILY}-{split}-s{seed}-{index:06d}", data_source=f"synthetic/{FAMILY}", question=QUESTION,
        images=[image], answer=CORNERS[corner_colours.index(TARGET)], required_ops=fix_ops(corruptions), answer_box=box,
        task_type="general", split=split,
        extra={"family": FAMILY, "variant": turn, "transform": turn, "corner_colours": corner_colours, "corruptions": corruptions,
               "clean_box": clean_box, "seed": seed, "index": index},
    )


def generate_demo_example(task: Task, sandbox: Sandbox) -> SFTExample:
    """The one correct trajectory of ``task``, its tool call executed in ``sandbox``.

    Upright: answer at once. Turned: one call that undoes the turn, then the answer read from the
    tool's output. Raises TrajectoryError when the sandbox does not trace the planned rotation.
    """
    turn = task.extra["variant"]
    corner = task.answer
    recorder = Recorder(task, sandbox)
    if not task.required_ops:
        recorder.answer(f"The bar is at the top. {TARGET.capitalize()} is at the {corner}.")
        return SFTExample(uid=f"sft-{task.uid}", messages=recorder.messages, images=recorder.images,
                          kind="no_tool", task_uid=task.uid)
    (fix,) = task.required_ops
    result = recorder.call(f"The bar is {_BAR_WHERE[turn]}.", f"result = image.transpose(Image.Transpose.{_TRANSPOSE[fix]})",
                           recorder.current, "")
    traced = [op["op"] for op in result.ops]
    if not result.ok or traced != [fix]:
        raise TrajectoryError(f"task {task.uid}: planned {fix}, the sandbox gave ok={result.ok} ops={traced} "
                              f"({result.error_class}: {result.error})")
    recorder.answer(f"{TARGET.capitalize()} is at the {corner}.")
    return SFTExample(uid=f"sft-{task.uid}", messages=recorder.messages, images=recorder.images,
                      kind="single_tool", task_uid=task.uid)


def build_demo_dataset(out_dir: str | Path, sandbox: Sandbox, seed: int, num_train: int, num_val: int,
                       num_sft: int, size: int = 112) -> dict[str, Any]:
    """Write RL train/val tasks, SFT trajectories and ``manifest.json`` under ``out_dir``; return the manifest.

    Splits are independent streams (``train``, ``val``, ``sft``), so held-out tasks never appear in
    training and more SFT examples never change the RL tasks.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    n_train = write_tasks((generate_demo_task(seed, i, size, "train") for i in range(num_train)),
                          out / "rl_train.parquet")
    n_val = write_tasks((generate_demo_task(seed, i, size, "val") for i in range(num_val)), out / "rl_val.parquet")
    kinds: Counter[str] = Counter()

    def examples():
        for i in range(num_sft):
            example = generate_demo_example(generate_demo_task(seed, i, size, "sft"), sandbox)
            kinds[example.kind] += 1
            yield example

    n_sft = write_sft(examples(), out / "sft.jsonl")
    manifest = {"format": "cv_ray-data/1", "family": FAMILY, "seed": seed, "image_size": size,
                "counts": {"rl_train": n_train, "rl_val": n_val, "sft": n_sft}, "sft": {"kinds": dict(kinds)},
                "seconds": round(time.perf_counter() - start, 2)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
