"""FunctionClient: call services by name, in four patterns.

>>> client = FunctionClient()                                   # doctest: +SKIP
>>> client.call("calculator", "calculate", 42)                  # request-response
{'result': 84}
>>> fut = client.call_async("calculator", "add", 1, 2)          # a concurrent.futures.Future
>>> await client.acall("calculator", "calculate", 1)            # from async code
>>> client.send("logger", "write", "hello")                     # point-to-point, no reply
>>> client.broadcast("sensor.kitchen.temp", 21.5)               # publish-subscribe

Calls to a service with several replicas are load-balanced (``round_robin``
or ``least_outstanding``, same-node replicas first). The client never asks the
router on the way: it keeps the bus registry cached in the process (one
:class:`_Endpoint` per bus, shared by every client), kept fresh by a long poll
on the router, and refreshed at once when a name is not found.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from . import lifecycle, shm
from ._future import CallFuture
from ._wire import (
    OP_CALL,
    OP_EVENT,
    OP_SEND,
    Reply,
    Request,
    outcome,
)
from .errors import (
    CallTimeout,
    FunctionNotFound,
    InvalidCallArgument,
    InvalidSubscription,
    RouterUnavailable,
    SageCommError,
    ServiceNotFound,
    ServiceUnavailable,
    SharedMemoryFull,
)
from .message import envelope
from .metrics import recorder
from .queue import SageQueue
from .router import (
    HEARTBEAT_GRACE,
    InstanceInfo,
    Subscription,
    bus_namespace,
    get_router,
    topic_matches,
    validate_bus_name,
    validate_pattern,
    validate_topic,
)
from .transport import (
    EVENT_RING_BYTES,
    JANITOR_GRACE,
    DirectTransport,
    RayTransport,
    ShmTransport,
    Transport,
    check_shm_space,
    ensure_janitor,
    request_args,
    shm_warn_once,
    take_request,
)

__all__ = ["POLICIES", "FunctionClient", "ServiceCallMixin", "call_service", "call_service_async", "pick_instance"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
POLICIES = ("least_outstanding", "round_robin")
_MISSING = object()


# ------------------------------------------------------------ pure routing
def pick_instance(
    candidates: Sequence[InstanceInfo],
    policy: str,
    outstanding: dict[str, int],
    local_node: str | None,
    rr: Iterable[int],
    rng: random.Random = random,  # type: ignore[assignment]
) -> InstanceInfo:
    """Chooses a replica: same-node ones first, then by ``policy``.

    - ``round_robin``: the next replica in instance-id order.
    - ``least_outstanding``: power of two choices: two replicas at random,
      the one with fewer calls this process has in flight (ties: either).
    """
    local = [c for c in candidates if c.node_id == local_node]
    pool = sorted(local or candidates, key=lambda c: c.instance_id)
    if len(pool) == 1:
        return pool[0]
    if policy == "round_robin":
        return pool[next(iter(rr)) % len(pool)]
    a, b = rng.sample(pool, 2)
    oa, ob = outstanding.get(a.instance_id, 0), outstanding.get(b.instance_id, 0)
    return a if oa <= ob else b


# --------------------------------------------------------------- endpoint
class _Endpoint:
    """Per process and bus: the registry cache, transports, outstanding counts."""

    _by_bus: ClassVar[dict[str, _Endpoint]] = {}
    _lock = threading.Lock()

    @classmethod
    def for_bus(cls, bus: str) -> _Endpoint:
        ep = cls._by_bus.get(bus)
        if ep is not None and not ep.closed and ep._ray_alive():
            return ep
        with cls._lock:
            ep = cls._by_bus.get(bus)
            if ep is None or ep.closed or not ep._ray_alive():
                if ep is not None:
                    ep.close()
                ep = cls._by_bus[bus] = _Endpoint(bus)
            return ep

    def __init__(self, bus: str) -> None:
        import ray

        from .service import _ensure_ray

        _ensure_ray()
        self.bus = bus
        self.namespace = bus_namespace(bus)
        self.router = get_router(bus)
        self._ray_session = ray.get_runtime_context().get_job_id()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host_id = shm.host_id()
        self.shm = ShmTransport(self.namespace)
        self.ray = RayTransport(self.namespace)
        self.direct: Transport = DirectTransport(self.namespace)
        check_shm_space()  # a small /dev/shm (a container's 64 MiB) is said once, at start
        # False once this process could not make a reply ring (/dev/shm full):
        # its calls then go over Ray, straight to the replicas' actors.
        self.shm_ok = True
        self.snapshot: dict = {"version": -1, "services": {}, "subscriptions": [], "load": {}}
        self.outstanding: dict[str, int] = {}
        self.dead: set = set()  # instances seen dead here before the router dropped them
        self._live: dict[str, tuple] = {}
        self._gen = 0  # bumped whenever the registry or the dead set changes
        self._rebuild_until = 0.0
        self.my_subs: dict[str, Subscription] = {}  # this process's callback subscriptions
        self.rr: dict[str, Iterable[int]] = {}
        self.stats = {
            "calls": 0,
            "shm": 0,
            "ray": 0,
            "errors": 0,
            "timeouts": 0,
            "retries": 0,
            "published": 0,
            "delivered": 0,
            "dropped": 0,
            "by_instance": {},
        }
        self.closed = False
        self.refs = 0
        self._snap_lock = threading.Lock()
        self._inbox: _Inbox | None = None
        # Set by close(): wakes the watcher at once, so it drops its Ray refs
        # before Ray shuts down.
        self._stop: concurrent.futures.Future = concurrent.futures.Future()
        # Rings of processes that died on this node (callers, replicas, a
        # killed notebook kernel's whole bus) go now, not whenever someone
        # remembers `sage-comm gc`: this bus's at once, other buses' once idle
        # for the janitor's grace (a payload segment may still be on its way).
        shm.gc(self.namespace)
        shm.gc_buses(min_idle=JANITOR_GRACE)
        lifecycle.note_bus(bus)
        self.refresh()
        self._watcher = threading.Thread(target=self._watch, name=f"sage-registry-{bus}", daemon=True)
        self._watcher.start()
        lifecycle.register(self, "endpoints", _Endpoint.close)
        ensure_janitor(self.node_id)

    @classmethod
    def offline(cls, bus: str, snapshot: dict, node_id: str | None, shm_t: Transport, ray_t: Transport) -> _Endpoint:
        """An endpoint with a fixed registry and given transports, no Ray and no
        router: the client's routing logic, tested on its own."""
        ep = cls.__new__(cls)
        ep.bus, ep.namespace, ep.router = bus, bus_namespace(bus), None
        ep._ray_session = None
        ep.node_id, ep.host_id = node_id, shm.host_id()
        ep.shm, ep.ray, ep.direct, ep.shm_ok = shm_t, ray_t, ray_t, True
        ep.snapshot = snapshot
        ep.outstanding, ep.dead, ep.rr, ep._live, ep._gen = {}, set(), {}, {}, 0
        ep._rebuild_until, ep.my_subs = 0.0, {}
        ep.stats = {
            "calls": 0,
            "shm": 0,
            "ray": 0,
            "errors": 0,
            "timeouts": 0,
            "retries": 0,
            "published": 0,
            "delivered": 0,
            "dropped": 0,
            "by_instance": {},
        }
        ep.closed, ep.refs = False, 1
        ep._snap_lock = threading.Lock()
        ep._inbox = None
        return ep

    def _ray_alive(self) -> bool:
        import ray

        try:
            return ray.is_initialized() and ray.get_runtime_context().get_job_id() == self._ray_session
        except Exception:
            return False

    # -- registry cache
    def _install(self, snap: dict | None) -> None:
        if snap is None:
            return
        resubscribe = False
        with self._snap_lock:
            old = self.snapshot
            restarted = old.get("started_at") is not None and snap.get("started_at") != old.get("started_at")
            if restarted:
                # A new router: its registry refills as replicas' heartbeats
                # re-register them. Meanwhile keep calling the replicas we know.
                self._rebuild_until = time.monotonic() + 2 * HEARTBEAT_GRACE
                resubscribe = True
            if restarted or snap["version"] >= old.get("version", -1) or snap.get("bus") != old.get("bus"):
                if time.monotonic() < self._rebuild_until:
                    snap = dict(snap, services={**old["services"], **snap["services"]})
                self.snapshot = snap
                live = {iid for insts in snap["services"].values() for iid in insts}
                self.dead &= live
                self._gen += 1
        if resubscribe:
            self._resubscribe()

    def _resubscribe(self) -> None:
        """Registers this process's callback subscriptions with a restarted router."""
        import ray

        for sub in list(self.my_subs.values()):
            try:
                ray.get(self.router.subscribe.remote(sub), timeout=10)
            except Exception as e:  # the next restart notice tries again
                log.warning("could not re-subscribe %s after a router restart: %s", sub.pattern, e)

    def refresh(self) -> dict:
        import ray

        if self.router is None:  # offline
            return self.snapshot
        try:
            self._install(ray.get(self.router.snapshot.remote(), timeout=30))
        except Exception as e:
            try:
                self.router = get_router(self.bus)
                self._install(ray.get(self.router.snapshot.remote(), timeout=30))
            except Exception:
                raise RouterUnavailable(f"bus '{self.bus}': cannot read the registry from its router: {e}") from None
        return self.snapshot

    def ensure_version(self, version: int) -> None:
        if self.snapshot.get("version", -1) < version:
            self.refresh()

    def _watch(self) -> None:
        """Long-polls the router for registry changes. Waits on Ray's future of
        the poll and on this endpoint's stop signal, never inside a Ray call,
        and checks every RAY_CHECK_SECONDS that Ray still runs: after
        ``ray.shutdown()`` or ``close()`` it drops its refs and ends."""
        failures = 0
        while not self.closed:
            try:
                fut = self.router.wait_for_change.remote(self.snapshot.get("version", -1), 5.0).future()
                while not fut.done() and not self.closed:
                    concurrent.futures.wait(
                        (fut, self._stop),
                        timeout=lifecycle.RAY_CHECK_SECONDS,
                        return_when=concurrent.futures.FIRST_COMPLETED,
                    )
                    if not self._ray_alive():
                        break
                if self.closed or not self._ray_alive():
                    break
                self._install(fut.result())
                failures = 0
            except Exception:
                if self.closed or not self._ray_alive():
                    break
                failures += 1
                # back off while the router restarts
                if self._stop_wait(min(0.1 * failures, 1.0)):
                    break
                try:
                    self.router = get_router(self.bus, create=False)
                except Exception:
                    pass
            finally:
                fut = None
        if not self.closed:  # Ray went away under us: release everything of this endpoint
            self.close()

    def _stop_wait(self, seconds: float) -> bool:
        try:
            self._stop.result(timeout=seconds)
            return True
        except concurrent.futures.TimeoutError:
            return False

    def instances(self, service: str) -> list[InstanceInfo]:
        # Cached per registry snapshot and set of locally seen deaths: the
        # common call re-uses the list instead of rebuilding it.
        hit = self._live.get(service)
        if hit is not None and hit[0] == self._gen:
            return hit[1]
        insts = self.snapshot["services"].get(service)
        if not insts:
            self.refresh()
            insts = self.snapshot["services"].get(service)
            if not insts:
                known = sorted(self.snapshot["services"])
                raise ServiceNotFound(
                    f"no service '{service}' on bus '{self.bus}'; known services: {', '.join(known) or '(none)'}"
                )
        live = [i for i in insts.values() if i.instance_id not in self.dead]
        if not live and self.router is not None:
            # Every replica we know is dead: ask for news (restarted replicas) before failing.
            insts = self.refresh()["services"].get(service) or {}
            live = [i for i in insts.values() if i.instance_id not in self.dead]
        if not live:
            raise ServiceUnavailable(
                f"service '{service}' on bus '{self.bus}' has {len(insts)} replica(s), none of them alive"
            )
        self._live[service] = (self._gen, live)
        return live

    def mark_dead(self, instance_id: str) -> None:
        """Stops routing to a replica seen dead here, until the registry drops it."""
        self.dead.add(instance_id)
        self._gen += 1

    def transport(self, node_id: str | None) -> Transport:
        """The transport to a subscriber or replica on ``node_id``."""
        return self.shm if node_id == self.node_id else self.ray

    def transport_for(self, inst: InstanceInfo) -> Transport:
        """The transport to one replica: shared memory on this node, the
        node's gateway across nodes, and a direct Ray call to the replica's
        actor when either side has no ring (shared memory is short)."""
        if not inst.request_queue or (not self.shm_ok and inst.node_id == self.node_id):
            return self.direct
        return self.shm if inst.node_id == self.node_id else self.ray

    def shm_full(self, e: BaseException) -> None:
        """This process could not make a ring: go over Ray from now on."""
        self.shm_ok = False
        shm_warn_once(f"a caller on bus '{self.bus}' could not make its reply ring ({e}); its calls go over Ray")

    # -- pub/sub
    def inbox(self, buffer_bytes: int | None = None) -> _Inbox:
        if self._inbox is None:
            with self._snap_lock:
                if self._inbox is None:
                    self._inbox = _Inbox(self, buffer_bytes or EVENT_RING_BYTES)
        return self._inbox

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        stop = getattr(self, "_stop", None)
        if stop is not None and not stop.done():
            stop.set_result(True)
        watcher = getattr(self, "_watcher", None)
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=5)
        if self._inbox is not None:
            self._inbox.close()
        self.shm.close()
        with _Endpoint._lock:
            if _Endpoint._by_bus.get(self.bus) is self:
                del _Endpoint._by_bus[self.bus]
        lifecycle.unregister(self, "endpoints")

    @classmethod
    def close_all(cls) -> None:
        """Closes every endpoint of this process (a replica that stops, a test that ends)."""
        for ep in list(cls._by_bus.values()):
            ep.close()

    @classmethod
    def existing(cls, bus: str) -> _Endpoint | None:
        """This process's open endpoint of ``bus``, without creating one."""
        ep = cls._by_bus.get(bus)
        return ep if ep is not None and not ep.closed else None


