"""Run logging: metrics.jsonl, the dashboard's files, resume (rewind), the tool-use collapse alarm,
code highlighting, the report's Markdown, and wandb in offline mode read back from its own files.

The trajectories come from a short run of real pieces (tests/dashboard_testlib.py: the agent loop with
scripted turns, the real sandbox and reward); the browser checks of the same run's pages are in
tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
from dashboard_testlib import build_short_run
from PIL import Image

from cv_ray.config import LoggerConfig
from cv_ray.dashboard.highlight import highlight_python
from cv_ray.dashboard.markdown import markdown_to_html
from cv_ray.dashboard.samples import split_turn_text
from cv_ray.errors import ConfigError
from cv_ray.tracking import Tracker
from cv_ray.tracking.collapse import CALL_RATE, VALID_RATE, collapse, tool_use_rates


@pytest.fixture(scope="module")
def processor(tiny_qwen25):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_qwen25)


@pytest.fixture(scope="module")
def pool():
    from cv_ray.sandbox import SandboxPool
    from cv_ray.sandbox.config import SandboxConfig

    with SandboxPool(SandboxConfig(workers_per_executor=2, timeout_s=10.0)) as pool:
        yield pool


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, processor, pool):
    run = build_short_run(tmp_path_factory.mktemp("tracking") / "run", processor, pool)
    run.tracker.close()
    return run


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rl_metrics(call_rate: float, calls: float = 8.0, errors: float = 0.0) -> dict:
    return {"rollout/tool_calls_mean": call_rate, "rollout/tool_calls": calls, "rollout/tool_errors": errors}


# ------------------------------------------------------------------------------------ pure pieces


def test_collapse_compares_with_the_value_window_steps_back():
    """Hand-derived: 1.0 -> 0.4 over 2 steps is a 60% fall (> 50%); 1.0 -> 0.5 is exactly 50% (not more).

    Mutant: comparing with the previous step (0.9 -> 0.4 is 56%, so the second case would also be
    missed; the first would fire from step 1 instead of step 0)."""
    alarm = collapse("m", [0, 1, 2], [1.0, 0.9, 0.4], window=2, max_drop=0.5, min_rate=0.05)
    assert alarm is not None and (alarm.from_step, alarm.to_step) == (0, 2)
    assert alarm.drop == pytest.approx(0.6)
    assert "fell 60% in 2 steps" in alarm.message()
    assert collapse("m", [0, 1, 2], [1.0, 0.9, 0.5], window=2, max_drop=0.5, min_rate=0.05) is None
    # The previous step alone fell 0.9 -> 0.2 (78%), but 2 steps back it was 0.3: a 33% fall.
    assert collapse("m", [0, 1, 2], [0.3, 0.9, 0.2], window=2, max_drop=0.5, min_rate=0.05) is None
    assert collapse("m", [0, 1], [1.0, 0.0], window=2, max_drop=0.5, min_rate=0.05) is None  # too short to judge
    assert collapse("m", [0, 1, 2], [1.0, 0.5, 0.0], window=0, max_drop=0.5, min_rate=0.05) is None  # off
    assert collapse("m", [0, 1, 2], [0.04, 0.0, 0.0], window=2, max_drop=0.5, min_rate=0.05) is None  # never used
    # Logged steps need not be consecutive: the window counts logged values.
    assert collapse("m", [0, 5, 10], [2.0, 1.0, 0.5], window=2, max_drop=0.7, min_rate=0.05).to_step == 10


def test_tool_use_rates():
    """calls per trajectory = tool_calls_mean; valid share = (calls - errors) / calls = (12 - 3) / 12.

    Mutant: valid share computed as errors / calls."""
    assert tool_use_rates({"rollout/tool_calls_mean": 1.5, "rollout/tool_calls": 12.0, "rollout/tool_errors": 3.0}) == {
        CALL_RATE: 1.5, VALID_RATE: 0.75}
    assert tool_use_rates({"rollout/tool_calls_mean": 0.0, "rollout/tool_calls": 0.0, "rollout/tool_errors": 0.0}) == {
        CALL_RATE: 0.0}  # no calls: no valid share to speak of
    assert tool_use_rates({"sft/loss": 1.0}) == {}


@pytest.mark.parametrize("override,key", [
    ({"collapse_window": -1}, "logger.collapse_window"), ({"collapse_drop": 0.0}, "logger.collapse_drop"),
    ({"collapse_drop": 1.5}, "logger.collapse_drop"), ({"collapse_min_rate": -0.1}, "logger.collapse_min_rate"),
    ({"samples_per_step": -1}, "logger.samples_per_step"), ({"backends": ["tensorboard"]}, "logger.backends"),
])
def test_logger_config_names_the_bad_key(override, key):
    with pytest.raises(ConfigError) as err:
        LoggerConfig(**override).validate()
    assert err.value.key == key and "Fix:" in str(err.value)


def test_highlight_python():
    """Hand-written expected HTML. Mutants: keywords classed as names; text after a broken string dropped."""
    assert highlight_python("def f(x):\n    return x < 'a'  # ok") == (
        '<span class="k">def</span> <span class="f">f</span><span class="o">(</span><span class="n">x</span>'
        '<span class="o">)</span><span class="o">:</span>\n    <span class="k">return</span> <span class="n">x</span> '
        '<span class="o">&lt;</span> <span class="s">&#x27;a&#x27;</span>  <span class="c"># ok</span>')
    assert highlight_python("print(1.5)") == (
        '<span class="b">print</span><span class="o">(</span><span class="m">1.5</span><span class="o">)</span>')
    # An unterminated triple-quoted string: the tokenizer gives up; the rest is kept, escaped and marked.
    assert highlight_python('x = """<b>\nmore') == (
        '<span class="n">x</span> <span class="o">=</span><span class="x"> &quot;&quot;&quot;&lt;b&gt;\nmore</span>')


