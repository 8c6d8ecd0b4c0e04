"""Benchmark of the sandbox against the unsafe baseline and a fresh interpreter per call.

Run (about 2-3 minutes on a 2-core machine; run it when the machine is otherwise quiet)::

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_sandbox.py --json runs/bench_sandbox.json

Modes, on the same machine with the same inputs:
  a_unsafe   ``exec`` in a reused process (the reference's design; N workers = N threads)
  b_sandbox  SandboxPool, a fresh hardened child per call (N workers = N zygotes)
  c_session  SandboxPool with session="trajectory": each client thread keeps one session for all calls
  d_fresh    a fresh ``python`` per call (SandboxFusion-style), same byte protocol

Workloads: ``noop`` (``result = image`` on a 64x64 image: pure round-trip overhead),
``crop_rotate_flip`` and ``enhance_filter`` on a 1024x1024 RGB photo.

For each mode, workload and worker count (1 and 2) N client threads call back-to-back for a fixed
time; the table shows median and p99 latency per call and throughput, and each ratio to mode a.
``idle`` latency (one worker, 30 ms between calls, the realistic RL case where the sandbox waits
for generation) is reported for the no-op. The JSON holds, per mode, workload and worker count,
``median_ms``, ``p99_ms`` and ``calls_per_s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from cv_ray.sandbox import SandboxPool, protocol
from cv_ray.sandbox.config import SandboxConfig

WORKLOADS = {
    "noop": "result = image",
    "crop_rotate_flip": ("result = image.crop((128, 96, 896, 928)).transpose(Image.Transpose.ROTATE_90)"
                         ".transpose(Image.Transpose.FLIP_LEFT_RIGHT)"),
    "enhance_filter": ("from PIL import ImageEnhance, ImageFilter\n"
                       "result = ImageEnhance.Contrast(image).enhance(1.6).filter(ImageFilter.SHARPEN)"),
}

_FRESH_CHILD = """
import sys, math, numpy as np, cv2, PIL
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps
from cv_ray.sandbox import protocol
shm = memoryview(protocol.map_shared_buffer(int(sys.argv[1])))
req = protocol.read_request(0, shm)
ns = {"image": req.image, "img": req.image, "draw": ImageDraw.Draw(req.image), "Image": Image, "np": np,
      "cv2": cv2, "math": math, "ImageEnhance": ImageEnhance, "ImageFilter": ImageFilter, "ImageOps": ImageOps}
exec(req.code, ns)
protocol.write_frame(1, protocol.encode_response({"ok": True}, protocol.wire_image(ns["result"]), shm))
"""


def _images() -> dict[str, Image.Image]:
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((1024, 1024))
    return {"noop": photo.resize((64, 64)), "crop_rotate_flip": photo, "enhance_filter": photo}


def _unsafe_call(code: str, image: Image.Image) -> None:
    own = image.copy()
    ns = {"image": own, "img": own, "draw": ImageDraw.Draw(own), "Image": Image, "np": np, "math": math,
          "ImageEnhance": ImageEnhance, "ImageFilter": ImageFilter, "ImageOps": ImageOps}
    exec(code, ns)
    assert isinstance(ns["result"], Image.Image)


def _fresh_call(code: str, image: Image.Image) -> None:
    """One call in a new interpreter: same protocol, its shared buffer's fd number in argv."""
    fd = protocol.create_shared_buffer(16 << 20)
    mapping = protocol.map_shared_buffer(fd)
    shm = memoryview(mapping)
    frame = protocol.encode_request(code, image, False, shm)
    proc = subprocess.Popen([sys.executable, "-c", _FRESH_CHILD, str(fd)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, pass_fds=(fd,),
                            env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    protocol.write_frame(proc.stdin.fileno(), frame)
    proc.stdin.close()
    response = protocol.read_response(proc.stdout.fileno(), time.monotonic() + 60, 1 << 26, shm)
    proc.wait()
    assert response is not None and response.image is not None
    shm.release()
    mapping.close()
    os.close(fd)


def _measure(call: Callable[[int], None], workers: int, seconds: float, max_calls: int,
             gap_s: float = 0.0) -> dict[str, float]:
    """N threads call back-to-back (or with ``gap_s`` pauses) for ``seconds``; latency and throughput."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        while time.monotonic() < stop:
            with lock:
                if len(latencies) >= max_calls:
                    return
            t0 = time.perf_counter()
            call(k)
            with lock:
                latencies.append(time.perf_counter() - t0)
            if gap_s:
                time.sleep(gap_s)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    return {"median_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
            "calls_per_s": len(ms) / wall if not gap_s else float("nan"), "calls": len(ms)}


def run(seconds: float) -> dict:
    images = _images()
    results: dict[str, dict] = {}
    for workers in (1, 2):
        cfg = SandboxConfig(workers_per_executor=workers, timeout_s=10.0, memory_mb=1024)
        pools = {"b_sandbox": SandboxPool(cfg), "c_session": SandboxPool(dataclasses.replace(cfg, session="trajectory"))}
        try:
            for name, workload in WORKLOADS.items():
                image = images[name]
                for _ in range(3):  # warm every worker and session
                    _unsafe_call(workload, image)
                    pools["b_sandbox"].run(workload, [image])
                    for k in range(workers):
                        pools["c_session"].run(workload, [image], session_id=f"s{k}")
                calls = {
                    "a_unsafe": lambda k, w=workload, im=image: _unsafe_call(w, im),
                    "b_sandbox": lambda k, w=workload, im=image: pools["b_sandbox"].run(w, [im]),
                    "c_session": lambda k, w=workload, im=image: pools["c_session"].run(w, [im], session_id=f"s{k}"),
                    "d_fresh": lambda k, w=workload, im=image: _fresh_call(w, im),
                }
                for mode, call in calls.items():
                    budget = seconds * (0.5 if mode == "d_fresh" else 1.0)
                    cell = _measure(call, workers, budget, max_calls=10 if mode == "d_fresh" else 100000)
                    if workers == 1 and name == "noop" and mode != "d_fresh":
                        cell["idle_median_ms"] = _measure(call, 1, 1.5, 60, gap_s=0.03)["median_ms"]
                    results.setdefault(mode, {}).setdefault(name, {})[f"{workers}w"] = cell
        finally:
            for p in pools.values():
                p.close()
    return results


def _table(results: dict) -> str:
    rows = ["| mode | workload | workers | median ms | p99 ms | calls/s | median / a | calls/s / a |",
            "|---|---|---|---|---|---|---|---|"]
    for mode, per_workload in results.items():
        for name, per_workers in per_workload.items():
            for w, cell in per_workers.items():
                base = results["a_unsafe"][name][w]
                rows.append(f"| {mode} | {name} | {w} | {cell['median_ms']:.2f} | {cell['p99_ms']:.2f} | "
                            f"{cell['calls_per_s']:.1f} | {cell['median_ms'] / base['median_ms']:.2f} | "
                            f"{cell['calls_per_s'] / base['calls_per_s']:.2f} |")
    idle = [f"{mode}: {results[mode]['noop']['1w']['idle_median_ms']:.2f} ms"
            for mode in ("a_unsafe", "b_sandbox", "c_session")]
    rows.append("\nno-op median with 30 ms idle gaps (1 worker): " + ", ".join(idle))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per cell (mode x workload x workers)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.monotonic()
    results = run(args.seconds)
    print(_table(results))
    print(f"\n(total {time.monotonic() - start:.0f} s; {os.cpu_count()} CPUs; load avg {os.getloadavg()[0]:.1f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