class _Inbox:
    """A process's ring for events to ``bus.subscribe`` callbacks, and its reader thread."""

    def __init__(self, ep: _Endpoint, buffer_bytes: int = EVENT_RING_BYTES) -> None:
        self.ep = ep
        self.name = f"evt.{os.getpid()}.{uuid.uuid4().hex[:10]}"
        self.queue = SageQueue(self.name, buffer_bytes, auto_cleanup=True, namespace=ep.namespace)
        self.callbacks: dict[str, Callable] = {}
        self.wants_message: dict[str, bool] = {}
        self.stats = {"received": 0, "errors": 0}
        self._thread = threading.Thread(target=self._run, name=f"sage-events-{ep.bus}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                req = take_request(self.queue)
            except SageCommError as e:
                if self.queue.closed:
                    return
                log.warning("dropped an undecodable event: %s", e)
                continue
            if not isinstance(req, Request):
                if req is not None:
                    log.warning("dropped an event whose payload did not unpickle: %s", req)
                continue
            cb = self.callbacks.get(req.function)
            if cb is None:
                continue  # unsubscribed meanwhile
            self.stats["received"] += 1
            try:
                args, _ = request_args(req)
                if self.wants_message[req.function]:
                    cb(*args, message=envelope(req))
                else:
                    cb(*args)
            except Exception:
                self.stats["errors"] += 1
                log.exception("subscriber callback %r raised", cb)

    def close(self) -> None:
        self.queue.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.queue.release()


# ------------------------------------------------------------------ client
class FunctionClient:
    """Calls functions of services on a bus.

    Args:
        client_id: names this caller in messages (default: generated).
        bus: the bus name (default ``"default"``) or a CommunicationBus.
        timeout: default timeout of calls, in seconds, when the function
            declares none (``$SAGE_COMM_TIMEOUT`` or 30).
        policy: override every service's load-balancing policy.

    >>> client = FunctionClient(bus="production_bus")                # doctest: +SKIP
    >>> client.call("calculator", "add", 1, 2, timeout=5)            # doctest: +SKIP
    3
    """

    def __init__(
        self,
        client_id: str | None = None,
        bus: Any = None,
        *,
        timeout: float | None = None,
        policy: str | None = None,
    ) -> None:
        if bus is not None and not isinstance(bus, str):
            bus = getattr(bus, "name", bus)
        self.bus = validate_bus_name(bus or "default")
        if policy is not None and policy not in POLICIES:
            raise InvalidCallArgument(f"policy must be one of {POLICIES}, got {policy!r}")
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:8]}"
        self.default_timeout = float(
            timeout if timeout is not None else os.environ.get("SAGE_COMM_TIMEOUT", DEFAULT_TIMEOUT)
        )
        self.policy = policy
        self._ep: _Endpoint | None = None
        self._subs: list[str] = []
        self._closed = False

    @property
    def endpoint(self) -> _Endpoint:
        ep = self._ep
        if ep is None or ep.closed:
            if self._closed:
                raise ServiceUnavailable(f"client '{self.client_id}' is closed")
            ep = self._ep = _Endpoint.for_bus(self.bus)
            ep.refs += 1
        return ep

    # -- routing
    def _route(self, service: str, function: str, instance: str | None, exclude: Sequence[str] = ()) -> tuple:
        ep = self.endpoint
        if not isinstance(service, str) or not isinstance(function, str):
            raise InvalidCallArgument(f"service and function must be strings, got {service!r}, {function!r}")
        cands = ep.instances(service)
        if instance is not None:
            chosen = [c for c in cands if c.instance_id == instance or c.actor_name == instance]
            if not chosen:
                raise ServiceNotFound(
                    f"service '{service}' has no live replica '{instance}'; replicas: "
                    f"{', '.join(c.instance_id for c in cands)}"
                )
            inst = chosen[0]
        else:
            pool = [c for c in cands if c.instance_id not in exclude] or cands
            policy = self.policy or pool[0].policy
            rr = ep.rr.get(service)
            if rr is None:
                rr = ep.rr[service] = itertools.count()
            inst = pick_instance(pool, policy, ep.outstanding, ep.node_id, rr)
        finfo = inst.functions.get(function)
        if finfo is None:
            raise FunctionNotFound(
                f"service '{service}' has no function '{function}'; it has: "
                f"{', '.join(sorted(inst.functions)) or '(none)'}"
            )
        return ep, inst, finfo

    def _request(
        self,
        op: int,
        service: str,
        function: str,
        args: tuple,
        kwargs: dict,
        deadline: float | None,
        headers: dict | None,
    ) -> Request:
        return Request(op, 0, function, args, kwargs or None, None, deadline, self.client_id, headers, service)

    def _account(self, ep: _Endpoint, inst: InstanceInfo, transport: Transport, delta: int) -> None:
        iid = inst.instance_id
        ep.outstanding[iid] = ep.outstanding.get(iid, 0) + delta
        if delta > 0:
            s = ep.stats
            s["calls"] += 1
            s[transport.name] += 1
            s["by_instance"][iid] = s["by_instance"].get(iid, 0) + 1

    @staticmethod
    def _uncount(ep: _Endpoint, inst: InstanceInfo, transport: Transport) -> None:
        """Takes back the counts of an attempt that never left (it is retried another way)."""
        s = ep.stats
        s["calls"] -= 1
        s[transport.name] -= 1
        s["by_instance"][inst.instance_id] -= 1

    def call(
        self,
        service: str,
        function: str,
        *args: Any,
        timeout: float | None = None,
        instance: str | None = None,
        headers: dict | None = None,
        **kwargs: Any,
    ) -> Any:
        """Calls ``service.function(*args, **kwargs)`` and returns its result.

        Raises ServiceNotFound, FunctionNotFound, ValidationError, CallTimeout
        (no reply within ``timeout``, default the function's own),
        ServiceUnavailable (the replica died; idempotent functions are retried
        on another replica first) or the handler's exception as a RemoteError.
        """
        excluded: list[str] = []
        while True:
            ep, inst, finfo = self._route(service, function, instance, excluded)
            t = _check_timeout(_pick_timeout(timeout, finfo.timeout, self.default_timeout), service, function)
            transport = ep.transport_for(inst)
            req = self._request(OP_CALL, service, function, args, kwargs, time.time() + t, headers)
            self._account(ep, inst, transport, 1)
            t0 = time.perf_counter()
            try:
                rep = transport.call(inst, req, t)
            except SharedMemoryFull as e:
                if transport is ep.direct:
                    raise
                ep.shm_full(e)  # no room for this call's rings: the same call over Ray
                self._uncount(ep, inst, transport)
                continue
            except ServiceUnavailable:
                ep.mark_dead(inst.instance_id)
                ep.stats["errors"] += 1
                recorder.call(
                    self.bus, service, function, transport.name, "request_response", None, "ServiceUnavailable"
                )
                if finfo.idempotent and instance is None and len(excluded) < 3:
                    excluded.append(inst.instance_id)
                    ep.stats["retries"] += 1
                    continue
                raise
            except CallTimeout:
                ep.stats["timeouts"] += 1
                recorder.call(self.bus, service, function, transport.name, "request_response", None, "CallTimeout")
                raise
            finally:
                self._account(ep, inst, transport, -1)
            try:
                value = outcome(rep, service, function)
            except SageCommError as e:
                ep.stats["errors"] += 1
                recorder.call(
                    self.bus,
                    service,
                    function,
                    transport.name,
                    "request_response",
                    time.perf_counter() - t0,
                    type(e).__name__,
                )
                raise
            recorder.call(self.bus, service, function, transport.name, "request_response", time.perf_counter() - t0)
            return value

    def call_async(
        self,
        service: str,
        function: str,
        *args: Any,
        timeout: float | None = None,
        instance: str | None = None,
        headers: dict | None = None,
        **kwargs: Any,
    ) -> concurrent.futures.Future:
        """Like :meth:`call`, but returns a ``concurrent.futures.Future`` at once.

        The request is already on its way when this returns (it blocks only
        while the replica's request queue is full: backpressure). As with
        :meth:`call`, an idempotent function whose replica died is retried
        on another one, within the call's timeout.
        """
        fut, iid, idempotent, deadline = self._call_async_once(
            service, function, args, kwargs, timeout, instance, headers, ()
        )
        if instance is not None or not idempotent:
            return fut  # the common case: the attempt is the call
        return _Retrying(self, fut, iid, deadline, service, function, args, kwargs, headers).future

    def _call_async_once(
        self,
        service: str,
        function: str,
        args: tuple,
        kwargs: dict,
        timeout: float | None,
        instance: str | None,
        headers: dict | None,
        exclude: Sequence[str],
    ) -> tuple:
        """One attempt: (future, replica id, idempotent, monotonic deadline)."""
        ep, inst, finfo = self._route(service, function, instance, exclude)
        t = _check_timeout(_pick_timeout(timeout, finfo.timeout, self.default_timeout), service, function)
        transport = ep.transport_for(inst)
        req = self._request(OP_CALL, service, function, args, kwargs, time.time() + t, headers)
        self._account(ep, inst, transport, 1)

        finish = _Finish(ep, inst.instance_id, service, function, transport.name, self.bus)
        try:
            fut = transport.call_async(inst, req, t, finish)
            return fut, inst.instance_id, finfo.idempotent, time.monotonic() + t
        except SharedMemoryFull as e:
            if transport is ep.direct:
                self._account(ep, inst, transport, -1)
                raise
            ep.shm_full(e)  # no room for this call's rings: the same call over Ray
            self._uncount(ep, inst, transport)
            ep.stats[ep.direct.name] += 1
            ep.stats["calls"] += 1
            ep.stats["by_instance"][inst.instance_id] += 1
            finish.transport = ep.direct.name
            return ep.direct.call_async(inst, req, t, finish), inst.instance_id, finfo.idempotent, time.monotonic() + t
        except BaseException:
            self._account(ep, inst, transport, -1)
            raise

    async def acall(
        self,
        service: str,
        function: str,
        *args: Any,
        timeout: float | None = None,
        instance: str | None = None,
        headers: dict | None = None,
        **kwargs: Any,
    ) -> Any:
        """``await``-able :meth:`call`, for async code (an async Ray actor, a notebook)."""
        return await asyncio.wrap_future(
            self.call_async(service, function, *args, timeout=timeout, instance=instance, headers=headers, **kwargs)
        )

    def send(
        self,
        service: str,
        function: str,
        *args: Any,
        instance: str | None = None,
        timeout: float | None = None,
        headers: dict | None = None,
        **kwargs: Any,
    ) -> str:
        """Point-to-point: delivers the call with no reply (fire-and-forget).

        ``instance=`` (an instance id or actor name) targets one replica.
        Returns the replica's instance id. Blocks only while its queue is full.
        """
        ep, inst, finfo = self._route(service, function, instance)
        t = _check_timeout(_pick_timeout(timeout, finfo.timeout, self.default_timeout), service, function)
        transport = ep.transport_for(inst)
        req = self._request(OP_SEND, service, function, args, kwargs, None, headers)
        try:
            transport.send(inst, req, t)
        except SharedMemoryFull as e:
            if transport is ep.direct:
                raise
            ep.shm_full(e)
            transport = ep.direct
            transport.send(inst, req, t)
        ep.stats["by_instance"][inst.instance_id] = ep.stats["by_instance"].get(inst.instance_id, 0) + 1
        ep.stats[transport.name] += 1
        recorder.call(
            self.bus, service, function, transport.name, "point_to_point" if instance else "load_balanced", None
        )
        return inst.instance_id

    # -- pub/sub
    def broadcast(self, topic: str, payload: Any, *, headers: dict | None = None) -> int:
        """Publishes ``payload`` on ``topic`` to every matching subscriber (one
        per service group); returns how many took it. A subscriber whose buffer
        is full misses it (counted in ``stats()['dropped']``): at-most-once,
        and a slow subscriber never blocks the publisher."""
        validate_topic(topic)
        ep = self.endpoint
        hdrs = {"topic": topic, **(headers or {})}
        groups: dict[str, list[Subscription]] = {}
        targets: list[Subscription] = []
        for sub in ep.snapshot["subscriptions"]:
            if topic_matches(sub.pattern, topic):
                if sub.group:
                    groups.setdefault(sub.group + "\0" + sub.pattern, []).append(sub)
                else:
                    targets.append(sub)
        for key, members in groups.items():
            rr = ep.rr.get("\0pub" + key)
            if rr is None:
                rr = ep.rr["\0pub" + key] = itertools.count()
            local = [m for m in members if m.node_id == ep.node_id] or members
            local.sort(key=lambda m: m.sub_id)
            targets.append(local[next(rr) % len(local)])
        delivered = 0
        for sub in targets:
            req = Request(
                OP_EVENT, 0, sub.function or "", (payload,), None, None, None, self.client_id, hdrs, sub.group or ""
            )
            tr = ep.transport(sub.node_id)
            if not sub.queue and self._deliver_direct(ep, sub, req):
                delivered += 1
                recorder.count("sage_messages_delivered_total", (self.bus, "ray"))
            elif sub.queue and tr.deliver(sub, req):
                delivered += 1
                recorder.count("sage_messages_delivered_total", (self.bus, tr.name))
            else:
                ep.stats["dropped"] += 1
                recorder.count("sage_frames_dropped_total", (self.bus, "subscriber_buffer"))
        ep.stats["published"] += 1
        ep.stats["delivered"] += delivered
        recorder.count("sage_messages_published_total", (self.bus,))
        return delivered

    publish = broadcast

    @staticmethod
    def _deliver_direct(ep: _Endpoint, sub: Subscription, req: Request) -> bool:
        """An event for a replica with no ring (shared memory was short): over Ray to its actor."""
        iid = sub.sub_id.split("/", 1)[0]
        for insts in ep.snapshot["services"].values():
            inst = insts.get(iid)
            if inst is not None:
                try:
                    ep.direct.send(inst, req, 0)
                    return True
                except SageCommError:
                    return False
        return False

    def subscribe(self, pattern: str, callback: Callable, *, buffer_bytes: int | None = None) -> str:
        """Runs ``callback(payload)`` (or ``callback(payload, message=...)``) in a
        background thread for each event matching ``pattern``. Returns the
        subscription id for :meth:`unsubscribe`.

        Events wait in this process's bounded buffer (``buffer_bytes``, 4 MiB by
        default, sized by the process's first subscription on the bus). When
        it is full, publishers drop the event for this process and count it:
        delivery is at-most-once, and a slow callback never blocks a publisher.
        Callbacks of one process run one at a time, in order."""
        import inspect

        import ray

        validate_pattern(pattern)
        if not callable(callback):
            raise InvalidSubscription(f"subscribe({pattern!r}): callback must be callable, got {callback!r}")
        ep = self.endpoint
        inbox = ep.inbox(buffer_bytes)
        sub_id = f"{ep.host_id}:{os.getpid()}/{uuid.uuid4().hex[:10]}"
        try:
            inbox.wants_message[sub_id] = "message" in inspect.signature(callback).parameters
        except (TypeError, ValueError):
            inbox.wants_message[sub_id] = False
        inbox.callbacks[sub_id] = callback
        pid = os.getpid()
        sub = Subscription(
            sub_id, pattern, inbox.name, ep.node_id, ep.host_id, pid, shm.process_start_time(pid), None, sub_id
        )
        ep.ensure_version(ray.get(ep.router.subscribe.remote(sub), timeout=30))
        ep.my_subs[sub_id] = sub
        self._subs.append(sub_id)
        return sub_id

    def unsubscribe(self, sub_id: str) -> bool:
        import ray

        ep = self.endpoint
        ok = ray.get(ep.router.unsubscribe.remote(sub_id), timeout=30)
        ep.my_subs.pop(sub_id, None)
        if ep._inbox is not None:
            ep._inbox.callbacks.pop(sub_id, None)
        if sub_id in self._subs:
            self._subs.remove(sub_id)
        ep.refresh()
        return ok

    def wait_for_subscribers(self, topic: str, count: int = 1, timeout: float = 10.0) -> int:
        """Waits until this process's registry shows ``count`` subscribers for
        ``topic`` (subscriptions made elsewhere reach it asynchronously)."""
        validate_topic(topic)
        ep = self.endpoint
        end = time.monotonic() + timeout
        while True:
            n = sum(1 for s in ep.snapshot["subscriptions"] if topic_matches(s.pattern, topic))
            if n >= count:
                return n
            if time.monotonic() >= end:
                raise CallTimeout(
                    f"topic '{topic}' on bus '{self.bus}' has {n} subscriber(s), not {count}, after {timeout} s"
                )
            ep.refresh()
            time.sleep(0.02)  # polling the router's version; a change usually lands within one poll

    # -- registry views
    def list_services(self) -> list[dict[str, Any]]:
        """The services on the bus, as the original API listed them: one dict
        per service, ``{"service_id", "service_name", "functions", "metadata"}``.

        ``service_id`` is the id of its first replica; ``metadata`` has every
        replica's id, node and pid, and the class.

        >>> client.list_services()                       # doctest: +SKIP
        [{'service_id': 'calc#1-1a2b3c', 'service_name': 'calc', 'functions': ['add'], 'metadata': {...}}]
        """
        out = []
        for name, insts in sorted(self.endpoint.refresh()["services"].items()):
            reps = sorted(insts.values(), key=lambda i: i.instance_id)
            if not reps:
                continue
            first = reps[0]
            out.append(
                {
                    "service_id": first.instance_id,
                    "service_name": name,
                    "functions": sorted(first.functions),
                    "metadata": {
                        "replicas": len(reps),
                        "instances": [i.instance_id for i in reps],
                        "nodes": sorted({i.node_id for i in reps if i.node_id}),
                        "pids": [i.pid for i in reps],
                        "class": first.class_id,
                        "policy": first.policy,
                        "bus": self.bus,
                    },
                }
            )
        return out

    def list_functions(self) -> dict[str, list[str]]:
        """``{function_name: [service_id, ...]}``: which replicas expose each
        function (the original API's shape)."""
        out: dict[str, list[str]] = {}
        for insts in self.endpoint.refresh()["services"].values():
            for inst in sorted(insts.values(), key=lambda i: i.instance_id):
                for fn in inst.functions:
                    out.setdefault(fn, []).append(inst.instance_id)
        return out

    def service_names(self) -> list[str]:
        """Names of the services registered on the bus, sorted."""
        return sorted(self.endpoint.refresh()["services"])

    def function_signatures(self, service: str | None = None) -> dict[str, Any]:
        """``{service: {function: signature}}`` (or just one service's dict)."""
        snap = self.endpoint.refresh()
        out = {
            name: {f.name: f.signature for inst in list(insts.values())[:1] for f in inst.functions.values()}
            for name, insts in snap["services"].items()
        }
        if service is None:
            return out
        if service not in out:
            raise ServiceNotFound(
                f"no service '{service}' on bus '{self.bus}'; known services: {', '.join(sorted(out)) or '(none)'}"
            )
        return out[service]

    def refresh(self) -> None:
        """Re-reads the registry from the router now."""
        self.endpoint.refresh()

    def stats(self) -> dict:
        """Calls made from this process on this bus, by transport (``shm`` / ``ray``) and replica."""
        s = dict(self.endpoint.stats)
        s["by_instance"] = dict(s["by_instance"])
        s["stale_replies"] = getattr(self.endpoint.shm, "stale_replies", 0)
        return s

    def close(self) -> None:
        """Drops this client's subscriptions; the last client of the bus in this
        process also removes the process's reply and event rings."""
        if self._closed:
            return
        self._closed = True
        ep, self._ep = self._ep, None
        if ep is None or ep.closed:
            return
        for sid in list(self._subs):
            try:
                import ray

                ray.get(ep.router.unsubscribe.remote(sid), timeout=10)
            except Exception:
                pass
            if ep._inbox is not None:
                ep._inbox.callbacks.pop(sid, None)
            ep.my_subs.pop(sid, None)
        ep.refs -= 1
        if ep.refs <= 0:
            ep.close()

    def __enter__(self) -> FunctionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FunctionClient({self.client_id!r}, bus={self.bus!r})"


