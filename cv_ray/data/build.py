"""Build the whole dataset directory (the ``cv-ray trainer.stage=data`` step).

Writes, under ``out_dir``::

    rl_train.parquet, rl_val.parquet      synthetic RL tasks (images embedded)
    sft.jsonl + sft_images/               SFT trajectories executed in the sandbox (our format)
    sft_sharegpt.json                     the same trajectories as LLaMA-Factory ShareGPT (same image files)
    suites/<name>.parquet                 benchmark suites (e.g. suites/orientation-v1.parquet)
    manifest.json                         counts, seed, versions, timings

Everything is deterministic by ``cfg.seed``; only the sandbox's execution is needed (no network).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cv_ray.agent.prompts import SYSTEM_PROMPT
from cv_ray.data.compat import sharegpt_from_jsonl
from cv_ray.data.config import DataConfig
from cv_ray.data.demo_family import FAMILY as DEMO_FAMILY
from cv_ray.data.demo_family import build_demo_dataset, of_variants
from cv_ray.data.families import FAMILIES, generate_task, generate_tasks
from cv_ray.data.records import write_sft, write_tasks
from cv_ray.data.suites import SUITES, build_suite, resolve_suite_name
from cv_ray.data.trajectories import Sandbox, choose_kind, example_rng, generate_example
from cv_ray.types import SFTExample, Task

FORMAT_VERSION = "cv_ray-data/1"


def _progress(items: Iterator[Task], total: int, desc: str) -> Iterator[Task]:
    return tqdm(items, total=total, desc=desc, unit="task", leave=False)


def _sft_examples(cfg: DataConfig, sandbox: Sandbox, threads: int, counts: dict[str, Counter],
                  system_prompt: str) -> Iterator[SFTExample]:
    """Trajectories for tasks of split ``sft`` (independent of the RL tasks), in index order."""
    families = list(cfg.families)

    def make(index: int) -> tuple[SFTExample, dict]:
        task = generate_task(families[index % len(families)], cfg.seed, index // len(families), cfg.image_size, "sft")
        rng = example_rng(cfg.seed, index)
        return generate_example(task, sandbox, rng, choose_kind(task, rng, cfg.sft_error_rate),
                                system_prompt=system_prompt)

    with ThreadPoolExecutor(max_workers=threads) as executor:
        # map keeps the order, so the output is the same whatever the thread count.
        for example, example_counts in executor.map(make, range(cfg.num_sft_trajectories)):
            counts["kinds"][example.kind] += 1
            counts["tool_errors"].update(example_counts["errors"])
            counts["totals"]["calls"] += example_counts["calls"]
            counts["totals"]["ops_missing"] += example_counts["ops_missing"]
            yield example


def build_dataset(cfg: DataConfig, out_dir: Path, sandbox_pool: Sandbox, sandbox_threads: int = 2,
                  system_prompt: str = SYSTEM_PROMPT) -> dict[str, Any]:
    """Generate every part into ``out_dir`` and return the manifest (also written as manifest.json).

    ``sandbox_threads``: trajectories generated concurrently (each runs its calls in order); match the
    pool's worker count. ``system_prompt``: the system message of every SFT conversation; pass the
    rollout's (``rollout.system_prompt``) so that SFT teaches the prompt RL samples under.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    families = list(cfg.families)
    if families == [DEMO_FAMILY]:  # the teaching task writes its own layout (no benchmark suites)
        return build_demo_dataset(out_dir, sandbox_pool, cfg.seed, cfg.num_rl_tasks, cfg.num_val_tasks,
                                  cfg.num_sft_trajectories, system_prompt, cfg.image_size, tuple(cfg.rl_variants))

    start = time.perf_counter()
    train = of_variants(generate_tasks(families, 1 << 62, cfg.seed, cfg.image_size, "train"), cfg.rl_variants)
    n_train = write_tasks(_progress(itertools.islice(train, cfg.num_rl_tasks), cfg.num_rl_tasks, "rl_train"),
                          out_dir / "rl_train.parquet")
    seconds["rl_train"] = time.perf_counter() - start

    start = time.perf_counter()
    val = of_variants(generate_tasks(families, 1 << 62, cfg.seed, cfg.image_size, "val"), cfg.rl_variants)
    n_val = write_tasks(_progress(itertools.islice(val, cfg.num_val_tasks), cfg.num_val_tasks, "rl_val"),
                        out_dir / "rl_val.parquet")
    seconds["rl_val"] = time.perf_counter() - start

    start = time.perf_counter()
    sft_counts: dict[str, Counter] = {"kinds": Counter(), "tool_errors": Counter(), "totals": Counter()}
    examples = tqdm(_sft_examples(cfg, sandbox_pool, sandbox_threads, sft_counts, system_prompt),
                    total=cfg.num_sft_trajectories,
                    desc="sft", unit="trajectory", leave=False)
    n_sft = write_sft(examples, out_dir / "sft.jsonl")
    n_sharegpt = sharegpt_from_jsonl(out_dir / "sft.jsonl", out_dir / "sft_sharegpt.json")
    seconds["sft"] = time.perf_counter() - start

    start = time.perf_counter()
    suites: dict[str, int] = {}
    for requested in cfg.suites:
        name = resolve_suite_name(requested)
        tasks = build_suite(name, cfg.seed, cfg.suite_size, cfg.image_size)
        suites[name] = write_tasks(_progress(iter(tasks), len(tasks), name), out_dir / "suites" / f"{name}.parquet")
    seconds["suites"] = time.perf_counter() - start

    manifest = {
        "format": FORMAT_VERSION, "seed": cfg.seed, "image_size": cfg.image_size, "families": families,
        "counts": {"rl_train": n_train, "rl_val": n_val, "sft": n_sft, "sft_sharegpt": n_sharegpt, "suites": suites},
        "sft": {"kinds": dict(sft_counts["kinds"]), "tool_errors": dict(sft_counts["tool_errors"]),
                "tool_calls": sft_counts["totals"]["calls"],
                "required_ops_not_traced": sft_counts["totals"]["ops_missing"]},
        "versions": {"suites": sorted(suites), "family_registry": sorted(FAMILIES), "suite_registry": sorted(SUITES)},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
