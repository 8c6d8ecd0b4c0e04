"""The dashboard in a real browser: headless Chromium (Debian's package, installed by tools/setup_env.sh)
opens the dashboard of a short run from file://, with no server.

The run (tests/dashboard_testlib.py) is built from real pieces: the agent loop with scripted turns,
every tool call in the real sandbox, the real reward and rollout metrics, the real eval report, all
through the real Tracker; SFT and learner numbers are made up. Not covered here: the dashboard of a
run of the `cv-ray` driver itself (Ray actors, a learner), and browsers other than Chromium.
Checked: no console error, exception or failed load on any page; every curve draws the run's values
(read back from the DOM and compared with metrics.jsonl, and its path's geometry checked against
them); filters and sorting change the listed trajectories as they should; a trajectory page shows
the images its call read and returned, its crop on image 0 and its reward terms; an open page picks
up a new step, and a rewind. Screenshots are kept in <run>/browser_test/.
"""

from __future__ import annotations

import json
import re

import pytest
from dashboard_testlib import build_short_run

from cv_ray.dashboard.browser import Browser, find_chromium

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_qwen25):
    """The run stays open (status "running") until the module ends, so the page keeps refreshing."""
    from transformers import AutoProcessor

    from cv_ray.sandbox import SandboxPool
    from cv_ray.sandbox.config import SandboxConfig

    processor = AutoProcessor.from_pretrained(tiny_qwen25)
    with SandboxPool(SandboxConfig(workers_per_executor=2, timeout_s=10.0)) as pool:
        run = build_short_run(tmp_path_factory.mktemp("dashboard") / "run", processor, pool)
        yield run
        run.tracker.close()


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        pytest.fail("Chromium is missing: run `bash tools/setup_env.sh` as root (it installs Debian's chromium)")
    with Browser(width=1400, height=1000) as b:
        yield b


@pytest.fixture
def page(browser, short_run):
    """Opens a view of the short run's dashboard; after the test, nothing may have gone wrong on the page."""
    index = (short_run.run_dir / "dashboard" / "index.html").as_uri()
    browser.problems.clear()

    def open_view(fragment: str, view: str):
        browser.open(index + fragment)
        assert browser.wait_for(f"document.body.dataset.rendered === {json.dumps(view)} && document.body.dataset.rendered")
        return browser

    yield open_view
    assert browser.problems == []


def _rows(short_run) -> list[dict]:
    return [json.loads(line) for line in (short_run.run_dir / "metrics.jsonl").read_text().splitlines()]


def _shot(browser, short_run, name: str) -> None:
    browser.screenshot(short_run.run_dir / "browser_test" / f"{name}.png", full_page=True)


def _listed(browser) -> list[int]:
    return browser.evaluate("[...document.querySelectorAll('#trajectories tbody tr')].map(tr => +tr.dataset.index)")


def _set_filter(browser, name: str, value: str) -> None:
    """Change a filter as a user does (the control's change event); wait for the list to be drawn again."""
    browser.evaluate(f"""(() => {{ document.body.dataset.rendered = "";
        const el = document.querySelector('.filters [name={name}]');
        el.value = {json.dumps(value)}; el.dispatchEvent(new Event('change')); }})()""")
    browser.wait_for("document.body.dataset.rendered === 'step'")