def test_markdown_of_the_report():
    """Mutant: the header row rendered as a body row (or the rule line kept as a row)."""
    text = "# Title\n\n| metric | a |\n|---|---|\n| n | 2 |\n\n## errors\n\n- runtime: 3\n- `x<y`: **1**\n"
    assert markdown_to_html(text) == (
        "<h1>Title</h1>\n<table><thead><tr><th>metric</th><th>a</th></tr></thead><tbody><tr><td>n</td><td>2</td></tr>"
        "</tbody></table>\n<h2>errors</h2>\n<ul><li>runtime: 3</li><li><code>x&lt;y</code>: <b>1</b></li></ul>")


def test_turn_text_segments_keep_every_character():
    text = "<think>turn it</think>\n<tool_call>\n{}\n</tool_call> then <answer>red</answer>"
    segments = split_turn_text(text)
    assert [s["kind"] for s in segments] == ["think", "text", "call", "text", "answer"]
    assert "".join(s["text"] for s in segments) == text


# --------------------------------------------------------------------------------- the short run


def test_samples_of_real_trajectories(short_run):
    """Task 2 is turned so that the fix is rotate_270 (a clockwise quarter turn). The `two_step` trajectory
    turns image 0 into image 1, then crops (0, 0, 56, 56) of image 1: the sandbox reports that box in
    image 1's frame. Turning a 112 px square clockwise brings its bottom-left quadrant to the top left,
    so on image 0 the crop is [0, 56, 56, 112] -- where the task's answer box is.

    Mutant: the crop box shown as reported (in the frame of the image the call ran on)."""
    two_step = short_run.samples[("rl", 1)][1]
    assert two_step.required_ops == ["rotate_270", "crop"] and two_step.answer_box == [0.0, 56.0, 56.0, 112.0]
    turn, crop_call = two_step.tool_calls
    assert (turn["image_index"], turn["output_index"], crop_call["image_index"], crop_call["output_index"]) == (0, 1, 1, 2)
    (crop,) = crop_call["ops"]
    assert crop["op"] == "crop" and crop["verified"] and crop["params"]["box"] == [0, 0, 56, 56]
    assert crop["box_on_origin"] == [0.0, 56.0, 56.0, 112.0]
    assert two_step.image_on_origin[2] == [0.0, 56.0, 56.0, 112.0]  # the output's frame, on image 0
    assert [[s["kind"] for s in t["segments"]] for t in two_step.turns] == [["call"], ["call"], ["answer"]]

    fix, crop_only, broken, blind = short_run.samples[("rl", 0)][:4]
    (call,) = fix.tool_calls  # one call on image 0: its crop is already in image 0's frame
    assert [op["op"] for op in call["ops"]] == ["rotate_180", "crop"] and all(op["verified"] for op in call["ops"])
    assert call["ops"][1]["box_on_origin"] == fix.answer_box == [56.0, 56.0, 112.0, 112.0]
    assert (call["image_index"], call["output_index"], fix.images[1].size) == (0, 1, (56, 56))
    assert broken.error_classes == ["malformed_json", "runtime"]
    assert [c["error_class"] for c in broken.tool_calls] == ["runtime", "malformed_json"]
    assert "undefined_name" in broken.tool_calls[0]["error"]
    assert blind.tool_calls == [] and blind.tokens["inserted"] < fix.tokens["inserted"]  # no tool response
    assert fix.tokens["sampled"] + fix.tokens["inserted"] == fix.tokens["response"]
    assert crop_only.correct is False and fix.correct is True


