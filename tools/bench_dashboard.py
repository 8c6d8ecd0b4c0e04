"""Benchmark of the dashboard: what logging costs a step, how big the files grow, how fast pages open.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_dashboard.py [--steps 500] [--samples 16] [--json PATH]

A synthetic run through the real Tracker (console off, JSONL and dashboard on): ``--steps`` RL steps,
each with a metric row shaped like the driver's (about 70 keys) and ``--samples`` trajectories of
3 turns and 2 tool calls (a photo-like 1024 x 768 task image shared by a group of 8, a 768 x 1024
turned copy and a 384 x 256 crop of each sample's own: each image written once at screen size and
as a thumbnail). Reported: the
seconds ``log`` and ``log_samples`` add to a step (median and p95, wall and this process's CPU: on a
shared machine the CPU time is the steadier figure), the size of the index
(``data/run.js``), of the metric chunks, of one step's data file and image folder, and of the
whole dashboard; then headless Chromium opens the overview, the last step and one trajectory from
``file://`` and reports the time until each page is drawn (``document.body.dataset.rendered``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cv_ray.config import LoggerConfig
from cv_ray.dashboard import RolloutSample
from cv_ray.dashboard.browser import Browser
from cv_ray.tracking import Tracker

TERMS = ("acc", "fmt", "mandatory", "necessity", "exact", "emerge", "usage", "spurious")


def _picture(rng: np.random.Generator, task: int) -> Image.Image:
    """A photo-like 1024 x 768 task image: smooth gradients, flat shapes, mild sensor noise (pure noise
    would be JPEG's worst case)."""
    y, x = np.mgrid[0:768, 0:1024]
    base = np.stack([128 + 100 * np.sin(x / (90 + task)), 128 + 100 * np.cos(y / 70), (x + y) % 256], axis=-1)
    for _ in range(12):  # flat shapes with edges
        x0, y0 = int(rng.integers(0, 900)), int(rng.integers(0, 650))
        base[y0:y0 + int(rng.integers(30, 120)), x0:x0 + int(rng.integers(30, 120))] = rng.integers(0, 256, 3)
    base = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(base)


def _sample(i: int, images: list[Image.Image], rng: np.random.Generator) -> RolloutSample:
    calls = [
        {"turn": 0, "code": "result = image.transpose(Image.Transpose.ROTATE_90)", "parsed": True, "ok": True,
         "image_index": 0, "output_index": 1, "error_class": "", "error": "", "stdout": "", "seconds": 0.02,
         "ops": [{"op": "rotate_90", "params": {}, "changed": None, "verified": True, "via": "PIL.transpose"}]},
        {"turn": 1, "code": "result = image.crop((0, 0, 384, 256))", "parsed": True, "ok": True, "image_index": 1,
         "output_index": 2, "error_class": "", "error": "", "stdout": "", "seconds": 0.02,
         "ops": [{"op": "crop", "params": {"box": [0, 0, 384, 256]}, "changed": None, "verified": True,
                  "via": "PIL.crop", "box_on_origin": [768.0, 0.0, 1024.0, 384.0]}]},
    ]
    turns = [{"index": t, "segments": [{"kind": "think", "text": "<think>" + "looking closely " * 20 + "</think>"},
                                       {"kind": "call", "text": "<tool_call>...</tool_call>"}],
              "calls": [calls[t]]} for t in range(2)]
    turns.append({"index": 2, "segments": [{"kind": "answer", "text": "<answer>42</answer>"}], "calls": []})
    return RolloutSample(
        uid=f"task-{i // 8}", sample_index=i % 8, question="What is written on the sign?", answer="42",
        reward=float(rng.normal(1.0, 0.5)), correct=bool(rng.random() < 0.5),
        terms={t: float(rng.random()) for t in TERMS}, stats={"iou": 0.5, "calls": 2.0, "tool_errors": 0.0},
        stop_reason="answer", required_ops=["rotate_90", "crop"], answer_box=[768.0, 0.0, 1024.0, 384.0],
        turns=turns, images=images, image_parent=[None, 0, 1],
        image_on_origin=[[0.0, 0.0, 1024.0, 768.0], [0.0, 0.0, 1024.0, 768.0], [768.0, 0.0, 1024.0, 384.0]],
        tokens={"prompt": 900, "response": 400, "sampled": 250, "inserted": 150}, metrics={"generation_s": 3.0})


def _row(step: int, rng: np.random.Generator) -> dict[str, float]:
    row = {f"reward/{t}": float(rng.random()) for t in TERMS}
    row.update({f"learner/rl/{k}": float(rng.random()) for k in (
        "kl", "loss", "pg_loss", "entropy", "approx_kl_old", "clip_frac_low", "clip_frac_high", "dual_clip_frac",
        "ratio", "lr", "tokens", "step_seconds", "tokens_per_s", "grad_norm", "updates")})
    row.update({f"rollout/{k}": float(rng.random()) for k in (
        "trajectories", "wall_s", "turns_mean", "response_tokens_mean", "sampled_tokens", "generation_s", "tool_s",
        "tool_errors/runtime", "tool_errors/syntax", "stop/answer", "stop/max_tokens")})
    row.update({"rollout/tool_calls_mean": 1.5, "rollout/tool_calls": 192.0, "rollout/tool_errors": 10.0,
                "reward/total": float(rng.random()), "reward/correct": float(rng.random())})
    row.update({f"time/{p}_s": float(rng.random()) for p in ("rollout", "reward", "advantage", "update",
                                                             "weight_push", "step")})
    row.update({f"push/{k}": float(rng.random()) for k in ("gather_s", "update_s", "total_s")})
    if step % 10 == 9:
        row.update({"eval/accuracy": float(rng.random()), "eval/reward": float(rng.random())})
    return row


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _open(browser: Browser, url: str) -> float:
    start = time.perf_counter()
    browser.open(url)
    browser.wait_for("document.body.dataset.rendered")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pool = [_picture(rng, k) for k in range(8)]
    out: dict = {"steps": args.steps, "samples_per_step": args.samples}
    with tempfile.TemporaryDirectory(prefix="bench_dashboard_") as tmp:
        run_dir = Path(tmp) / "run"
        tracker = Tracker(LoggerConfig(backends=["jsonl"]), run_dir, run_name="bench")
        log_s, samples_s, log_cpu, samples_cpu = [], [], [], []
        for step in range(args.steps):
            # Groups of 8 samples share a task image (new tasks every step: a pixel of their own on
            # one of 8 pre-drawn pictures); each sample's tool outputs are its own.
            tasks = {}
            for group in range(-(-args.samples // 8)):
                image = pool[(step * 3 + group) % len(pool)].copy()
                image.putpixel((step % 1024, group), (255, 255, 255))
                turned = image.transpose(Image.Transpose.ROTATE_90)
                tasks[group] = [image, turned, turned.crop((0, 0, 384, 256))]
            samples = [_sample(i, [tasks[i // 8][0]] + [im.copy() for im in tasks[i // 8][1:]], rng)
                       for i in range(args.samples)]
            for sample in samples:  # distinct outputs per sample (a pixel of its own), as in a real group
                sample.images[1].putpixel((0, 0), (sample.sample_index, 0, 0))
                sample.images[2].putpixel((0, 0), (sample.sample_index, 0, 0))
            row = _row(step, rng)
            t0, c0 = time.perf_counter(), time.process_time()
            tracker.log_samples(samples, step=step, stage="rl")
            t1, c1 = time.perf_counter(), time.process_time()
            tracker.log(row, step=step, stage="rl")
            t2, c2 = time.perf_counter(), time.process_time()
            samples_s.append(t1 - t0)
            samples_cpu.append(c1 - c0)
            log_s.append(t2 - t1)
            log_cpu.append(c2 - c1)
        tracker.close()
        dash = run_dir / "dashboard"
        for name, values in (("log_samples_s", samples_s), ("log_s", log_s), ("log_samples_cpu_s", samples_cpu),
                             ("log_cpu_s", log_cpu)):
            out[name] = {"median": statistics.median(values), "p95": sorted(values)[int(0.95 * len(values))]}
        last = f"{args.steps - 1:06d}"
        out["bytes"] = {"run.js": _size(dash / "data" / "run.js"), "metric_chunks": _size(dash / "data" / "metrics"),
                        "one_step_data": _size(dash / "data" / "steps" / "rl" / f"{last}.js"),
                        "one_step_images": _size(dash / "images" / "rl" / last), "dashboard": _size(dash),
                        "metrics.jsonl": _size(run_dir / "metrics.jsonl")}
        index = (dash / "index.html").as_uri()
        with Browser(width=1400, height=900, timeout_s=120) as browser:
            out["open_s"] = {"overview": _open(browser, index), "step": _open(browser, f"{index}#/step/rl/{args.steps - 1}"),
                             "trajectory": _open(browser, f"{index}#/traj/rl/{args.steps - 1}/0")}
            out["page_problems"] = browser.problems
    print(f"{args.steps} steps x {args.samples} trajectories")
    for name in ("log_samples", "log"):
        wall, cpu = out[f"{name}_s"], out[f"{name}_cpu_s"]
        print(f"  {name:12s} per step: wall median {wall['median'] * 1000:.1f} ms (p95 {wall['p95'] * 1000:.1f}), "
              f"CPU median {cpu['median'] * 1000:.1f} ms (p95 {cpu['p95'] * 1000:.1f})")
    for name, size in out["bytes"].items():
        print(f"  {name:16s} {size / 1024:10.1f} KiB")
    for name, seconds in out["open_s"].items():
        print(f"  open {name:12s} {seconds:.2f} s")
    print(f"  page problems: {out['page_problems'] or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
