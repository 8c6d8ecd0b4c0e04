"""Ray start-up: a local cluster by default, an existing one through RAY_ADDRESS.

`ray job submit` sets RAY_ADDRESS for the driver, so the same `cv-ray` command runs on a laptop
and on a cluster. On small machines `num_cpus` may overcommit the cores so that every actor group
(rollout, sandbox, reward, learner) can be scheduled; Ray then simply time-shares the cores.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# Ray workers inherit these so numeric libraries do not oversubscribe small machines.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}


def init_ray(num_cpus: int = 0, address: str | None = None, namespace: str = "cv_ray") -> dict:
    """Connect to (or start) Ray once per process and return the cluster's resources.

    ``address`` (or the ``RAY_ADDRESS`` environment variable) joins an existing cluster; otherwise
    a local one is started with ``num_cpus`` logical CPUs (0: one per core).
    """
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        runtime_env = {"env_vars": dict(_WORKER_ENV)}
        if address:
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, namespace=namespace, runtime_env=runtime_env, log_to_driver=True)
        else:
            ray.init(
                num_cpus=num_cpus or None,
                namespace=namespace,
                include_dashboard=False,
                runtime_env=runtime_env,
                log_to_driver=True,
                configure_logging=False,
            )
    return ray.cluster_resources()