class _Retrying:
    """The Future call_async returns for an idempotent function: when the
    replica dies (ServiceUnavailable), the call goes again to another
    replica, up to three times, within the first attempt's deadline. Other
    outcomes pass straight through. Retries are issued from the thread that
    completes the failed attempt."""

    MAX_RETRIES = 3

    def __init__(
        self,
        client: FunctionClient,
        first: concurrent.futures.Future,
        iid: str,
        deadline: float,
        service: str,
        function: str,
        args: tuple,
        kwargs: dict,
        headers: dict | None,
    ) -> None:
        self.future: concurrent.futures.Future = CallFuture()
        self.client, self.service, self.function = client, service, function
        self.args, self.kwargs, self.headers = args, kwargs, headers
        self.deadline = deadline
        self.excluded: list[str] = []
        self._attempt(first, iid)

    def _attempt(self, fut: concurrent.futures.Future, iid: str) -> None:
        fut.add_done_callback(lambda f: self._done(f, iid))

    def _done(self, f: concurrent.futures.Future, iid: str) -> None:
        exc = f.exception()
        if exc is None:
            self.future.set_result(f.result())
            return
        left = self.deadline - time.monotonic()
        if not isinstance(exc, ServiceUnavailable) or len(self.excluded) >= self.MAX_RETRIES or left <= 0:
            self.future.set_exception(exc)
            return
        self.excluded.append(iid)
        try:
            nxt, nid, _, _ = self.client._call_async_once(
                self.service, self.function, self.args, self.kwargs, left, None, self.headers, self.excluded
            )
        except BaseException as e:  # no replica left, or the retry itself failed: that is the outcome
            self.future.set_exception(e)
            return
        self.client.endpoint.stats["retries"] += 1
        self._attempt(nxt, nid)


