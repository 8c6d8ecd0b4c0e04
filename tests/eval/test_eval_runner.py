"""The eval runner on the tiny model: a small suite through real rollout workers and sandbox executors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from PIL import Image

from cv_ray.actor_group import live_actors
from cv_ray.config import Config
from cv_ray.eval.runner import evaluate

pytestmark = pytest.mark.slow

DOCUMENTED_KEYS = {
    "n", "accuracy", "accuracy_by_suite", "accuracy_by_transform", "consistency", "tool_use_rate",
    "tool_use_rate_by_transform", "tool_calls_per_sample", "tool_error_rate", "tool_errors_by_class", "mean_turns",
    "op_precision", "op_recall", "crop_iou_mean", "crop_rate_when_required",
}


def test_tiny_model_report(tiny_qwen25, ray_local, tmp_path):
    cfg = Config()
    cfg.data = replace(cfg.data, suite_size=1, image_size=112, seed=3)
    cfg.rollout = replace(cfg.rollout, max_turns=2, max_new_tokens_per_turn=16, n_samples=1)
    cfg.sandbox = replace(cfg.sandbox, num_executors=1)
    cfg.eval = replace(cfg.eval, suites=["orientation"])
    before = {a["actor_id"] for a in live_actors()}
    summaries, paths = evaluate(tiny_qwen25, cfg, tmp_path / "data", tmp_path / "eval")
    # The evaluator ends every actor it started (mutant: it leaves its reward workers running).
    assert {a["actor_id"] for a in live_actors()} == before

    assert set(summaries) == {"with_tools", "without_tools"}
    metrics = json.loads(paths["metrics"].read_text())
    for mode in ("with_tools", "without_tools"):
        assert DOCUMENTED_KEYS <= set(metrics[mode])
        # One base question at six orientations (identity, three turns, two flips).
        assert metrics[mode]["n"] == 6
        assert len(metrics[mode]["accuracy_by_transform"]) == 6
        assert 0.0 <= metrics[mode]["accuracy"] <= 1.0
    assert metrics["without_tools"]["tool_calls_per_sample"] == 0.0  # no tool schema, no code executed
    assert "| accuracy |" in paths["report"].read_text()
    for key in ("accuracy_plot", "tool_use_plot"):
        with Image.open(paths[key]) as im:
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 2
