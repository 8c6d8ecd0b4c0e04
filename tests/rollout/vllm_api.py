"""vLLM's own Python code for the `vllm_api` tests, kept out of every other test's imports.

tools/setup_vllm_api.sh installs vllm==0.33.0 (the version of the `vllm` extra) with --no-deps into
.cache/vllm-api; vLLM pins another torch and transformers, so it never enters .venv. The fixtures
here put that directory on ``sys.path`` for the tests that ask for them and take it away after:

* ``vllm_api`` (module scope): ``sys.path``, ``VLLM_TARGET_DEVICE=cpu`` (vLLM's CPU platform: its
  config, input and weight-loading code run without a GPU), ``PYTHONPATH`` for the subprocess in
  which vLLM inspects model classes. vLLM is imported once per session; its modules (and those of
  its side-directory dependencies) leave ``sys.modules`` after each module of tests and come back
  for the next, and the environment variables vLLM sets at import are restored at once.
* :func:`cpu_vllm_model`: the real vLLM model class of a checkpoint, built on CPU from the
  ``VllmConfig`` that ``EngineArgs`` makes, with a one-process gloo "tensor-parallel" group.

What still needs a GPU (the forward pass, CUDA-IPC memory) is stood in by the tests that need it,
and they say so.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SIDE_DIR = REPO / ".cache" / "vllm-api"

_cached_modules: dict[str, ModuleType] = {}


def _from_side_dir(module: ModuleType) -> bool:
    location = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", []) or []), None)
    return bool(location) and str(location).startswith(str(SIDE_DIR))


def _import_vllm() -> None:
    """Import the vLLM modules the tests use, undoing the environment changes vLLM makes at import."""
    before = dict(os.environ)
    import vllm
    import vllm.distributed.weight_transfer.ipc_engine
    import vllm.engine.arg_utils
    import vllm.v1.engine.input_processor
    import vllm.v1.serial_utils

    vllm.LLM, vllm.SamplingParams  # noqa: B018 -- lazy attributes: import their modules now

    for key in set(os.environ) - set(before):
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture(scope="module")
def vllm_api():
    """The ``vllm`` package from .cache/vllm-api, importable for the tests of one module."""
    if not (SIDE_DIR / "vllm" / "__init__.py").exists():
        pytest.fail(f"vLLM's Python package is not in {SIDE_DIR}: run `bash tools/setup_vllm_api.sh` "
                    "(tools/setup_env.sh runs it), or deselect these tests with -m 'not vllm_api'")
    patch = pytest.MonkeyPatch()
    patch.syspath_prepend(str(SIDE_DIR))
    patch.setenv("VLLM_TARGET_DEVICE", "cpu")
    patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SIDE_DIR), os.environ.get("PYTHONPATH")])))
    sys.modules.update(_cached_modules)
    try:
        if not _cached_modules:
            _import_vllm()
        yield sys.modules["vllm"]
    finally:
        # Decide for every module before removing any: a namespace package finds its path through its parent.
        leaving = [name for name, module in list(sys.modules.items())
                   if name == "vllm" or name.startswith("vllm.") or _from_side_dir(module)]
        for name in leaving:
            _cached_modules[name] = sys.modules.pop(name)
        patch.undo()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CpuDistributed:
    """vLLM's parallel state for one process on CPU (gloo), created once and destroyed with the module."""

    def __init__(self) -> None:
        self.up = False

    def ensure(self, vllm_config) -> None:
        if self.up:
            return
        from vllm.config import set_current_vllm_config
        from vllm.distributed import init_distributed_environment, initialize_model_parallel

        with set_current_vllm_config(vllm_config):
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
            initialize_model_parallel(1, 1)
        self.up = True

    def close(self) -> None:
        if self.up:
            from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
            self.up = False


@pytest.fixture(scope="module")
def distributed(vllm_api):
    """vLLM's one-process parallel state for the models a module of tests builds."""
    state = CpuDistributed()
    yield state
    state.close()


def vllm_config_for(engine_kwargs: dict):
    """The ``VllmConfig`` vLLM builds from an engine's ``LLM`` arguments on its CPU platform (fp32, no compilation)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(**{**engine_kwargs, "dtype": "float32", "enforce_eager": True}).create_engine_config()


def cpu_vllm_model(vllm_config, distributed: CpuDistributed, hf_weights: dict | None = None):
    """vLLM's model class for ``vllm_config``, built on CPU the way its loader builds it, weights loaded
    through the model's own ``load_weights`` (the path a checkpoint and a weight update take).

    One model per config: vLLM registers every attention layer by name in the config."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading

    distributed.ensure(vllm_config)
    with set_current_vllm_config(vllm_config), torch.device("cpu"):
        model = initialize_model(vllm_config)
        if hf_weights is not None:
            model.load_weights(iter(hf_weights.items()))
            process_weights_after_loading(model, vllm_config.model_config, torch.device("cpu"))
    return model