class _Finish:
    """Turns an async call's reply into its outcome, in the thread that got the
    reply. One small object per pending call (a closure would be nine)."""

    __slots__ = ("bus", "ep", "function", "iid", "service", "t0", "transport")

    def __init__(self, ep: _Endpoint, iid: str, service: str, function: str, transport: str, bus: str) -> None:
        self.ep, self.iid, self.service, self.function = ep, iid, service, function
        self.transport, self.bus, self.t0 = transport, bus, time.perf_counter()

    def __call__(self, rep: Reply | None, exc: BaseException | None) -> Any:
        ep = self.ep
        ep.outstanding[self.iid] -= 1
        dt = time.perf_counter() - self.t0
        if exc is None:
            try:
                value = outcome(rep, self.service, self.function)  # type: ignore[arg-type]
            except SageCommError as e:
                ep.stats["errors"] += 1
                recorder.call(
                    self.bus, self.service, self.function, self.transport, "request_response", dt, type(e).__name__
                )
                raise
            recorder.call(self.bus, self.service, self.function, self.transport, "request_response", dt)
            return value
        if isinstance(exc, ServiceUnavailable):
            ep.mark_dead(self.iid)
        if isinstance(exc, SageCommError):
            ep.stats["timeouts" if isinstance(exc, CallTimeout) else "errors"] += 1
        recorder.call(
            self.bus, self.service, self.function, self.transport, "request_response", None, type(exc).__name__
        )
        raise exc