def test_jsonl_rows_and_dashboard_files(short_run):
    rows = _rows(short_run.run_dir / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in rows] == [("sft", i) for i in range(4)] + [("rl", i) for i in range(3)]
    assert rows[4][CALL_RATE] == 1.0 and rows[4][VALID_RATE] == 0.5  # 8 calls, 4 failed (2 runtime, 2 malformed)
    assert [r["alarm/" + CALL_RATE] for r in rows[4:]] == [0.0, 0.0, 1.0]
    dash = short_run.run_dir / "dashboard"
    run = json.loads((dash / "data" / "state.json").read_text())
    assert run["status"] == "finished"
    assert [(s["stage"], s["step"], s["n"]) for s in run["steps"]] == [
        ("rl", 0, 8), ("val", 1, 2), ("rl", 1, 8), ("val", 2, 2), ("rl", 2, 8)]
    assert [(a["metric"], a["step"], a["active"]) for a in run["alarms"]] == [(CALL_RATE, 2, True)]
    assert run["eval"] is not None and (dash / "data" / "eval.js").exists()
    step0 = (dash / "data" / "steps" / "rl" / "000000.js").read_text()
    assert step0.startswith("cvray.step(") and "undefined_name" in step0
    step0_images = json.loads(step0[len("cvray.step("):-3])["samples"][0]["images"]
    with Image.open(dash / step0_images[1]["src"]) as im:  # trajectory 0's tool output, at its size
        assert im.size == (56, 56)
    # Each image is written once per step: the 4 samples of a task share image 0.
    assert len(list((dash / "images" / "rl" / "000000").glob("*.t.jpg"))) == len(
        {im["src"] for s in json.loads(step0[len("cvray.step("):-3])["samples"] for im in s["images"]}) < sum(
        len(s.images) for s in short_run.samples[("rl", 0)])
    for name in ("index.html", "app.js", "style.css"):
        assert (dash / name).exists()


def test_nan_is_kept_visibly(tmp_path):
    tracker = Tracker(LoggerConfig(backends=["jsonl"]), tmp_path, run_name="t")
    tracker.log({"reward/total": 1.5, "flag": True, "bad": float("nan"), "text": "ignored"}, step=3, stage="rl")
    tracker.close()
    (row,) = _rows(tmp_path / "metrics.jsonl")
    assert row["reward/total"] == 1.5 and row["flag"] == 1.0 and row["bad"] == "nan" and "text" not in row
    assert '"bad":"nan"' in (tmp_path / "dashboard" / "data" / "metrics" / "0000.js").read_text()  # valid JavaScript


