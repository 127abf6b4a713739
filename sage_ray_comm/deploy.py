"""Services as Ray actors: the replica actor, :class:`ServiceHandle`, and
``Cls.deploy()`` (see :meth:`BaseService.deploy`).

Each replica is a named Ray actor (``sage:<bus>:<service>#<n>``, as the
dashboard shows it) that builds the service inside the actor, so its state
(locks, files, loggers) is never pickled, and serves it with the same
runtime as an in-process service.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import lifecycle, shm
from ._ray import CONTROL_GROUP, CONTROL_THREADS, ensure_ray
from ._replica import DEFAULT_MAX_CONCURRENCY
from ._wire import ERR_UNAVAILABLE, decode_header, direct_reply, error_reply, frame_kind
from .endpoint import Endpoint
from .errors import InvalidServiceDefinition, NameConflict, SageCommError, ServiceUnavailable
from .names import actor_name
from .router import (
    ROUTER_NAMESPACE,
    InstanceInfo,
    bus_namespace,
    class_id_of,
    code_id_of,
    router_client,
    validate_bus_name,
)

if TYPE_CHECKING:
    from ._replica import Runtime
    from .service import BaseService

log = logging.getLogger(__name__)

# ray.kill() returns before the actor is dead: how long shutdown waits at
# least for the death, and how often it looks.
KILL_WAIT_SECONDS = 10.0
KILL_POLL_SECONDS = 0.01


class ServiceActor:
    """The Ray actor that hosts one replica. The user's class is built here,
    inside the actor, so its instances (locks, files, loggers) are never pickled."""

    def __init__(
        self,
        cls: type,
        args: tuple,
        kwargs: dict,
        bus: str,
        index: int,
        actor_name: str,
        replace: bool,
        code_id: str = "",
    ) -> None:
        import ray

        self._args = (cls, args, kwargs, bus, index, actor_name, replace, code_id)
        self.svc: BaseService | None = None
        self.rt: Runtime | None = None  # the runtime start() made; the service's own until it stops
        self._stopped = threading.Event()
        self._start_lock = threading.Lock()  # concurrent deployers call start() at once
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Ray restarted this replica (max_restarts): serve and register again.
            self.start()

    def start(self) -> InstanceInfo:
        cls, args, kwargs, bus, index, actor_name, replace, code_id = self._args
        with self._start_lock:
            if self.rt is None:
                svc = cls(*args, **kwargs)
                self.rt = svc.start_replica(bus, index, actor_name, replace, code_id)
                self.svc = svc
            return self.rt.info

    def watch(self) -> bool:
        """Returns when the replica stops; the router keeps one call pending, and
        Ray fails it the moment this actor dies."""
        self._stopped.wait()
        return True

    def stop(self) -> bool:
        self._stopped.set()
        if self.svc is not None:
            self.svc.stop()
        # This process exists for the replica: release every ring its handlers
        # made while calling out (call_service, other clients) before Ray kills it.
        Endpoint.close_all()
        return True

    def stats(self) -> dict:
        return self.svc.get_stats() if self.svc is not None else {"running": False}

    def handle(self, payload: bytes | tuple) -> bytes | tuple | None:
        """A request sent over Ray straight to this replica: a frame, or
        ``(frame, args, kwargs)`` when its args hold large buffers (see
        ``_wire.direct_payload`` and Runtime.handle_direct); the reply as
        ``_wire.direct_reply`` makes it."""
        return self.handle_many([payload])[0]

    def handle_many(self, frames: list) -> list:
        """Requests a caller queued while its earlier calls to this replica
        ran, in one Ray call: their replies, in order."""
        rt = self.rt if self.svc is not None and self.svc.is_running else None
        if rt is None:
            heads = [f[0] if type(f) is tuple else f for f in frames]
            return [
                error_reply(decode_header(f, frame_kind(f))[0].cid, ERR_UNAVAILABLE, "replica is not running")
                for f in heads
            ]
        return [None if rep is None else direct_reply(rep) for rep in rt.handle_direct(frames)]

    def cancel(self, keys: list, ttl: float) -> list[bool]:
        """Cancels calls of this replica's callers (``(reply ring, cid)``):
        True for each that will never run (see cancels.py)."""
        rt = self.rt
        return [False] * len(keys) if rt is None else [rt.calls.cancel(tuple(k), ttl) for k in keys]

    def hello(self, caller: str, lives: list) -> None:
        """A caller over Ray hands over its life (callers.py): an object it
        owns, which Ray fails when the caller dies. In a list, so Ray passes
        the reference, not the value."""
        rt = self.rt
        if rt is not None:
            rt.remote_callers.remember(caller, lives[0])

    def tell(self, keys: list, ttl: float) -> None:
        """Tells calls this replica already took (won their claim) that their
        callers cancelled them (cancels.CallRegistry.tell)."""
        rt = self.rt
        if rt is not None:
            for k in keys:
                rt.calls.tell(tuple(k), ttl)

    def pid(self) -> int:
        return os.getpid()


class ServiceHandle:
    """What :meth:`deploy` returns: the replicas of a deployed service.

    >>> handle = Calculator.deploy()       # doctest: +SKIP
    >>> handle.replicas, handle.instances[0].node_id   # doctest: +SKIP
    >>> handle.shutdown()                  # doctest: +SKIP
    """

    def __init__(self, name: str, bus: str, actors: list, infos: list[InstanceInfo], detached: bool = False) -> None:
        self.name = name
        self.bus = bus
        self.actors = actors
        self.instances = infos
        # lifetime="detached": the replicas outlive this process (and its job).
        self.detached = detached

    @property
    def replicas(self) -> int:
        return len(self.actors)

    def stats(self) -> list[dict]:
        import ray

        return ray.get([a.stats.remote() for a in self.actors], timeout=30)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops every replica (deregister, drain, cleanup, remove rings) and
        kills the actors, including incarnations Ray restarted since deploy;
        returns once they are dead (or after ``timeout`` and a grace for the
        kills), so no replica answers a call after it."""
        _stop_actors(self.actors, self.instances, self.bus, timeout)
        self.actors = []
        lifecycle.unregister(self, "deployments")
        if _DEPLOYED.get((self.bus, self.name)) is self:
            del _DEPLOYED[(self.bus, self.name)]

    def _close_at_exit(self) -> None:
        # Replicas owned by this process die with it (Ray kills an owner's
        # actors); stopping them first runs cleanup() and removes their rings.
        # Detached ones live on, unless the whole Ray instance ends with us.
        if not self.detached or lifecycle.owns_ray():
            self.shutdown(timeout=10.0)

    def __repr__(self) -> str:
        return f"ServiceHandle({self.name!r}, bus={self.bus!r}, replicas={self.replicas})"