def _pick_timeout(given: float | None, declared: float | None, default: float) -> float:
    """The call's own timeout, else the function's declared one, else the client's default."""
    return given if given is not None else (declared if declared is not None else default)


def _check_timeout(t: Any, service: str, function: str) -> float:
    if not isinstance(t, (int, float)) or t != t or t <= 0:
        raise InvalidCallArgument(
            f"timeout of the call to {service}.{function} must be a positive number of seconds, got {t!r}"
        )
    return float(t)


# ------------------------------------------------- SAGE's service-call surface
class _MethodProxy:
    __slots__ = ("_async", "_client", "_service", "_timeout")

    def __init__(self, client: FunctionClient, service: str, is_async: bool, timeout: float | None) -> None:
        self._client, self._service, self._async, self._timeout = client, service, is_async, timeout

    def __call__(self, *args: Any, method: str = "process", timeout: float | None = None, **kwargs: Any) -> Any:
        """``call_service["cache"](key, method="get")``: SAGE's call with the method named."""
        return getattr(self, method)(*args, timeout=timeout if timeout is not None else self._timeout, **kwargs)

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("__"):
            raise AttributeError(method)
        c, svc, is_async, t = self._client, self._service, self._async, self._timeout

        def invoke(*args: Any, timeout: float | None = t, **kwargs: Any) -> Any:
            if is_async:
                return c.call_async(svc, method, *args, timeout=timeout, **kwargs)
            return c.call(svc, method, *args, timeout=timeout, **kwargs)

        invoke.__name__ = method
        return invoke


