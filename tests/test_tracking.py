"""Run logging: JSONL metrics, the static HTML viewer, and wandb in offline mode."""

from __future__ import annotations

import json

from PIL import Image

from cv_ray.config import LoggerConfig
from cv_ray.tracking import Tracker
from cv_ray.viewer import ViewerSample


def _sample(i: int) -> ViewerSample:
    images = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (48, 64), (30, 30, 200))]
    calls = [{"turn": 0, "code": "result = image.rotate(90, expand=True)", "image_index": 0, "ok": True,
              "error": "", "output_index": 1, "ops": ["rotate_90"]}]
    return ViewerSample(uid=f"task{i}#0", question="What is written?", answer="cat", response_text="<answer>cat</answer>",
                        reward=1.5, terms={"acc": 1.0, "fmt": 1.0}, images=images, tool_calls=calls)


def test_jsonl_and_viewer(tmp_path):
    tracker = Tracker(LoggerConfig(backends=["console", "jsonl"]), tmp_path, run_name="t")
    tracker.log({"reward/total": 1.5, "flag": True, "bad": float("nan"), "text": "ignored"}, step=3, stage="rl")
    page = tracker.log_samples([_sample(0), _sample(1)], step=3)
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["stage"] == "rl" and rows[0]["step"] == 3
    assert rows[0]["reward/total"] == 1.5 and rows[0]["flag"] == 1.0
    assert rows[0]["bad"] == "nan"  # kept visibly, not dropped
    assert "text" not in rows[0]
    html = page.read_text()
    assert "task1#0" in html and "rotate_90" in html and "reward 1.500" in html
    assert (tmp_path / "viewer" / "images" / "rl-3-0-1.jpg").exists()
    assert "rl step 3" in (tmp_path / "viewer" / "index.html").read_text()


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(LoggerConfig(backends=["wandb"], wandb_mode="offline"), tmp_path, run_name="offline-test",
                      config={"reward": {"alpha": 1.0}})
    tracker.log({"reward/total": 0.25}, step=1, stage="rl")
    tracker.log_samples([_sample(0)], step=1)
    tracker.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())