# Deployed services stay up while this process lives, whether or not the
# caller keeps the handle (Ray would otherwise collect actors nobody refers to).
_DEPLOYED: dict[tuple, ServiceHandle] = {}


def deployed(bus: str | None = None) -> list[ServiceHandle]:
    """Handles of the services this process deployed (on ``bus``, or on all buses)."""
    return [h for (b, _), h in list(_DEPLOYED.items()) if bus is None or b == bus]


def _stop_actors(actors: list, infos: Sequence[InstanceInfo | None], bus: str, timeout: float) -> None:
    import ray

    end = time.monotonic() + timeout
    # Before anything stops: the incarnations the router lists under these
    # actors' names. Ray may have restarted a replica since ``infos`` was
    # taken, under a new instance id and a new ring.
    names = {i.actor_name for i in infos if i is not None and i.actor_name}
    router = None
    current: list[InstanceInfo] = []
    if names:
        try:
            router = router_client(bus, create=False)
            snap = router.snapshot()
            current = [i for insts in snap["services"].values() for i in insts.values() if i.actor_name in names]
        except Exception:
            pass  # no router: nothing is registered
    known = list({i.instance_id: i for i in [*infos, *current] if i is not None}.values())
    _ask_to_stop(actors, end)
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            pass
    # ray.kill() only asks: until the actor is dead, a replica that did not
    # stop (one Ray had restarted) would still answer calls. Ray marks it dead
    # before its process exits, so on this host the process is waited for too.
    dead_by = max(end, time.monotonic() + KILL_WAIT_SECONDS)
    _wait_dead(actors, dead_by)
    here = shm.host_id()
    procs = {(i.pid, i.pid_start) for i in known if i.host_id == here}
    while procs and time.monotonic() < dead_by:
        procs = {p for p in procs if shm.process_alive(*p)}
        if procs:
            time.sleep(KILL_POLL_SECONDS)
    # Whatever did not stop cleanly (killed, hung): deregister and remove its ring here.
    for info in known:
        if shm.unlink(shm.segment_name(bus_namespace(bus), info.request_queue)):
            try:
                router = router or router_client(bus, create=False)
                router.deregister(info.instance_id)
            except Exception:
                pass


def _ask_to_stop(actors: list, end: float) -> None:
    """Each replica's stop() (deregister, drain, cleanup), until ``end``. A
    replica Ray restarted can fail it with ActorUnavailableError while this
    process's handle catches up with the new incarnation: asked again."""
    import ray

    todo = list(actors)
    while todo:
        refs = {a.stop.remote(): a for a in todo}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=max(0.0, end - time.monotonic()))
        todo = []
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.ActorUnavailableError:
                todo.append(refs[ref])
            except Exception:
                pass  # dead, or its stop() failed: the kill ends it
        if todo and time.monotonic() < end:
            time.sleep(KILL_POLL_SECONDS)
        elif todo:
            return


def _wait_dead(actors: list, end: float) -> None:
    """Returns once Ray fails a call to each of ``actors`` with ActorDiedError
    (they were killed), or at ``end``."""
    import ray

    todo = list(actors)
    while todo and time.monotonic() < end:
        refs = {a.__ray_ready__.remote(): a for a in todo}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=max(0.0, end - time.monotonic()))
        todo = [refs[r] for r in refs if r not in ready]
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.ActorDiedError:
                continue
            except Exception:
                pass
            todo.append(refs[ref])  # the kill has not landed yet
        if todo:
            time.sleep(KILL_POLL_SECONDS)


