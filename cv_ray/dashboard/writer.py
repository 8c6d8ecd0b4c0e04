"""Writes a run's dashboard: static pages plus data files that grow with the run.

Layout under ``<run>/dashboard/`` (everything loads through ``<script>`` tags, because Chrome refuses
``fetch()`` of local files from a ``file://`` page):

    index.html, app.js, style.css        copied from the package (cv_ray/dashboard/static/)
    data/run.js                          cvray.run({...}): status, the logged steps, alarms, files
    data/metrics/NNNN.js                 cvray.row({...}); one metric row a line, CHUNK_ROWS a file
    data/steps/<stage>/<step>.js         cvray.step({...}): that step's trajectories in full
    data/eval.js                         cvray.evalReport({...}): the evaluation report, if any
    images/<stage>/<step>/<hash>.jpg     the step's images, at most SCREEN_SIDE px (+ .t.jpg thumbnails),
                                         each written once (a GRPO group's samples share the task image)

So a 500-step run stays light: a step's trajectories are loaded only when its page is opened, the
index (``run.js``) holds one short line per logged step, metric rows are appended to the last chunk
only, and images are files sized for the screen.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from cv_ray.dashboard.highlight import highlight_python
from cv_ray.dashboard.markdown import markdown_to_html
from cv_ray.dashboard.samples import RolloutSample

STATIC_FILES = ("index.html", "app.js", "style.css")
CHUNK_ROWS = 200
"""Metric rows per data file: finished chunks never change, the page re-reads only the last one."""
SCREEN_SIDE = 512
"""Longest side of an image file (pixels): the pages show images at most 480 px wide; smaller ones keep their size."""
THUMB_SIDE = 120
RUN_FILES = ("metrics.jsonl", "config.resolved.yaml", "summary.json")
"""Files of the run directory linked from the dashboard when they exist."""


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become strings (``"nan"``), so a data file is always valid JavaScript."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _js_call(function: str, payload: Any) -> str:
    return f"cvray.{function}({json.dumps(_plain(payload), allow_nan=False, separators=(',', ':'))});\n"


def _save_image(image: Image.Image, folder: Path, saved: set[str]) -> str:
    """Write ``image`` at screen size and as a thumbnail, once per folder (the samples of a GRPO group
    share their task image); returns the file name without extension, named by the content."""
    digest = hashlib.blake2b(f"{image.mode} {image.size}".encode(), digest_size=8)
    digest.update(image.tobytes())
    name = digest.hexdigest()
    if name not in saved:
        screen = image.convert("RGB")
        screen.thumbnail((SCREEN_SIDE, SCREEN_SIDE))
        screen.save(folder / f"{name}.jpg", quality=85)
        screen.thumbnail((THUMB_SIDE, THUMB_SIDE))
        screen.save(folder / f"{name}.t.jpg", quality=85)
        saved.add(name)
    return name


class Dashboard:
    """The dashboard of one run directory. Its state survives restarts (``data/state.json``)."""

    def __init__(self, root: Path, run_name: str, rows: list[dict[str, Any]] | None = None,
                 reward_weights: dict[str, float] | None = None):
        self.root = Path(root)
        self.data = self.root / "data"
        (self.data / "metrics").mkdir(parents=True, exist_ok=True)
        for name in STATIC_FILES:  # always the installed version's pages, also for an older run directory
            shutil.copyfile(str(resources.files("cv_ray.dashboard") / "static" / name), self.root / name)
        state_path = self.data / "state.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        self.state: dict[str, Any] = {
            "name": run_name, "started": state.get("started", time.time()), "status": "running",
            "steps": state.get("steps", []), "eval": state.get("eval"), "alarms": state.get("alarms", []),
            "epoch": state.get("epoch", 0) + 1, "reward_weights": reward_weights or state.get("reward_weights", {}),
        }
        self._rows = 0
        self._rewrite_metrics(rows or [])

    @property
    def index_path(self) -> Path:
        return self.root / "index.html"

    # ----------------------------------------------------------------------------------- metrics

    def _chunk_path(self, chunk: int) -> Path:
        return self.data / "metrics" / f"{chunk:04d}.js"

    def _rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        for old in (self.data / "metrics").glob("*.js"):
            old.unlink()
        self._rows = 0
        for row in rows:
            self._append_row(row)
        self._write_run()

    def _append_row(self, row: dict[str, Any]) -> None:
        with self._chunk_path(self._rows // CHUNK_ROWS).open("a") as f:
            f.write(_js_call("row", row))
        self._rows += 1

    def add_row(self, row: dict[str, Any]) -> None:
        """One metric row (``stage``, ``step``, ``time`` and the numbers), appended to the last chunk."""
        self._append_row(row)
        self._write_run()

    def set_alarms(self, alarms: list[dict[str, Any]]) -> None:
        if alarms != self.state["alarms"]:
            self.state["alarms"] = alarms
            self._write_run()

    # ----------------------------------------------------------------------------------- samples

    def add_samples(self, samples: list[RolloutSample], step: int, stage: str) -> Path:
        """Write a step's trajectories (images as files) and list the step in the index; returns its data file."""
        image_dir = self.root / "images" / stage / f"{step:06d}"
        if image_dir.exists():  # the same step logged again (a resumed run): its old images go
            shutil.rmtree(image_dir)
        image_dir.mkdir(parents=True)
        views, saved = [], set()
        for i, sample in enumerate(samples):
            names = [f"images/{stage}/{step:06d}/{_save_image(image, image_dir, saved)}" for image in sample.images]
            views.append(self._sample_view(i, sample, names))
        path = self.data / "steps" / stage / f"{step:06d}.js"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_js_call("step", {"stage": stage, "step": step, "samples": views}))
        entry = {"stage": stage, "step": step, "file": f"data/steps/{stage}/{step:06d}.js", "n": len(views),
                 **_step_summary(samples)}
        self.state["steps"] = [s for s in self.state["steps"] if (s["stage"], s["step"]) != (stage, step)] + [entry]
        self._write_run()
        return path

    @staticmethod
    def _sample_view(index: int, sample: RolloutSample, image_names: list[str]) -> dict[str, Any]:
        turns = [{**turn, "calls": [{**call, "code_html": highlight_python(call["code"])} for call in turn["calls"]]}
                 for turn in sample.turns]
        return {
            "index": index, "uid": sample.uid, "sample_index": sample.sample_index, "question": sample.question,
            "answer": sample.answer, "reward": sample.reward, "correct": sample.correct, "terms": sample.terms,
            "stats": sample.stats, "judge_failed": sample.judge_failed, "stop_reason": sample.stop_reason,
            "task_type": sample.task_type, "data_source": sample.data_source, "required_ops": sample.required_ops,
            "answer_box": sample.answer_box, "turns": turns, "num_turns": len(sample.turns),
            "num_calls": len(sample.tool_calls), "error_classes": sample.error_classes,
            "ops": [op["op"] for call in sample.tool_calls for op in call["ops"]],
            "images": [{"src": f"{name}.jpg", "thumb": f"{name}.t.jpg", "width": im.width, "height": im.height,
                        "parent": parent, "on_origin": frame}
                       for name, im, parent, frame in zip(image_names, sample.images, sample.image_parent,
                                                          sample.image_on_origin)],
            "tokens": sample.tokens, "metrics": sample.metrics,
        }

    # -------------------------------------------------------------------------------------- eval

    def set_eval_report(self, eval_dir: Path) -> None:
        """Show ``eval_dir``'s report (``report.md``, ``metrics.json``, ``*.png``) on the overview."""
        eval_dir = Path(eval_dir)
        report = eval_dir / "report.md"
        metrics = eval_dir / "metrics.json"
        rel = Path(os.path.relpath(eval_dir.resolve(), self.root.resolve())).as_posix()  # links work from file://
        payload = {
            "dir": rel,
            "report": f"{rel}/report.md" if report.exists() else None,
            "html": markdown_to_html(report.read_text()) if report.exists() else "",
            "metrics": json.loads(metrics.read_text()) if metrics.exists() else {},
            "plots": [f"{rel}/{p.name}" for p in sorted(eval_dir.glob("*.png"))],
        }
        (self.data / "eval.js").write_text(_js_call("evalReport", payload))
        self.state["eval"] = {"file": "data/eval.js", "updated": time.time()}
        self._write_run()

    # ------------------------------------------------------------------------------------ rewind

    def rewind(self, stage: str, step: int, rows: list[dict[str, Any]]) -> None:
        """Forget ``stage``'s steps from ``step`` on (their trajectories and images); ``rows``: the metrics kept."""
        kept = []
        for entry in self.state["steps"]:
            if entry["stage"] == stage and entry["step"] >= step:
                (self.root / entry["file"]).unlink(missing_ok=True)
                shutil.rmtree(self.root / "images" / stage / f"{entry['step']:06d}", ignore_errors=True)
            else:
                kept.append(entry)
        self.state["steps"] = kept
        self.state["epoch"] += 1  # an open page reloads everything
        self._rewrite_metrics(rows)

    def finish(self) -> None:
        self.state["status"] = "finished"
        self._write_run()

    # ------------------------------------------------------------------------------------ index

    def _write_run(self) -> None:
        self.state["updated"] = time.time()
        chunks = [{"file": f"data/metrics/{c:04d}.js", "rows": min(CHUNK_ROWS, self._rows - c * CHUNK_ROWS)}
                  for c in range(math.ceil(self._rows / CHUNK_ROWS))]
        files = {name: f"../{name}" for name in RUN_FILES if (self.root.parent / name).exists()}
        run = {**self.state, "metric_chunks": chunks, "rows": self._rows, "files": files}
        _atomic_write(self.data / "run.js", _js_call("run", run))
        _atomic_write(self.data / "state.json", json.dumps(_plain(self.state)))


def _atomic_write(path: Path, text: str) -> None:
    """A page polling the file never reads half of it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _step_summary(samples: list[RolloutSample]) -> dict[str, float]:
    """One short line of the index per logged step."""
    n = max(1, len(samples))
    return {"reward": round(sum(s.reward for s in samples) / n, 4),
            "correct": round(sum(s.correct for s in samples) / n, 4),
            "calls": round(sum(len(s.tool_calls) for s in samples) / n, 3),
            "errors": sum(1 for s in samples for c in s.tool_calls if c["error_class"])}
