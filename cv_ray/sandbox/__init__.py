"""Isolated execution of model-written image code: the pool, the Ray executor actor and its group.

Exports are resolved lazily so that the sandbox zygote, which imports ``cv_ray.sandbox.runner``,
does not pull in Ray or the pool machinery.
"""

from __future__ import annotations

from typing import Any

from cv_ray.types import ExecResult

__all__ = ["ExecResult", "SandboxExecutor", "SandboxGroup", "SandboxPool", "SandboxUnavailable"]


def __getattr__(name: str) -> Any:
    if name in ("SandboxPool", "SandboxUnavailable"):
        from cv_ray.sandbox import pool

        return getattr(pool, name)
    if name in ("SandboxExecutor", "SandboxGroup"):
        from cv_ray.sandbox import executor

        return getattr(executor, name)
    raise AttributeError(f"module 'cv_ray.sandbox' has no attribute {name!r}")
