"""Switches that turn the sandbox's protections off, for the escape suite's control runs only.

Every attack in ``tests/sandbox/test_escapes.py`` is run twice: against the real sandbox, where it
must fail, and against a pool with the protection it targets switched off, where it must succeed.
An attack that also fails in its control run fails for the wrong reason (a typo, a Python-level
guard it never got past) and proves nothing about the boundary.

Nothing in the configuration reaches these switches: ``SandboxConfig`` has no such field, so a
user's YAML, a Hydra override or the model's code cannot turn a protection off. Only a caller that
constructs a pool in Python with ``SandboxPool(cfg, _protections=Protections(...))`` can, and
only the tests do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Protections:
    kernel: bool = True
    """The kernel layers: namespaces (network, IPC, UTS, pid; user for a normal user), separate
    uids, rlimits, no-new-privs, capabilities cleared, seccomp. Off: the child runs with the
    zygote's privileges and limits (as root, root's)."""
    python_guards: bool = True
    """The Python-level guards: the restricted ``__import__`` and the ``os.system`` audit hook
    (conveniences for the model's error messages, not boundaries)."""
    clean_environment: bool = True
    """The zygote starts with an empty environment. Off: it inherits the caller's."""
    host_paths_hidden: bool = True
    """Module paths scrubbed in the zygote and host paths redacted from what the model reads."""
    parent_guards: bool = True
    """The trusted parent's own defences: replies parsed under limits, a child killed when its call
    ends, idle session children frozen."""

    def zygote_settings(self) -> dict[str, bool]:
        """The switches the zygote applies itself (sent in its start-up settings)."""
        return {k: v for k, v in asdict(self).items() if k in ("kernel", "python_guards", "host_paths_hidden")}

    @property
    def all_on(self) -> bool:
        return all(asdict(self).values())