def test_overview_curves_draw_the_runs_values(page, short_run):
    """Mutant: a chart that drops the last row of a series (or mixes stages): the points differ from the JSONL."""
    browser = page("#/", "overview")
    drawn = browser.evaluate("""[...document.querySelectorAll('path.series')].map(p => ({
        key: p.dataset.key, stage: p.dataset.stage, points: JSON.parse(p.dataset.points), d: p.getAttribute('d'),
        chart: p.closest('.chart').dataset.chart}))""")
    rows = _rows(short_run)
    charted = {(c["stage"], c["key"]) for c in drawn}
    for wanted in [("rl", "reward/total"), ("rl", "reward/acc"), ("rl", "reward/mandatory"), ("rl", "reward/correct"),
                   ("rl", "tool_use/call_rate"), ("rl", "tool_use/valid_call_rate"), ("rl", "rollout/tool_errors/runtime"),
                   ("rl", "rollout/response_tokens_mean"), ("rl", "learner/rl/kl"), ("rl", "learner/rl/entropy"),
                   ("rl", "time/update_s"), ("sft", "sft/loss"), ("rl", "eval/accuracy")]:
        assert wanted in charted, wanted
    for chart in drawn:
        expected = [[r["step"], r[chart["key"]]] for r in rows
                    if r["stage"] == chart["stage"] and isinstance(r.get(chart["key"]), (int, float))]
        assert chart["points"] == expected, (chart["chart"], chart["key"])  # JSON round trips doubles exactly
        # The path goes through the points: x grows with the step, y falls as the value grows, both linearly.
        xy = [tuple(map(float, m)) for m in re.findall(r"[ML]([-\d.]+) ([-\d.]+)", chart["d"])]
        assert len(xy) == len(expected)
        steps, values = [p[0] for p in expected], [p[1] for p in expected]
        for (x, y), step, value in zip(xy, steps, values):
            if max(steps) > min(steps):
                lo, hi = steps.index(min(steps)), steps.index(max(steps))
                assert x == pytest.approx(xy[lo][0] + (xy[hi][0] - xy[lo][0]) * (step - min(steps)) / (max(steps) - min(steps)), abs=0.05)
            if max(values) > min(values):
                lo, hi = values.index(min(values)), values.index(max(values))
                assert xy[hi][1] < xy[lo][1]
                assert y == pytest.approx(xy[lo][1] + (xy[hi][1] - xy[lo][1]) * (value - min(values)) / (max(values) - min(values)), abs=0.05)
    alarm = browser.evaluate("[...document.querySelectorAll('#alarms .alarm')].map(a => [a.dataset.metric, a.textContent])")
    assert len(alarm) == 1 and alarm[0][0] == "tool_use/call_rate" and "fell 75% in 2 steps" in alarm[0][1]
    assert browser.evaluate("document.querySelectorAll('#chart-rl-tool-use .alarm-mark').length") == 1
    # The evaluation report with its plots, which loaded.
    report = browser.evaluate("""(() => { const r = document.getElementById('eval-report');
        return {tables: r.querySelectorAll('table').length, text: r.textContent,
                plots: [...r.querySelectorAll('.plots img')].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])}; })()""")
    assert report["tables"] >= 2 and "short run evaluation" in report["text"]
    assert sorted(report["plots"]) == [["../eval/accuracy_by_transform.png", True], ["../eval/tool_use_by_transform.png", True]]
    steps = browser.evaluate("[...document.querySelectorAll('#steps tbody tr')].map(tr => tr.textContent)")
    assert len(steps) == 5  # 3 RL steps + 2 validation steps, each once
    _shot(browser, short_run, "overview")


def test_step_filters_and_sorting_change_the_list(page, short_run):
    """Mutants: the error-class filter ignored; the correctness filter inverted; sorting by the index."""
    browser = page("#/step/rl/0", "step")
    samples = short_run.samples[("rl", 0)]
    assert _listed(browser) == list(range(8))
    assert browser.evaluate("document.querySelectorAll('#trajectories tbody img').length") == sum(len(s.images) for s in samples)

    _set_filter(browser, "error", "runtime")
    assert _listed(browser) == [i for i, s in enumerate(samples) if "runtime" in s.error_classes] == [2, 6]
    assert "error=runtime" in browser.evaluate("location.hash")  # the view can be shared as a link
    _set_filter(browser, "error", "")
    _set_filter(browser, "correct", "no")
    assert _listed(browser) == [i for i, s in enumerate(samples) if not s.correct] == [1, 5]
    _set_filter(browser, "correct", "")
    _set_filter(browser, "min", "1")
    assert _listed(browser) == [i for i, s in enumerate(samples) if s.reward >= 1]
    _set_filter(browser, "min", "")

    browser.evaluate("document.body.dataset.rendered = ''; document.querySelector('th[data-sort=reward]').click()")
    browser.wait_for("document.body.dataset.rendered === 'step'")
    by_reward = sorted(range(8), key=lambda i: (samples[i].reward, i), reverse=True)
    assert _listed(browser) == by_reward and samples[by_reward[0]].reward > samples[by_reward[-1]].reward
    _shot(browser, short_run, "step_rl_0_by_reward")


