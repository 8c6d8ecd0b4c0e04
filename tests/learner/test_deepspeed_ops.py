"""DeepSpeed's CPU op is built per virtualenv, at set-up time (cv_ray/learner/deepspeed_ops.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cv_ray.learner.deepspeed_ops import use_venv_extension_cache


def test_extension_cache_is_the_virtualenvs_unless_the_user_set_one(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert use_venv_extension_cache() == Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/srv/ext")
    assert use_venv_extension_cache() == Path("/srv/ext")


@pytest.mark.skipif(not (Path(sys.prefix) / ".cv_ray-setup").exists(),
                    reason="this virtualenv was not made by tools/setup_env.sh")
def test_setup_built_the_op_so_no_learner_start_compiles_it():
    built = list((Path(sys.prefix) / "torch_extensions").glob("deepspeed_shm_comm/*.so"))
    assert built, "tools/setup_env.sh should have run `python -m cv_ray.learner.deepspeed_ops`"
