"""Resumable learner checkpoints and Hugging Face exports.

A checkpoint directory holds:

* ``deepspeed/`` — DeepSpeed's own state (module, optimizer and LR-scheduler state, ZeRO shards),
  written collectively by every rank with ``engine.save_checkpoint``;
* ``rng/rank{r}.pt`` — each rank's python, numpy and torch (CPU and CUDA) RNG states;
* the caller's ``client_state`` (global step, :class:`DataPosition`, anything picklable), stored by
  DeepSpeed next to its state and handed back by :func:`load_checkpoint`.

An export (:func:`export_hf`) is a plain Hugging Face model directory: full weights written with
``save_pretrained`` plus every processor/tokenizer file of the source model directory, so
``from_pretrained`` (and vLLM) load it like the original checkpoint.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_DS_DIR = "deepspeed"
_DS_TAG = "state"
# Files of a model directory that save_pretrained writes itself (everything else is copied).
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_MODEL_FILE_NAMES = {"config.json", "generation_config.json", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class DataPosition:
    """Where a pass over a dataset of ``batches_per_epoch`` batches stands: the next batch to train on.

    Stored in ``client_state`` so a resumed run trains on exactly the batches it had not trained
    on. ``advance`` rolls ``(epoch, batches_per_epoch)`` over to ``(epoch + 1, 0)``, so a checkpoint
    taken right after the last batch of an epoch resumes at the next epoch's first batch instead of
    finding "no batches left" (verl PR 5725).
    """

    epoch: int = 0
    batch: int = 0

    def advance(self, batches_per_epoch: int) -> DataPosition:
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        if self.batch + 1 >= batches_per_epoch:
            return DataPosition(self.epoch + 1, 0)
        return DataPosition(self.epoch, self.batch + 1)


def capture_rng() -> dict[str, Any]:
    """The python, numpy and torch RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine: Any, directory: str | Path, rank: int, client_state: dict[str, Any]) -> None:
    """Collective: every rank calls it with the same ``directory`` and ``client_state``."""
    root = Path(directory)
    (root / "rng").mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(root / _DS_DIR), tag=_DS_TAG, client_state={"client_state": client_state})
    torch.save(capture_rng(), root / "rng" / f"rank{rank}.pt")


def load_checkpoint(engine: Any, directory: str | Path, rank: int) -> dict[str, Any]:
    """Collective: restore module, optimizer, scheduler and this rank's RNG; return the client state."""
    root = Path(directory)
    rng_file = root / "rng" / f"rank{rank}.pt"
    if not (root / _DS_DIR / _DS_TAG).is_dir() or not rng_file.exists():
        raise FileNotFoundError(f"{root} is not a learner checkpoint of this world size (missing "
                                f"{_DS_DIR}/{_DS_TAG} or rng/rank{rank}.pt)")
    path, ds_client_state = engine.load_checkpoint(str(root / _DS_DIR), tag=_DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {root / _DS_DIR}")
    # weights_only=False: the states hold numpy arrays and python tuples; the file is our own.
    restore_rng(torch.load(rng_file, weights_only=False))
    return ds_client_state["client_state"]


def export_hf(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source_dir: str | Path,
              out_dir: str | Path) -> Path:
    """Write ``state_dict`` as a Hugging Face model directory and copy the source's processor files.

    ``model`` provides the class, config and generation config (its own parameters may be
    partitioned: only ``state_dict`` is written).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    for item in Path(source_dir).iterdir():
        if item.is_file() and item.name not in _MODEL_FILE_NAMES and not item.name.endswith(_MODEL_FILE_SUFFIXES):
            shutil.copy2(item, out / item.name)
    return out
