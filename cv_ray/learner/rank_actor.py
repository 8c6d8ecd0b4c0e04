"""The Ray actor of one learner rank: joins the torch.distributed group, then hosts a RankTrainer.

A thin shell: it sets the environment that plain torch.distributed / DeepSpeed code reads
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), initialises the process
group (NCCL on GPU, gloo on CPU) and forwards each call to :class:`cv_ray.learner.rank_trainer.RankTrainer`.
Ray gives each GPU rank its own ``CUDA_VISIBLE_DEVICES``, so every rank's device is ``cuda:0`` and
``LOCAL_RANK`` is 0. Created and driven only by :class:`cv_ray.learner.group.LearnerGroup`.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import ray

from cv_ray.learner.config import LearnerConfig
from cv_ray.models import ModelRef


@ray.remote
class LearnerRank:
    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1
        self.trainer = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port for the group's rendezvous (asked of rank 0)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int, model: ModelRef,
              cfg: LearnerConfig, total_steps: int, seed: int, temperature: float) -> None:
        """Join the process group as ``rank`` of ``world_size`` and build this rank's engines."""
        self.rank, self.world_size = rank, world_size
        from cv_ray.learner.deepspeed_ops import use_venv_extension_cache

        use_venv_extension_cache()  # before DeepSpeed starts its backend (which loads its built op)
        import deepspeed
        import torch

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        backend = "nccl" if cfg.gpus_per_rank > 0 and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)

        from cv_ray.learner.rank_trainer import RankTrainer

        self.trainer = RankTrainer(model, cfg, self.rank, self.world_size, total_steps, seed, temperature)

    def compute_logprobs(self, samples, which: str):
        return self.trainer.compute_logprobs(samples, which)

    def sft_step(self, samples, denominator: float) -> dict[str, Any]:
        return self.trainer.sft_step(samples, denominator)

    def rl_update(self, samples, denominator: float) -> dict[str, Any]:
        return self.trainer.rl_update(samples, denominator)

    def gather_weights(self, trainable_only: bool = False):
        return self.trainer.gather_weights(trainable_only)

    def weight_metadata(self):
        return self.trainer.weight_metadata()

    def open_weight_sender(self, master_address: str, master_port: int, world_size: int, bucket_bytes: int) -> None:
        self.trainer.open_weight_sender(master_address, master_port, world_size, bucket_bytes)

    def broadcast_weights(self, metadata) -> int:
        return self.trainer.broadcast_weights(metadata)

    def ipc_weight_handles(self):
        return self.trainer.ipc_weight_handles()

    def gpu_uuid(self) -> str | None:
        return self.trainer.gpu_uuid()

    def save_checkpoint(self, directory: str, client_state: dict[str, Any]) -> None:
        self.trainer.save_checkpoint(directory, client_state)

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        return self.trainer.load_checkpoint(directory)

    def export_hf(self, directory: str):
        return self.trainer.export_hf(directory)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self.trainer is not None:
            self.trainer.close_weight_sender()
        self.trainer = None
        if dist.is_initialized():
            dist.destroy_process_group()
