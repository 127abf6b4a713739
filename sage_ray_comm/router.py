"""The router: one named Ray actor per bus, holding the registry.

The router knows which services exist, their replicas (node, request queue,
functions, liveness, load) and the topic subscriptions. It is **not** on the
data path: clients keep a cached copy of the registry, kept fresh by a long
poll (:meth:`_RouterActor.wait_for_change`), and call replicas directly.

Pure logic (the :class:`Registry`; NATS-style :func:`topic_matches` is
topics.py's, re-exported) lives here without Ray, so it is unit-tested on its own; :class:`_RouterActor` wraps
it in an async Ray actor named ``sage:<bus>:router`` in the Ray namespace
``sage_ray_comm``, so every job on the cluster finds the same router.

>>> r = Registry("demo")
>>> topic_matches("sensor.*.temp", "sensor.kitchen.temp"), topic_matches("sensor.>", "sensor")
(True, False)
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import time
from typing import Any

from . import shm
from ._ray import RouterClient, get_or_create_actor, head_node_id
from .errors import InvalidBusName, NameConflict, RouterUnavailable
from .names import router_name
from .topics import topic_matches, validate_pattern, validate_topic

__all__ = [
    "ROUTER_NAMESPACE",
    "FunctionInfo",
    "InstanceInfo",
    "Registry",
    "Subscription",
    "get_router",
    "router_client",
    "router_name",
    "topic_matches",
    "validate_pattern",
    "validate_topic",
]

ROUTER_NAMESPACE = "sage_ray_comm"
# An instance that has not sent a heartbeat for this long is dropped.
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_GRACE = 2.0
# A replica that died while Ray may restart it is listed as restarting until
# it registers again, Ray says it is dead for good, or this long: a call to a
# service with no live replica waits for it, up to its own timeout, instead
# of failing at once (as Ray Serve's handles wait for a recovering replica).
RESTART_GRACE = 60.0

_BUS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def validate_bus_name(name: str) -> str:
    if not isinstance(name, str) or not _BUS_NAME.match(name):
        raise InvalidBusName(f"bus name must be 1-100 characters of letters, digits, '_', '.', '-', got {name!r}")
    return name


def bus_namespace(bus: str) -> str:
    """The shared-memory namespace of a bus: its rings are invisible to other buses."""
    return f"bus.{bus}"


# ---------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class FunctionInfo:
    """One exposed function of a service."""

    name: str
    timeout: float | None  # None: the caller's default
    idempotent: bool = False
    is_async: bool = False
    signature: str = ""
    pattern: str = "request_response"
    stream: bool = False  # a generator function: read it with client.stream()


@dataclasses.dataclass(frozen=True)
class InstanceInfo:
    """One replica of a service, as registered."""

    service: str
    instance_id: str
    class_id: str
    node_id: str | None
    host_id: str
    pid: int
    pid_start: int
    request_queue: str  # ring name in the bus namespace
    functions: dict[str, FunctionInfo]
    actor_name: str | None = None
    replica_index: int = 0
    max_concurrency: int = 1
    policy: str = "least_outstanding"  # routing.DEFAULT_POLICY (routing imports this module)
    started_at: float = 0.0
    code_id: str = ""  # fingerprint of the class's code: a changed class replaces, an identical one is kept


@dataclasses.dataclass(frozen=True)
class Subscription:
    """A subscriber: a ring on some node, fed every event whose topic matches ``pattern``.

    Subscriptions with a ``group`` (a service's replicas) share the events:
    each event goes to one member of the group, like NATS queue groups.
    """

    sub_id: str
    pattern: str
    queue: str  # ring name in the bus namespace
    node_id: str | None
    host_id: str
    pid: int
    pid_start: int
    group: str | None = None
    function: str | None = None  # the subscriber method of a service, None for a callback inbox


class Registry:
    """The router's state, without Ray: services, replicas, subscriptions.

    Every change bumps :attr:`version`; :meth:`snapshot` is what clients cache.
    """

    def __init__(self, bus: str) -> None:
        self.bus = bus
        self.started_at = time.time()  # a restarted router has a new one: clients re-subscribe
        self.version = 0
        self.services: dict[str, dict[str, InstanceInfo]] = {}
        self.class_ids: dict[str, str] = {}
        self.last_seen: dict[str, float] = {}
        self.load: dict[str, dict] = {}
        self.subs: dict[str, Subscription] = {}
        # Legacy queues by name: {"ring", "node_id", "host_id", "pid"} of the first opener.
        self.queues: dict[str, dict] = {}
        # Replicas that died and that Ray may be restarting: service -> {actor name: listed until}.
        self.restarting: dict[str, dict[str, float]] = {}

    def _bump(self) -> int:
        self.version += 1
        return self.version

    def register(self, inst: InstanceInfo, replace: bool = False, now: float | None = None) -> int:
        """Adds a replica. A different class under a taken name raises NameConflict,
        unless ``replace``: then the old class's replicas are dropped."""
        taken = self.class_ids.get(inst.service)
        live = self.services.get(inst.service)
        if taken is not None and taken != inst.class_id and live:
            if not replace:
                raise NameConflict(
                    f"service name '{inst.service}' on bus '{self.bus}' is taken by class {taken} "
                    f"({len(live)} replica(s)); cannot register class {inst.class_id} under it "
                    "(stop the old service, pick another name, or deploy with replace=True)"
                )
            for iid in list(live):
                self._drop_instance(iid)
        self.class_ids[inst.service] = inst.class_id
        self.services.setdefault(inst.service, {})[inst.instance_id] = inst
        self._unlist_restart(inst.service, inst.actor_name)  # it is back
        self.last_seen[inst.instance_id] = now if now is not None else time.time()
        return self._bump()

    def _unlist_restart(self, service: str, actor_name: str | None) -> None:
        names = self.restarting.get(service)
        if names is not None and names.pop(actor_name or "", None) is not None and not names:
            del self.restarting[service]

    def _drop_instance(self, instance_id: str, died: bool = False, now: float | None = None) -> InstanceInfo | None:
        """Removes a replica; one that ``died`` with an actor Ray may restart
        is listed as restarting (see RESTART_GRACE)."""
        for name, insts in list(self.services.items()):
            inst = insts.pop(instance_id, None)
            if inst is not None:
                if died and inst.actor_name:
                    until = (now if now is not None else time.time()) + RESTART_GRACE
                    self.restarting.setdefault(name, {})[inst.actor_name] = until
                else:
                    self._unlist_restart(name, inst.actor_name)
                if not insts:
                    del self.services[name]
                    self.class_ids.pop(name, None)
                self.last_seen.pop(instance_id, None)
                self.load.pop(instance_id, None)
                for sid in [s.sub_id for s in self.subs.values() if s.sub_id.startswith(instance_id + "/")]:
                    del self.subs[sid]
                return inst
        return None

    def deregister(self, instance_id: str, died: bool = False, now: float | None = None) -> bool:
        """Removes a replica (and its subscriptions); False if it was unknown.
        ``died``: it did not stop but died, and Ray may restart it (it is
        listed as restarting until it registers again, see :meth:`settle_restarts`)."""
        if self._drop_instance(instance_id, died, now) is None:
            return False
        self._bump()
        return True

    def settle_restarts(self, gone: Any, now: float | None = None) -> int:
        """Unlists the restarting replicas whose time is up, or whose actor
        ``gone(actor_name)`` says is dead for good (no restarts left, or
        killed: the router's probe, _RouterActor._gone_for_good). How many."""
        now = now if now is not None else time.time()
        done = [(s, a) for s, names in self.restarting.items() for a, until in names.items() if until < now or gone(a)]
        for service, actor_name in done:
            self._unlist_restart(service, actor_name)
        if done:
            self._bump()
        return len(done)

    def heartbeat(self, instance_id: str, load: dict | None = None, now: float | None = None) -> bool:
        """Marks a replica alive; False if unknown (the router restarted: re-register)."""
        if not any(instance_id in insts for insts in self.services.values()):
            return False
        self.last_seen[instance_id] = now if now is not None else time.time()
        if load is not None:
            self.load[instance_id] = load
        return True

    def expire(self, grace: float = HEARTBEAT_GRACE, now: float | None = None, alive: Any = None) -> list[InstanceInfo]:
        """Drops replicas that are gone; returns them.

        ``alive(instance)`` answers True or False where it can tell (a process
        on the router's machine), and None where it cannot; only then does
        heartbeat silence of more than ``grace`` seconds count. (A live but busy
        replica whose heartbeat is late is never dropped for it.)
        """
        now = now if now is not None else time.time()
        gone = []
        for insts in self.services.values():
            for i in insts.values():
                verdict = alive(i) if alive is not None else None
                if verdict is False or (verdict is None and now - self.last_seen.get(i.instance_id, now) > grace):
                    gone.append(i.instance_id)
        dropped = [i for i in (self._drop_instance(iid, True, now) for iid in gone) if i is not None]
        if dropped:
            self._bump()
        return dropped

    def subscribe(self, sub: Subscription) -> int:
        validate_pattern(sub.pattern)
        self.subs[sub.sub_id] = sub
        return self._bump()

    def unsubscribe(self, sub_id: str) -> bool:
        if self.subs.pop(sub_id, None) is None:
            return False
        self._bump()
        return True

    def drop_subscriber_process(self, host_id: str, pid: int) -> int:
        """Removes every callback subscription of one process (it closed or died)."""
        gone = [s.sub_id for s in self.subs.values() if s.host_id == host_id and s.pid == pid and s.group is None]
        for sid in gone:
            del self.subs[sid]
        if gone:
            self._bump()
        return len(gone)

    def register_queue(self, name: str, info: dict) -> dict:
        """Records a legacy queue name (first registration wins); returns the record."""
        if name not in self.queues:
            self.queues[name] = dict(info)
            self._bump()
        return self.queues[name]

    def unregister_queue(self, name: str) -> bool:
        if self.queues.pop(name, None) is None:
            return False
        self._bump()
        return True

    def snapshot(self) -> dict:
        """What clients cache: plain data, picklable."""
        return {
            "started_at": self.started_at,
            "queues": dict(self.queues),
            "bus": self.bus,
            "version": self.version,
            "services": {n: dict(insts) for n, insts in self.services.items()},
            "subscriptions": list(self.subs.values()),
            "last_seen": dict(self.last_seen),
            "load": dict(self.load),
            "restarting": {n: sorted(names) for n, names in self.restarting.items()},
        }


# ------------------------------------------------------------ router actor
class _RouterActor:
    """Async Ray actor around a :class:`Registry` (see :func:`get_router`)."""

    def __init__(self, bus: str, check_pids: bool = True) -> None:
        # Off, death is learnt from Ray (watch()) and heartbeats alone: the
        # tests switch it off to check those paths on their own.
        self.check_pids = check_pids
        self.reg = Registry(bus)
        self.started_at = self.reg.started_at
        self.host_id = shm.host_id()
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()  # where it runs (get_router places it)
        self._changed: asyncio.Condition | None = None
        self._reaper: asyncio.Task | None = None
        self._watches: dict[str, asyncio.Task] = {}
        self._probes: dict[str, Any] = {}  # actor name -> a pending __ray_ready__ call (_gone_for_good)

    def _cond(self) -> asyncio.Condition:
        # Created lazily: the actor's event loop does not exist in __init__.
        if self._changed is None:
            self._changed = asyncio.Condition()
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        return self._changed

    async def _notify(self) -> None:
        c = self._cond()
        async with c:
            c.notify_all()

    def _alive_here(self, inst: InstanceInfo) -> bool | None:
        # A replica on this router's machine: its process is checked directly.
        if not self.check_pids or inst.host_id != self.host_id:
            return None
        return shm.process_alive(inst.pid, inst.pid_start)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL / 2)
            changed = bool(self.reg.expire(alive=self._alive_here))
            if self.reg.restarting or self._probes:
                names = {a for names in self.reg.restarting.values() for a in names}
                gone = await asyncio.to_thread(self._gone_for_good, names)  # Ray calls: off the loop
                changed = self.reg.settle_restarts(gone.__contains__) > 0 or changed
            if changed:
                await self._notify()

    async def _watch(self, inst: InstanceInfo) -> None:
        """Waits on a replica actor's `watch()` call: Ray fails it with
        ActorDiedError the moment the actor dies (Ray's own actor state), and
        it returns when the replica stops. Other errors (the actor is briefly
        unreachable under load) are not taken as death: the call is renewed."""
        import ray

        name = inst.actor_name
        if not name:  # an in-process service: heartbeats alone tell
            return
        restarting = False
        while inst.instance_id in self._watches:
            try:
                handle = ray.get_actor(name, namespace=ROUTER_NAMESPACE)
                await handle.watch.remote()
                break  # it stopped
            except (ray.exceptions.ActorDiedError, ValueError):
                break  # dead for good, or its name is gone
            except Exception:  # ActorUnavailableError while Ray restarts it; or unreachable under load
                if self._alive_here(inst) is False:
                    restarting = True  # its process died: Ray may be restarting it (settled in _reap)
                    break
                await asyncio.sleep(HEARTBEAT_INTERVAL)
        self._watches.pop(inst.instance_id, None)
        if self.reg.deregister(inst.instance_id, restarting):
            await self._notify()

    def _gone_for_good(self, actor_names: set[str]) -> set[str]:
        """Which of the replica actors listed as restarting are dead for good.
        Each gets a probe, a call of Ray's ``__ray_ready__``: Ray fails it with
        ActorDiedError once the actor has no restarts left (or was killed),
        and with ActorUnavailableError while it restarts (probed again later)."""
        import ray

        for name in set(self._probes) - actor_names:
            del self._probes[name]  # back, or unlisted: its answer no longer matters
        gone = set()
        for name in actor_names:
            ref = self._probes.get(name)
            if ref is None:
                try:
                    ref = self._probes[name] = ray.get_actor(name, namespace=ROUTER_NAMESPACE).__ray_ready__.remote()
                except ValueError:
                    gone.add(name)  # its name is free: no actor to restart
                    continue
            if not ray.wait([ref], timeout=0)[0]:
                continue  # no answer yet
            del self._probes[name]
            try:
                ray.get(ref)
            except ray.exceptions.ActorDiedError:
                gone.add(name)
            except Exception:
                pass  # restarting: probed again at the next look
        return gone

    async def ping(self) -> dict:
        self._cond()
        return {
            "bus": self.reg.bus,
            "version": self.reg.version,
            "started_at": self.started_at,
            "check_pids": self.check_pids,
            "node_id": self.node_id,
        }

    async def register(self, inst: InstanceInfo, replace: bool = False) -> int:
        v = self.reg.register(inst, replace)
        if inst.actor_name and inst.instance_id not in self._watches:
            self._watches[inst.instance_id] = asyncio.get_running_loop().create_task(self._watch(inst))
        await self._notify()
        return v

    async def deregister(self, instance_id: str) -> bool:
        ok = self.reg.deregister(instance_id)
        await self._notify()
        return ok

    async def heartbeat(self, instance_id: str, load: dict | None = None) -> bool:
        self._cond()
        return self.reg.heartbeat(instance_id, load)

    async def subscribe(self, sub: Subscription) -> int:
        v = self.reg.subscribe(sub)
        await self._notify()
        return v

    async def unsubscribe(self, sub_id: str) -> bool:
        ok = self.reg.unsubscribe(sub_id)
        await self._notify()
        return ok

    async def drop_subscriber_process(self, host_id: str, pid: int) -> int:
        n = self.reg.drop_subscriber_process(host_id, pid)
        await self._notify()
        return n

    async def snapshot(self) -> dict:
        self._cond()
        return self.reg.snapshot()

    async def register_queue(self, name: str, info: dict) -> dict:
        rec = self.reg.register_queue(name, info)
        await self._notify()
        return rec

    async def unregister_queue(self, name: str) -> bool:
        ok = self.reg.unregister_queue(name)
        await self._notify()
        return ok

    async def wait_for_change(self, version: int, timeout: float) -> dict | None:
        """Long poll: the snapshot as soon as the version passes ``version``;
        None after ``timeout`` seconds without a change."""
        c = self._cond()
        if self.reg.version != version:
            return self.reg.snapshot()
        async with c:
            try:
                await asyncio.wait_for(c.wait_for(lambda: self.reg.version != version), timeout)
            except asyncio.TimeoutError:
                return None
        return self.reg.snapshot()