def test_alarm_warns_once_and_notes_recovery(tmp_path, caplog):
    """Rates 1, 1, 0.4, 0.3, 1: the alarm (window 2, drop 50%) holds at steps 2 and 3 and ends at step 4.

    Mutant: a warning at every step while the alarm holds."""
    tracker = Tracker(LoggerConfig(backends=["console", "jsonl"], collapse_window=2), tmp_path, run_name="t")
    with caplog.at_level(logging.INFO, logger="cv_ray"):
        for step, rate in enumerate([1.0, 1.0, 0.4, 0.3, 1.0]):
            tracker.log(_rl_metrics(rate), step=step, stage="rl")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tool_use/call_rate fell 60% in 2 steps" in warnings[0]
    assert [r["alarm/" + CALL_RATE] for r in tracker.rows] == [0.0, 0.0, 1.0, 1.0, 0.0]
    (event,) = tracker.alarm_events()
    assert (event["step"], event["from_step"], event["active"], event["until"]) == (2, 0, False, 4)
    tracker.close()


def test_resume_rewinds_the_redone_steps(tmp_path, caplog):
    """A run logs RL steps 0-3, is killed mid-write, and resumes from its checkpoint at step 2: after
    `rewind("rl", 2)` and the redone steps, every step is there once, in the JSONL file and the dashboard.

    Mutants: rewind keeps the dropped steps' trajectory files; rewind drops the other stages' rows too."""
    first = Tracker(LoggerConfig(backends=["jsonl"]), tmp_path, run_name="t")
    for step in range(3):
        first.log({"sft/loss": 1.0 + step}, step=step, stage="sft")
    for step in range(4):
        first.log({"reward/total": float(step)}, step=step, stage="rl")
        first.dashboard.add_samples([], step=step, stage="rl")
    first._jsonl.write('{"stage": "rl", "step": 4, "rew')  # killed in the middle of a row
    first._jsonl.close()  # the process died here: nothing else of it is written

    with caplog.at_level(logging.WARNING, logger="cv_ray"):
        second = Tracker(LoggerConfig(backends=["jsonl"]), tmp_path, run_name="t")
    assert "1 unreadable line(s)" in caplog.text and (tmp_path / "metrics.jsonl.broken").exists()
    assert second.rewind("rl", 2) == 2
    dash = tmp_path / "dashboard"
    assert sorted(p.name for p in (dash / "data" / "steps" / "rl").iterdir()) == ["000000.js", "000001.js"]
    assert sorted(p.name for p in (dash / "images" / "rl").iterdir()) == ["000000", "000001"]
    for step in (2, 3):
        second.log({"reward/total": 10.0 + step}, step=step, stage="rl")
        second.dashboard.add_samples([], step=step, stage="rl")
    second.close()
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["step"], r.get("reward/total", r.get("sft/loss"))) for r in rows] == [
        ("sft", 0, 1.0), ("sft", 1, 2.0), ("sft", 2, 3.0), ("rl", 0, 0.0), ("rl", 1, 1.0), ("rl", 2, 12.0), ("rl", 3, 13.0)]
    chunk = (dash / "data" / "metrics" / "0000.js").read_text().splitlines()
    assert [json.loads(line[len("cvray.row("):-2])["step"] for line in chunk] == [0, 1, 2, 0, 1, 2, 3]
    state = json.loads((dash / "data" / "state.json").read_text())
    assert [s["step"] for s in state["steps"]] == [0, 1, 2, 3]
    assert sorted(p.name for p in (dash / "data" / "steps" / "rl").iterdir()) == [f"00000{i}.js" for i in range(4)]


# ----------------------------------------------------------------------------------------- wandb


