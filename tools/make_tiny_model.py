#!/usr/bin/env python
"""Build the tiny random Qwen2.5-VL / Qwen3-VL model directories used by tests and the quickstart.

    python tools/make_tiny_model.py --out runs/tiny            # both families under runs/tiny/<family>
    python tools/make_tiny_model.py --family qwen3_vl --out /tmp/tiny-qwen3

Real transformers model and processor classes, a locally trained byte-level BPE tokenizer with Qwen's
special tokens, seeded random weights; saved with save_pretrained, so loading goes through the same
from_pretrained / AutoProcessor path as a real checkpoint. Importable: `build_tiny_model(family, out)`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cv_ray.models.tiny import FAMILIES, build_tiny_model, ensure_tiny_model  # noqa: F401  (re-exported)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    parser.add_argument("--out", type=Path, required=True,
                        help="model directory (with --family all: a parent directory, one sub-directory per family)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    families = FAMILIES if args.family == "all" else (args.family,)
    for family in families:
        out = args.out / family if args.family == "all" else args.out
        start = time.perf_counter()
        build_tiny_model(family, out, seed=args.seed)
        print(f"{family}: {out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