def test_trajectory_page_shows_images_boxes_and_reward_terms(page, short_run):
    """The `two_step` trajectory of RL step 1: image 0 turned (image 1), then image 1 cropped (image 2).

    Mutants: the call's output shown in place of its input; a term's value taken from another term."""
    sample = short_run.samples[("rl", 1)][1]
    browser = page("#/traj/rl/1/1", "traj")
    # Call images load lazily, as a reader scrolls to them; decode() waits for each (and fails if it cannot load).
    browser.evaluate("""Promise.all([...document.querySelectorAll('.call img')].map(i => {
        i.scrollIntoView(); return i.decode(); })).then(() => true)""")
    calls = browser.evaluate("""[...document.querySelectorAll('.call')].map(c => ({
        code: c.querySelector('pre.code') && c.querySelector('pre.code').textContent,
        images: [...c.querySelectorAll('img[data-image]')].map(i => [+i.dataset.image, i.getAttribute('src'),
                 i.complete && i.naturalWidth > 0, i.naturalWidth, i.naturalHeight])}))""")
    assert [c["code"] for c in calls] == [c["code"] for c in sample.tool_calls]
    for call, shown in zip(sample.tool_calls, calls):
        read, returned = shown["images"]
        assert (read[0], returned[0]) == (call["image_index"], call["output_index"])
        assert read[2] and returned[2], "an image did not load"
        assert returned[3:] == list(sample.images[call["output_index"]].size)
        assert read[3:] == list(sample.images[call["image_index"]].size)
    terms = browser.evaluate("""Object.fromEntries([...document.querySelectorAll('#reward-terms tr[data-term]')]
        .map(tr => [tr.dataset.term, +tr.children[1].textContent]))""")
    assert terms == pytest.approx(sample.terms, abs=5e-4)
    assert float(browser.evaluate("document.getElementById('reward').textContent")) == pytest.approx(sample.reward, abs=5e-4)
    boxes = browser.evaluate("""[...document.querySelectorAll('#origin-boxes rect')].map(r => [r.getAttribute('class'),
        JSON.parse(r.dataset.box)])""")
    assert boxes == [["answer-box", sample.answer_box], ["crop-box", [0.0, 56.0, 56.0, 112.0]]]
    _shot(browser, short_run, "trajectory_rl_1_1")

    broken = page("#/traj/rl/0/2", "traj")
    errors = broken.evaluate("[...document.querySelectorAll('.call .badge.bad')].map(b => b.textContent)")
    assert errors == ["runtime", "malformed_json"]
    assert "undefined_name" in broken.evaluate("document.querySelector('.call .error').textContent")
    _shot(broken, short_run, "trajectory_rl_0_2_errors")


def test_open_page_follows_the_run_and_a_rewind(page, short_run):
    """The page re-reads run.js every few seconds while the run goes: a new step appears, and after a
    resume's rewind the dropped step disappears (each step shown once).

    Mutant: no refresh (the page reads the data once)."""
    browser = page("#/", "overview")
    listed = "document.querySelectorAll('#steps tbody tr').length"
    assert browser.evaluate(listed) == 5
    tracker = short_run.tracker
    step3 = {"reward/total": 0.5, "rollout/tool_calls_mean": 1.0, "rollout/tool_calls": 8.0, "rollout/tool_errors": 0.0}
    tracker.log_samples(short_run.samples[("rl", 2)], step=3, stage="rl")
    tracker.log(step3, step=3, stage="rl")
    assert browser.wait_for(f"{listed} === 6")
    assert browser.wait_for("JSON.parse(document.querySelector('path[data-key=\"reward/total\"]').dataset.points).length === 4")
    tracker.rewind("rl", 3)
    assert browser.wait_for(f"{listed} === 5")
    assert browser.evaluate("JSON.parse(document.querySelector('path[data-key=\"reward/total\"]').dataset.points).length") == 3
