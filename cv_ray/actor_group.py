"""One shape for every group of Ray actors: create them, call them all, shut them all down.

Each role (rollout workers, sandbox executors, reward workers, learner ranks) is a small class on
top of an :class:`ActorGroup`; the role says *what* to call, the group says *how* a fixed set of
actors is created, placed, reached and ended. A group is a context manager, so a stage that fails
half-way never leaves actors behind::

    with ActorGroup(RewardWorker, count=2, args=(cfg,), options=lambda i: {"num_cpus": 1}) as group:
        refs = group.each(lambda actor: actor.stats.remote())          # one call on every actor
        refs = group.zip(lambda actor, shard: actor.score.remote(shard), shards)

Methods are reached through the actor handles themselves (``actor.method.remote(...)``), never by
name, so a renamed method breaks at import time in the editor rather than mid-run.

``placement`` (a :class:`~cv_ray.placement.GroupPlacement`, the pure plan of ``cv_ray/placement.py``)
places the actors in a placement group created here (and removed at shutdown): actor ``i`` takes
bundle ``placement.actor_bundle[i]`` with ``placement.actor_options[i]``. The group's ``on_shutdown``
runs a graceful call on each live actor (bounded by ``shutdown_timeout_s``) before the actors are
killed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import ray

from cv_ray.placement import GroupPlacement

log = logging.getLogger(__name__)

T = TypeVar("T")
Handle = Any  # a Ray actor handle
Ref = Any  # a Ray ObjectRef

#: Failures that mean "the actor is gone", when a graceful shutdown call reaches a dead actor.
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class ActorGroup(Generic[T]):
    def __init__(self, actor_cls: Any, count: int, *, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                 options: Callable[[int], dict[str, Any]] | None = None, placement: GroupPlacement | None = None,
                 on_shutdown: Callable[[Handle], Ref] | None = None, shutdown_timeout_s: float = 30.0,
                 name: str = "") -> None:
        """Start ``count`` actors of ``actor_cls`` (a ``@ray.remote`` class) with ``args``/``kwargs``.

        ``options(i)``: the ``.options(...)`` of actor ``i`` (resources, concurrency, restarts).
        ``placement``: a placement group to create and place the actors in (its per-actor resources
        override ``options``).
        """
        if count < 1:
            raise ValueError(f"an actor group needs at least one actor, got {count}")
        self.name = name or getattr(actor_cls, "__name__", "actors")
        self._on_shutdown = on_shutdown
        self._shutdown_timeout_s = shutdown_timeout_s
        self.placement_group = None
        self._actors: list[Handle] = []
        if placement is not None:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            if len(placement.actor_bundle) != count:
                raise ValueError(f"{self.name}: a placement for {len(placement.actor_bundle)} actors, not {count}")
            self.placement_group = placement_group(list(placement.bundles), strategy=placement.strategy)
            ray.get(self.placement_group.ready())
        try:
            for i in range(count):
                opts = dict(options(i)) if options else {}
                if placement is not None:
                    opts.update(placement.actor_options[i])
                    opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.placement_group,
                                                                                   placement.actor_bundle[i])
                self._actors.append(actor_cls.options(**opts).remote(*args, **(kwargs or {})))
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------------------------ calls

    @property
    def actors(self) -> list[Handle]:
        """The live actor handles, in creation order (empty after shutdown)."""
        return list(self._actors)

    def __len__(self) -> int:
        return len(self._actors)

    def __getitem__(self, index: int) -> Handle:
        return self._actors[index]

    def each(self, call: Callable[[Handle], Ref]) -> list[Ref]:
        """``call(actor)`` on every actor (e.g. ``lambda a: a.health.remote()``); the refs in actor order."""
        return [call(actor) for actor in self._live()]

    def zip(self, call: Callable[[Handle, Any], Ref], items: Sequence[Any]) -> list[Ref]:
        """``call(actor_i, items[i])`` for every actor; ``items`` has one entry per actor."""
        actors = self._live()
        if len(items) != len(actors):
            raise ValueError(f"{self.name}: {len(items)} items for {len(actors)} actors")
        return [call(actor, item) for actor, item in zip(actors, items)]

    def get(self, refs: Sequence[Ref], timeout: float | None = None) -> list[Any]:
        """``ray.get`` of refs made by :meth:`each` / :meth:`zip`."""
        return ray.get(list(refs), timeout=timeout)

    def _live(self) -> list[Handle]:
        if not self._actors:
            raise RuntimeError(f"{self.name}: the group was shut down")
        return self._actors

    # --------------------------------------------------------------------------------- lifecycle

    def shutdown(self) -> None:
        """End every actor (after its graceful call, if any) and remove the placement group. Idempotent."""
        actors, self._actors = self._actors, []
        if actors and self._on_shutdown is not None:
            refs = []
            for actor in actors:
                try:
                    refs.append(self._on_shutdown(actor))
                except ACTOR_GONE as exc:  # trust boundary: a dead actor has nothing left to close
                    log.warning("%s: an actor was already gone at shutdown: %s", self.name, exc)
            for ref in refs:
                try:
                    ray.get(ref, timeout=self._shutdown_timeout_s)
                except ACTOR_GONE as exc:
                    log.warning("%s: an actor was already gone at shutdown: %s", self.name, exc)
                except ray.exceptions.GetTimeoutError:
                    log.warning("%s: an actor's shutdown call took over %.0f s; killing it",
                                self.name, self._shutdown_timeout_s)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        _wait_until_dead(actors, self.name)
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None

    def __enter__(self) -> ActorGroup[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


class GroupShell:
    """Mixin for the role classes: context-manager support over their own ``shutdown``."""

    def shutdown(self) -> None:  # pragma: no cover - every role defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _wait_until_dead(actors: Sequence[Handle], name: str, timeout_s: float = 30.0) -> None:
    """Return once Ray reports every one of ``actors`` dead (``ray.kill`` only asks), so the resources
    they held are free for whatever starts next and no caller counts a dying actor as alive."""
    import time

    from ray._private import state  # the GCS actor table (ray.util.state needs the dashboard)

    pending = {actor._actor_id.hex() for actor in actors}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        pending = {a for a in pending if state.actors(actor_id=a).get("State") not in ("DEAD", None)}
        if pending:
            time.sleep(0.05)
    if pending:
        log.warning("%s: %d actor(s) not reported dead %.0f s after being killed", name, len(pending), timeout_s)


def live_actors(job_only: bool = True) -> list[dict[str, Any]]:
    """The actors Ray reports alive (``class_name``, ``actor_id``), of this driver's job by default.

    Reads the cluster's actor table from the GCS directly: Ray's public state API needs the dashboard
    process, which cv_ray's local clusters do not start. Used by tests and stage summaries to check that
    no actor outlives its stage.
    """
    from ray._private import state  # the GCS actor table (ray.util.state needs the dashboard)

    job = ray.get_runtime_context().get_job_id() if job_only else None
    alive = []
    for actor_id, info in state.actors().items():
        if info.get("State") != "ALIVE":
            continue
        if job is not None and info.get("JobID") != job:
            continue
        alive.append({"actor_id": actor_id, "class_name": info.get("ActorClassName", "")})
    return alive