def read_wandb_records(run_dir: Path) -> list:
    """The records of an offline run's ``.wandb`` file, decoded with wandb's own protobuf classes.

    The file is wandb's transaction log: a 7-byte header (``:W&B``, magic, version), then LevelDB-log
    records in 32 KiB blocks, each ``crc32c, length, type`` (full / first / middle / last) + bytes."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, payloads, pending = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # the rest of a block too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(p) for p in payloads]


def test_wandb_offline_curves_table_and_alarm(short_run, tmp_path, monkeypatch):
    """The same curves (each stage on its own step axis), a Table per step with each turn's code, the
    image its call read and returned, the reward terms, and the collapse alarm as a wandb alert.

    Mutant: every stage logged on wandb's one global step (`log(..., step=step)`): the RL rows, whose
    steps restart at 0 after SFT's, are dropped by wandb and the rl history below is empty."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # staged artifact files, kept with the test
    monkeypatch.chdir(tmp_path)
    tracker = Tracker(LoggerConfig(backends=["wandb"], wandb_mode="offline", collapse_window=2), tmp_path,
                      run_name="offline-test", config={"reward": {"alpha": 1.0}})
    for step in range(3):
        tracker.log({"sft/loss": 2.0 - step}, step=step, stage="sft")
    for step, rate in enumerate([1.0, 1.0, 0.2]):
        tracker.log({**_rl_metrics(rate), "reward/total": rate}, step=step, stage="rl")
    samples = short_run.samples[("rl", 0)]
    tracker.log_samples(samples, step=0, stage="rl")
    tracker.close()
    # wandb's service writes the .wandb log buffered and may still hold part of it after finish()
    # (read too early it was header-only in 3 of 7 tries here; wandb issue #9525): stop the service.
    import wandb

    wandb.teardown()

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = read_wandb_records(run_dir)
    history = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in record.history.item:  # a logged object (the table) comes as nested keys
                keys = list(item.nested_key) or [item.key]
                target = row
                for key in keys[:-1]:
                    target = target.setdefault(key, {})
                target[keys[-1]] = json.loads(item.value_json)
            history.append(row)
    rl = [(h["rl/step"], h["rl/reward/total"]) for h in history if "rl/reward/total" in h]
    sft = [(h["sft/step"], h["sft/sft/loss"]) for h in history if "sft/sft/loss" in h]
    assert rl == [(0, 1.0), (1, 1.0), (2, 0.2)] and sft == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert [h["rl/alarm/tool_use/call_rate"] for h in history if "rl/alarm/tool_use/call_rate" in h] == [0, 0, 1]
    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert len(alerts) == 1 and "tool_use/call_rate fell 80%" in alerts[0].text

    # A logged Table is a "run_table" artifact: its manifest names the staged files (the table, its images).
    (table_ref,) = [h["rl/samples"] for h in history if "rl/samples" in h]
    assert table_ref["_type"] == "table-file" and table_ref["nrows"] == sum(max(1, len(t["calls"])) for s in samples
                                                                          for t in s.turns)
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "run_table"
    staged = {entry.path: Path(entry.local_path) for entry in artifact.manifest.contents}
    table = json.loads(staged["rl/samples.table.json"].read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == table_ref["nrows"]
    fix_call = next(r for r in rows if r["uid"] == samples[0].uid and r["sample"] == 0 and r["code"])
    assert "transpose" in fix_call["code"] and fix_call["term/acc"] == samples[0].terms["acc"]
    assert fix_call["reward"] == samples[0].reward
    with Image.open(staged[fix_call["output_image"]["path"]]) as returned:
        assert returned.size == samples[0].images[1].size  # the 56 x 56 crop the call returned
    with Image.open(staged[fix_call["input_image"]["path"]]) as read:
        assert read.size == samples[0].images[0].size
    failed = [r for r in rows if r["error_class"]]
    assert {r["error_class"] for r in failed} == {"runtime", "malformed_json"}