class _ServiceTable:
    """``table["cache"]`` -> an object whose methods call the ``cache`` service."""

    __slots__ = ("_async", "_client", "_timeout")

    def __init__(self, client: FunctionClient, is_async: bool, timeout: float | None = None) -> None:
        self._client, self._async, self._timeout = client, is_async, timeout

    def __getitem__(self, service: str) -> _MethodProxy:
        if not isinstance(service, str):
            raise InvalidCallArgument(f"service names are strings, got {service!r}")
        return _MethodProxy(self._client, service, self._async, self._timeout)

    def __call__(
        self, service: str, *args: Any, method: str = "process", timeout: float | None = None, **kwargs: Any
    ) -> Any:
        fn = self._client.call_async if self._async else self._client.call
        return fn(service, method, *args, timeout=timeout if timeout is not None else self._timeout, **kwargs)


class ServiceCallMixin:
    """SAGE's two ways of calling services, for any class (a Ray actor, a
    plain class, a service):

    >>> class Operator(ServiceCallMixin):
    ...     def run(self, key):
    ...         hit = self.call_service["cache"].get(key)              # blocking
    ...         fut = self.call_service_async["cache"].get(key)        # a Future
    ...         return self.call_service["cache"](key, method="get")  # also a form

    The bus is ``self.sage_bus`` if set, else ``"default"``.
    """

    sage_bus: str | None = None

    def _sage_client(self) -> FunctionClient:
        c = self.__dict__.get("_sage_call_client")
        if c is None or c._closed:
            bus = getattr(self, "bus_name", None) or self.sage_bus or "default"
            c = FunctionClient(client_id=f"{type(self).__name__}-{uuid.uuid4().hex[:6]}", bus=bus)
            self.__dict__["_sage_call_client"] = c
        return c

    @property
    def call_service(self) -> _ServiceTable:
        return _ServiceTable(self._sage_client(), False)

    @property
    def call_service_async(self) -> _ServiceTable:
        return _ServiceTable(self._sage_client(), True)


_default_clients: dict[str, FunctionClient] = {}


def _client_for(bus: str | None) -> FunctionClient:
    b = bus or "default"
    c = _default_clients.get(b)
    if c is None or c._closed:
        c = _default_clients[b] = FunctionClient(client_id=f"call_service-{os.getpid()}", bus=b)
    return c


def call_service(
    service: str,
    *args: Any,
    method: str = "process",
    timeout: float | None = None,
    bus: str | None = None,
    **kwargs: Any,
) -> Any:
    """``call_service("cache", key, method="get", timeout=10)``: SAGE's functional form of a call."""
    return _client_for(bus).call(service, method, *args, timeout=timeout, **kwargs)


def call_service_async(
    service: str,
    *args: Any,
    method: str = "process",
    timeout: float | None = None,
    bus: str | None = None,
    **kwargs: Any,
) -> concurrent.futures.Future:
    """As :func:`call_service`, returning a ``concurrent.futures.Future``."""
    return _client_for(bus).call_async(service, method, *args, timeout=timeout, **kwargs)
