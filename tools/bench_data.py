#!/usr/bin/env python
"""Benchmark of the data build: wall time per part for the default-size dataset.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_data.py                       # 2000 RL, 500 SFT, suites
    .venv/bin/python tools/bench_data.py --rl 200 --sft 50 --json /tmp/bench_data.json

Runs ``cv_ray.data.build.build_dataset`` into a temporary directory with a real ``SandboxPool``
(``--workers`` zygotes; SFT trajectories run that many at a time) and prints a table of seconds per
part (sandbox start-up, RL train, RL val, SFT, suites, total) plus the output size. The target is
<= 300 s in total on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from cv_ray.data.build import build_dataset
from cv_ray.data.config import DataConfig


def _dir_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rl", type=int, default=2000, help="RL training tasks")
    parser.add_argument("--val", type=int, default=64, help="RL validation tasks")
    parser.add_argument("--sft", type=int, default=500, help="SFT trajectories")
    parser.add_argument("--suite-size", type=int, default=24, help="base questions per benchmark suite")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--workers", type=int, default=2, help="sandbox zygotes (and concurrent trajectories)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default="", help="keep the dataset here (default: a temporary dir)")
    parser.add_argument("--json", type=str, default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    from cv_ray.sandbox.config import SandboxConfig
    from cv_ray.sandbox.pool import SandboxPool

    cfg = DataConfig(seed=args.seed, num_rl_tasks=args.rl, num_val_tasks=args.val, num_sft_trajectories=args.sft,
                     suite_size=args.suite_size, image_size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        total_start = time.perf_counter()
        start = time.perf_counter()
        with SandboxPool(SandboxConfig(workers_per_executor=args.workers, timeout_s=5.0, memory_mb=1024)) as pool:
            startup = time.perf_counter() - start
            manifest = build_dataset(cfg, out, pool, sandbox_threads=args.workers)
        total = time.perf_counter() - total_start
        size_mb = _dir_bytes(out) / 2**20

    rows = [("sandbox start", startup, "")] + [
        (part, seconds, count) for part, seconds, count in (
            ("rl_train", manifest["seconds"]["rl_train"], f"{manifest['counts']['rl_train']} tasks"),
            ("rl_val", manifest["seconds"]["rl_val"], f"{manifest['counts']['rl_val']} tasks"),
            ("sft", manifest["seconds"]["sft"],
             f"{manifest['counts']['sft']} trajectories, {manifest['sft']['tool_calls']} sandbox calls"),
            ("suites", manifest["seconds"]["suites"], f"{sum(manifest['counts']['suites'].values())} tasks"),
        )
    ] + [("total", total, f"{size_mb:.0f} MiB written")]
    print(f"data build on {os.cpu_count()} CPUs (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(f"{'part':<14}{'seconds':>10}  what")
    for part, seconds, what in rows:
        print(f"{part:<14}{seconds:>10.1f}  {what}")
    print(f"target: total <= 300 s -> {'met' if total <= 300 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": {p: round(s, 2) for p, s, _ in rows},
                                               "size_mib": round(size_mb, 1), "manifest": manifest}, indent=2))


if __name__ == "__main__":
    main()