def get_router(bus: str, create: bool = True, check_pids: bool | None = None) -> Any:
    """The router actor of ``bus``, created if missing (race-safe across processes).

    ``check_pids`` (when this call creates it): whether the router also
    checks the processes of replicas on its own machine; default
    ``$SAGE_COMM_ROUTER_PID_CHECK`` (``0`` turns it off), else on.
    Ray must be initialized. Raises RouterUnavailable if it cannot be found or made.
    """
    if check_pids is None:
        check_pids = os.environ.get("SAGE_COMM_ROUTER_PID_CHECK", "1") != "0"
    import ray

    if not ray.is_initialized():
        raise RouterUnavailable(f"bus '{bus}': Ray is not initialized (call ray.init() or bus.start())")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = router_name(bus)
    try:
        return ray.get_actor(name, namespace=ROUTER_NAMESPACE)  # the common case: it exists
    except ValueError as e:
        if not create:
            raise RouterUnavailable(f"cannot find or create the router '{name}' of bus '{bus}': {e}") from None
    head = head_node_id()
    try:
        return get_or_create_actor(
            _RouterActor,
            name,
            ROUTER_NAMESPACE,
            (bus, check_pids),
            create=create,
            num_cpus=0,
            max_concurrency=10_000,
            max_restarts=-1,
            # A bus outlives the process that happened to create it (like
            # Ray Serve's controller); CommunicationBus.shutdown() ends it.
            lifetime="detached",
            # On the head node, as Ray Serve keeps its controller: Ray's default
            # could put it on any worker, and losing that node would restart
            # it empty (callers then see ServiceNotFound until replicas
            # re-register). (The head going takes the cluster anyway.)
            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)
            if head is not None
            else NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
        )
    except ValueError as last:
        raise RouterUnavailable(f"cannot find or create the router '{name}' of bus '{bus}': {last}") from None


def router_client(bus: str, create: bool = True, check_pids: bool | None = None) -> RouterClient:
    """:class:`RouterClient` for the router of ``bus`` (see :func:`get_router`)."""
    return RouterClient(get_router(bus, create=create, check_pids=check_pids))


def code_id_of(cls: type) -> str:
    """A fingerprint of a class's code (methods' bytecode and constants), stable
    across processes and with no source file needed (notebook cells)."""
    import hashlib
    import types

    h = hashlib.blake2b(digest_size=8)

    def feed(code: types.CodeType) -> None:
        h.update(code.co_code)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                feed(c)
            else:
                h.update(repr(c).encode())
        h.update(" ".join(code.co_names).encode())

    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("sage_ray_comm."):
            continue
        for name in sorted(vars(klass)):
            fn = vars(klass)[name]
            fn = getattr(fn, "__func__", fn)
            code = getattr(fn, "__code__", None)
            if code is not None:
                h.update(name.encode())
                feed(code)
    return h.hexdigest()


def class_id_of(cls: type) -> str:
    """A service class's identity across redefinitions (a notebook re-running its cell)."""
    return f"{cls.__module__}:{cls.__qualname__}"