def deploy_service(
    cls: type[BaseService],
    *args: Any,
    replicas: int | None = None,
    bus: str | None = None,
    replace: bool = False,
    **kwargs: Any,
) -> ServiceHandle:
    import ray

    ensure_ray()
    opts = dict(cls.__sage_options__)
    name = opts.pop("name", None) or cls.__name__
    n = int(replicas if replicas is not None else opts.pop("replicas", 1))
    opts.pop("replicas", None)
    bus = validate_bus_name(bus or opts.pop("bus", None) or "default")
    opts.pop("bus", None)
    for k in ("policy", "max_concurrency", "queue_bytes", "arena_bytes"):
        opts.pop(k, None)
    if n < 1:
        raise InvalidServiceDefinition(f"service '{name}' needs at least 1 replica, got {n}")
    # Actor threads: start, stop, stats, the router's pending watch() call, and
    # direct calls over Ray (when shared memory is short), one per handler thread.
    actor_opts = {
        "num_cpus": 0.1,
        **opts,
        "max_concurrency": 4 + int(cls.__sage_options__.get("max_concurrency") or DEFAULT_MAX_CONCURRENCY),
    }
    code = code_id_of(cls)
    router = router_client(bus)
    snap = router.snapshot()
    old = snap["services"].get(name, {})
    if old:
        old_class = next(iter(old.values())).class_id
        if old_class != class_id_of(cls) and not replace:
            raise NameConflict(
                f"service name '{name}' on bus '{bus}' is taken by class {old_class} ({len(old)} replica(s)); "
                f"cannot deploy class {class_id_of(cls)} under it (stop it first, or deploy(replace=True))"
            )
        # Replicas running other code (a notebook re-ran a changed cell), or
        # beyond the new count, are replaced; identical ones are kept, so
        # deploying the same service from many processes at once is idempotent.
        stale = [i for i in old.values() if i.code_id != code or i.class_id != class_id_of(cls) or i.replica_index > n]
        _stop_actors([a for a in (_named(i.actor_name) for i in stale) if a is not None], stale, bus, 30)

    def make(i: int) -> Any:
        an = actor_name(bus, name, i)
        return (
            # cancel() and tell() have threads of their own: they never queue behind the calls they cancel.
            ray.remote(concurrency_groups={CONTROL_GROUP: CONTROL_THREADS})(ServiceActor)  # type: ignore[call-overload]
            .options(name=an, namespace=ROUTER_NAMESPACE, get_if_exists=True, **actor_opts)
            .remote(cls, args, kwargs, bus, i, an, replace, code)
        )

    actors = [make(i) for i in range(1, n + 1)]
    infos: list[Any] = [None] * n
    try:
        for _ in range(5):
            todo = [i for i in range(n) if infos[i] is None or infos[i].code_id != code]
            if not todo:
                break
            results: list[Any] = []
            for idx in todo:
                try:
                    results.append(ray.get(actors[idx].start.remote(), timeout=120))
                except ray.exceptions.RayActorError:
                    results.append(None)  # another deployer was replacing it: make it again
            for idx, info in zip(todo, results, strict=True):
                if info is not None and info.code_id != code:
                    _stop_actors([actors[idx]], [info], bus, 10)  # an older version held the name
                    info = None
                if info is None:
                    actors[idx] = make(idx + 1)
                infos[idx] = info
        if any(i is None or i.code_id != code for i in infos):
            raise ServiceUnavailable(f"could not start the {n} replica(s) of service '{name}' on bus '{bus}'")
    except Exception as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, SageCommError):
            _stop_actors(actors, [], bus, 10)
            raise cause from None
        raise
    Endpoint.for_bus(bus).refresh()
    handle = _DEPLOYED[(bus, name)] = ServiceHandle(
        name, bus, actors, infos, detached=opts.get("lifetime") == "detached"
    )
    lifecycle.register(handle, "deployments", ServiceHandle._close_at_exit)
    lifecycle.note_bus(bus)
    return handle


def stop_registered_replicas(bus: str, snapshot: dict, timeout: float = 30.0) -> int:
    """Stops every replica actor registered on ``bus``, whoever deployed it
    (deregister, drain, cleanup, remove rings, kill); returns how many."""
    infos = [i for insts in snapshot["services"].values() for i in insts.values() if i.actor_name]
    actors = [(a, i) for a, i in ((_named(i.actor_name), i) for i in infos) if a is not None]
    if actors:
        _stop_actors([a for a, _ in actors], [i for _, i in actors], bus, timeout)
    return len(actors)


def _named(name: str | None) -> Any:
    import ray

    if not name:
        return None
    try:
        return ray.get_actor(name, namespace=ROUTER_NAMESPACE)
    except ValueError:
        return None
