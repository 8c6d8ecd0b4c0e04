"""The tiny-model builder never replaces what it did not build, nor reuses a model of other sizes."""

from __future__ import annotations

import json

import pytest

from cv_ray.models.tiny import TINY_SPECS, build_tiny_model, ensure_tiny_model


def test_a_real_checkpoint_is_never_replaced(tmp_path):
    """Mutant: the builder replaces any existing directory (it would delete a user's checkpoint when
    model.build_tiny is left set with model.path pointing at it)."""
    checkpoint = tmp_path / "Qwen2.5-VL-7B"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tiny model directory"):
        build_tiny_model("qwen2_5_vl", checkpoint)
    assert (checkpoint / "config.json").read_text() == "{}"


def test_a_tiny_model_of_other_sizes_is_not_reused_silently(tmp_path):
    built = tmp_path / "tiny"
    built.mkdir()
    marker = {"family": "qwen2_5_vl", "seed": 0, "spec": vars(TINY_SPECS["tiny"])}
    (built / "cv_ray_tiny.json").write_text(json.dumps(marker))
    assert ensure_tiny_model("qwen2_5_vl", built, spec=TINY_SPECS["tiny"]) == built  # the same: reused
    with pytest.raises(ValueError, match="remove that directory"):
        ensure_tiny_model("qwen2_5_vl", built, spec=TINY_SPECS["demo"])
