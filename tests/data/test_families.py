"""Task families and suites: deterministic by seed, and every stored answer derivable from clean content."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cv_ray.data.content import PALETTE, Chart, render_content
from cv_ray.data.corruptions import apply_corruptions, get_corruption
from cv_ray.data.families import FAMILIES, generate_task, generate_tasks
from cv_ray.data.records import png_bytes
from cv_ray.data.suites import SUITES, build_suite, resolve_suite_name
from cv_ray.types import ORIENTATION_OPS

SIZE = 224


def _pixels(image):
    return np.asarray(image.convert("RGB"))


def test_same_seed_same_task_and_adding_tasks_changes_nothing_before():
    for family in FAMILIES:
        a, b = generate_task(family, 7, 3, SIZE), generate_task(family, 7, 3, SIZE)
        assert png_bytes(a.images[0]) == png_bytes(b.images[0])
        assert (a.question, a.answer, a.required_ops, a.answer_box, a.extra) == \
               (b.question, b.answer, b.required_ops, b.answer_box, b.extra)
    few = list(generate_tasks(list(FAMILIES), 5, 1, SIZE))
    more = list(generate_tasks(list(FAMILIES), 10, 1, SIZE))
    assert [t.uid for t in few] == [t.uid for t in more[:5]]
    assert all(png_bytes(x.images[0]) == png_bytes(y.images[0]) for x, y in zip(few, more))


def test_different_seeds_and_splits_differ():
    base = generate_task("orientation", 0, 0, SIZE)
    assert png_bytes(generate_task("orientation", 1, 0, SIZE).images[0]) != png_bytes(base.images[0])
    assert png_bytes(generate_task("orientation", 0, 0, SIZE, "val").images[0]) != png_bytes(base.images[0])


def _tasks_of_every_kind():
    tasks = [generate_task(family, 0, i, SIZE) for family in FAMILIES for i in range(8)]
    for name in SUITES:
        tasks.extend(build_suite(name, 0, 2, SIZE))
    return tasks


@pytest.fixture(scope="module")
def every_task():
    return _tasks_of_every_kind()


def test_answer_image_and_box_rederive_from_recorded_parameters(every_task):
    for task in every_task:
        scene = render_content(task.extra["content"])
        assert scene.answer == task.answer, task.uid
        assert scene.question == task.question
        assert scene.box == task.extra["clean_box"]
        image, box = apply_corruptions(scene.image, scene.box, task.extra["corruptions"])
        assert np.array_equal(_pixels(image), _pixels(task.images[0])), task.uid
        assert box == task.answer_box
        assert 0 <= box[0] < box[2] <= task.images[0].width and 0 <= box[1] < box[3] <= task.images[0].height


def test_applying_the_orientation_fixes_gives_back_the_clean_image(every_task):
    for task in every_task:
        geometric = [op for op in task.required_ops if op in ORIENTATION_OPS]
        natural = [op for op in task.required_ops if op not in ORIENTATION_OPS and op != "crop"]
        if natural:
            continue
        fixed, box = apply_corruptions(task.images[0], task.answer_box,
                                       [{"name": op, "params": {}} for op in geometric])
        clean = render_content(task.extra["content"])
        assert np.array_equal(_pixels(fixed), _pixels(clean.image)), task.uid
        assert np.allclose(box, clean.box)


def test_required_ops_per_family(every_task):
    for task in every_task:
        family, ops = task.extra["family"], task.required_ops
        fixes = [op for record in reversed(task.extra["corruptions"]) for op in get_corruption(record["name"]).fix_ops]
        if family in ("zoom", "multi_op"):
            assert ops == fixes + ["crop"]
        else:
            assert ops == fixes
        if family == "orientation" and "suite" not in task.extra:
            assert len(ops) == 1 and ops[0] in ORIENTATION_OPS
        if family == "no_tool":
            assert ops == []
        if family == "degraded" and "suite" not in task.extra:
            assert ops[0] in ("contrast_up", "brightness_up", "sharpen")


def test_small_regions_are_small(every_task):
    for task in every_task:
        if "crop" not in task.required_ops:
            continue
        x1, y1, x2, y2 = task.answer_box
        fraction = (x2 - x1) * (y2 - y1) / (task.images[0].width * task.images[0].height)
        limit = 0.0025 if task.extra["variant"] == "coarse_to_fine" else 0.01
        assert fraction <= limit, (task.uid, fraction)


def test_shape_counts_match_connected_components(every_task):
    shapes = [t for t in every_task if t.extra["content"]["kind"] == "shapes"]
    shapes += [generate_task("no_tool", 5, i, SIZE) for i in range(40)]
    shapes = [t for t in shapes if t.extra["content"]["kind"] == "shapes"]
    assert shapes, "no shape-counting task was generated"
    fill_ratio = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    for task in shapes:
        params = task.extra["content"]
        pixels = _pixels(render_content(params).image)
        mask = np.all(pixels == PALETTE[params["target_color"]], axis=-1)
        labels, _ = ndimage.label(mask)
        found = 0
        for k, region in enumerate(ndimage.find_objects(labels), start=1):
            area = (region[0].stop - region[0].start) * (region[1].stop - region[1].start)
            ratio = (labels[region] == k).sum() / area
            nearest = min(fill_ratio, key=lambda s: abs(fill_ratio[s] - ratio))
            found += nearest == params["target_shape"]
        assert str(found) == task.answer, task.uid


def test_bar_heights_are_proportional_to_the_answered_values():
    charts = [generate_task("orientation", 2, i, SIZE) for i in range(60)]
    bars = [t.extra["content"] for t in charts if t.extra["content"]["kind"] == "chart"
            and t.extra["content"]["style"] == "bar"]
    assert bars
    for params in bars:
        pixels = _pixels(render_content(params).image)
        centres, _, _, per_unit = Chart.layout(params)
        column_heights = [int(np.all(pixels[:, round(c)] == PALETTE[params["color"]], axis=-1).sum()) for c in centres]
        measured = [h / per_unit for h in column_heights]
        assert np.allclose(measured, params["values"], atol=1.0 / per_unit + 0.6), (measured, params["values"])


def test_text_box_holds_the_plate_of_the_named_colour(every_task):
    for task in every_task:
        params = task.extra["content"]
        if params["kind"] not in ("text_labels", "small_label"):
            continue
        target = params["labels"][params["target"]]
        pixels = _pixels(render_content(params).image)
        x1, y1, x2, y2 = (int(v) for v in task.extra["clean_box"])
        plate = np.all(pixels[y1:y2, x1:x2] == PALETTE[target["plate"]], axis=-1).mean()
        assert plate > 0.3, (task.uid, plate)
        if len(params["labels"]) > 1:
            assert target["plate"] in task.question


def test_orientation_suite_groups_six_variants_per_base_question():
    tasks = build_suite("orientation", 4, 3, SIZE)
    assert resolve_suite_name("orientation") == "orientation-v1"
    assert len(tasks) == 18
    by_base: dict[str, list] = {}
    for task in tasks:
        by_base.setdefault(task.extra["base_id"], []).append(task)
        assert task.split == "orientation-v1"
    for variants in by_base.values():
        assert {t.extra["transform"] for t in variants} == {"identity", "rotate_90", "rotate_180", "rotate_270",
                                                             "flip_horizontal", "flip_vertical"}
        assert len({t.answer for t in variants}) == 1
        assert next(t for t in variants if t.extra["transform"] == "identity").required_ops == []
    again = build_suite("orientation-v1", 4, 3, SIZE)
    assert all(png_bytes(a.images[0]) == png_bytes(b.images[0]) for a, b in zip(tasks, again))


def test_unknown_names_are_refused():
    with pytest.raises(KeyError, match="spiral"):
        generate_task("spiral", 0, 0, SIZE)
    with pytest.raises(KeyError, match="spiral"):
        resolve_suite_name("spiral")
