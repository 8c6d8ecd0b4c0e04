"""DeepSpeed's JIT-compiled CPU op, built once per virtualenv at set-up time.

Whenever a DeepSpeed process group starts on CPU, its torch backend loads a shared-memory all-reduce
op (`deepspeed_shm_comm`), compiling it with ninja into ``TORCH_EXTENSIONS_DIR`` the first time:
about a minute on 2 cores, paid inside whichever run or test started the first learner. torch keys
that cache by the op's name, not by the install it came from, so two virtualenvs on one machine (a
checkout and a CI clone) rebuild it in turn each time the other one ran. So each virtualenv keeps its
own cache (:func:`use_venv_extension_cache`, called before DeepSpeed is imported), and
``tools/setup_env.sh`` builds the op there once (``python -m cv_ray.learner.deepspeed_ops``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def use_venv_extension_cache() -> Path:
    """Point torch's extension cache at this virtualenv (unless the user set one); return it."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def prebuild() -> str:
    """Build (or find already built) the CPU op DeepSpeed loads at process-group start; say what happened."""
    cache = use_venv_extension_cache()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        return f"no DeepSpeed CPU communication op to build on this machine ({get_accelerator().device_name()})"
    start = time.perf_counter()
    builder.load()
    return f"DeepSpeed op {builder.absolute_name()} ready in {cache} ({time.perf_counter() - start:.0f} s)"


if __name__ == "__main__":
    print(f"cv_ray setup: {prebuild()}", file=sys.stderr)
