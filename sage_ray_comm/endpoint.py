"""The registry cache: one :class:`Endpoint` per process and bus, shared by
every client of that bus in the process.

It holds a snapshot of the router's registry (services, replicas, nodes,
functions, subscriptions), kept fresh by a long poll the router answers when
the registry changes, so a call never asks the router anything. It also owns
the transports of this process (shared memory on this node, Ray across
nodes), the count of calls in flight per replica, and this process's event
inbox.

>>> from sage_ray_comm.endpoint import Endpoint
>>> ep = Endpoint.for_bus("pipeline")              # doctest: +SKIP
>>> [i.instance_id for i in ep.instances("calculator")]   # doctest: +SKIP
['calculator-3f2a...', 'calculator-9c1b...']
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from . import lifecycle, shm
from ._ray import ensure_ray
from ._wire import Request
from .errors import (
    FunctionNotFound,
    InvalidCallArgument,
    RouterUnavailable,
    SageCommError,
    ServiceNotFound,
    ServiceUnavailable,
)
from .pubsub import Inbox
from .ray_transport import JANITOR_GRACE, DirectTransport, RayTransport, ensure_janitor
from .router import HEARTBEAT_GRACE, InstanceInfo, Subscription, bus_namespace, router_client
from .routing import pick_instance
from .shm_transport import ShmTransport
from .transport import EVENT_RING_BYTES, Transport, check_shm_space, shm_warn_once

__all__ = ["RESTART_LOOK_SECONDS", "Endpoint"]

log = logging.getLogger(__name__)

# While a call waits for a restarting replica: how long between looks at
# the router when no newer registry came meanwhile.
RESTART_LOOK_SECONDS = 1.0

TransportFactory = Callable[[str | None], Transport]  # node id -> the transport to it


class Endpoint:
    """Per process and bus: the registry cache, transports, outstanding counts.

    The shared one (:meth:`for_bus`) reads the bus's router and uses the real
    transports. A client given a ``transport`` factory, or a ``router`` (such
    as ``sage_ray_comm.testing.FakeRouter``), gets a private one built with
    them; with a router given, no Ray is needed at all.
    """

    _by_bus: ClassVar[dict[str, Endpoint]] = {}
    _lock = threading.Lock()

    @classmethod
    def for_bus(cls, bus: str) -> Endpoint:
        ep = cls._by_bus.get(bus)
        if ep is not None and not ep.closed and ep._ray_alive():
            return ep
        with cls._lock:
            ep = cls._by_bus.get(bus)
            if ep is None or ep.closed or not ep._ray_alive():
                if ep is not None:
                    ep.close()
                ep = cls._by_bus[bus] = Endpoint(bus)
            return ep

    def __init__(
        self,
        bus: str,
        *,
        transport: TransportFactory | None = None,
        router: Any = None,
        node_id: str | None = None,
    ) -> None:
        """``transport``: node id -> Transport, used for every call and event
        instead of the real ones. ``router``: a RouterClient-like registry
        (``register``, ``subscribe``, ``snapshot``, ``wait_for_change``...)
        instead of the bus's router actor; ``node_id`` is then this process's
        node (for same-node preference)."""
        self.bus = bus
        self.namespace = bus_namespace(bus)
        self.host_id = shm.host_id()
        self._factory = transport
        self._ray_session: str | None = None
        self.router: Any
        if router is None:
            import ray

            ensure_ray()
            self.router = router_client(bus)
            self._ray_session = ray.get_runtime_context().get_job_id()
            self.node_id: str | None = ray.get_runtime_context().get_node_id()
        else:
            self.router, self.node_id = router, node_id
        self.shm: Transport
        self.ray: Transport | None
        if transport is None:
            self.shm = ShmTransport(self.namespace)
            self.ray = RayTransport(self.namespace)
            self.direct: Transport = DirectTransport(self.namespace, lifecycle.release)
            check_shm_space()  # a small /dev/shm (a container's 64 MiB) is said once, at start
        else:
            self.shm = self.direct = transport(self.node_id)
            self.ray = None
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
        self.rr: dict[str, Iterator[int]] = {}
        self.stats: dict[str, Any] = {
            "calls": 0,
            "shm": 0,
            "ray": 0,
            "errors": 0,
            "timeouts": 0,
            "retries": 0,
            "restart_waits": 0,  # calls that found no live replica and waited for one Ray restarted
            "published": 0,
            "delivered": 0,
            "dropped": 0,
            "by_instance": {},
        }
        self.closed = False
        self.refs = 0
        self._snap_lock = threading.Lock()
        self._installed = threading.Condition(self._snap_lock)  # a newer snapshot came
        self._inbox: Inbox | None = None
        # Set by close(): wakes the watcher at once, so it drops its Ray refs
        # before Ray shuts down.
        self._stop: concurrent.futures.Future = concurrent.futures.Future()
        # Rings of processes that died on this node (callers, replicas, a
        # killed notebook kernel's whole bus) go now, not whenever someone
        # remembers `sage-comm gc`: this bus's at once, other buses' once idle
        # for the janitor's grace (a payload segment may still be on its way).
        if router is None:
            shm.gc(self.namespace)
            shm.gc_buses(min_idle=JANITOR_GRACE)
            lifecycle.note_bus(bus)
        self.refresh()
        self._watcher = threading.Thread(target=self._watch, name=f"sage-registry-{bus}", daemon=True)
        self._watcher.start()
        lifecycle.register(self, "endpoints", Endpoint.close)
        if router is None:
            ensure_janitor(self.node_id)

    def _ray_alive(self) -> bool:
        """Whether the Ray this endpoint started in still runs (always, for a
        given router: it needs no Ray)."""
        if self._ray_session is None:
            return True
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
                self._installed.notify_all()
        if resubscribe:
            self._resubscribe()

    def _resubscribe(self) -> None:
        """Registers this process's callback subscriptions with a restarted router."""

        for sub in list(self.my_subs.values()):
            try:
                self.router.subscribe(sub)
            except Exception as e:  # the next restart notice tries again
                log.warning("could not re-subscribe %s after a router restart: %s", sub.pattern, e)

    def refresh(self) -> dict:
        try:
            self._install(self.router.snapshot())
        except Exception as e:
            if self._ray_session is None:  # a given router: nothing to reconnect to
                raise RouterUnavailable(f"bus '{self.bus}': cannot read the registry: {e}") from None
            try:
                self.router = router_client(self.bus)
                self._install(self.router.snapshot())
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
        ``ray.shutdown()`` or ``close()`` it drops its refs and ends.

        It looks again right before each Ray call: a Ray API called after
        ``ray.shutdown()`` starts a new Ray (Ray's auto-init) from this
        thread, and the driver then exits with status 1."""
        failures = 0
        while not self.closed and self._ray_alive():
            fut = None
            try:
                fut = self.router.wait_for_change(self.snapshot.get("version", -1), 5.0)
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
                snap = fut.result()
                lifecycle.release(fut)
                fut = None
                self._install(snap)
                failures = 0
            except Exception:
                # The poll's Ray ref goes now, while Ray surely runs: not in the
                # back-off below, when an explicit ray.shutdown() may be under way.
                lifecycle.release(fut)
                fut = None
                if self.closed or not self._ray_alive():
                    break
                failures += 1
                # back off while the router restarts
                if self._stop_wait(min(0.1 * failures, 1.0)) or not self._ray_alive():
                    break
                if self._ray_session is None:
                    continue  # a given router: no actor to find again
                try:
                    self.router = router_client(self.bus, create=False)
                except Exception:
                    pass
            finally:
                lifecycle.release(fut)
                fut = None
        if not self.closed:  # Ray went away under us: release everything of this endpoint
            self.close()

    def _stop_wait(self, seconds: float) -> bool:
        try:
            self._stop.result(timeout=seconds)
            return True
        except concurrent.futures.TimeoutError:
            return False

    def instances(self, service: str, wait: Callable[[], float] | None = None) -> list[InstanceInfo]:
        """The live replicas of ``service``. When it has none, but the
        registry lists replicas of it that Ray is restarting (they died,
        router.RESTART_GRACE), or ones this process saw die that the router
        has not ruled on yet, waits for one up to ``wait()`` seconds (asked
        only then: the common call never needs it). Raises ServiceNotFound or
        ServiceUnavailable."""
        # Cached per registry snapshot and set of locally seen deaths: the
        # common call re-uses the list instead of rebuilding it.
        hit = self._live.get(service)
        if hit is not None and hit[0] == self._gen:
            return hit[1]
        budget: float | None = None
        while True:
            try:
                return self._instances(service)  # asks the router itself when none is live
            except (ServiceNotFound, ServiceUnavailable):
                restarting = self.snapshot.get("restarting", {}).get(service) or self._seen_dead(service)
                if not restarting or wait is None:
                    raise
                if budget is None:
                    budget = wait()
                    if budget <= 0:
                        raise
                    until = time.monotonic() + budget
                    self.stats["restart_waits"] += 1
                left = until - time.monotonic()
                if self.closed:
                    raise ServiceUnavailable(
                        f"service '{service}' on bus '{self.bus}': the client closed while the call waited for "
                        f"a restarting replica ({', '.join(restarting)})"
                    ) from None
                if left <= 0:
                    raise ServiceUnavailable(
                        f"service '{service}' on bus '{self.bus}' has no live replica: {', '.join(restarting)} "
                        f"restarting, and none came back within {budget:.3g} s"
                    ) from None
                self._await_install(min(left, RESTART_LOOK_SECONDS))

    def _seen_dead(self, service: str) -> list[str]:
        """Replicas of ``service`` the registry still lists but this process
        saw die: the router has not yet said whether Ray restarts them (it
        usually hears first; a caller's liveness check can beat it)."""
        insts = self.snapshot["services"].get(service) or {}
        return [i.actor_name or iid for iid, i in insts.items() if iid in self.dead]

    def _await_install(self, seconds: float) -> None:
        """Waits up to ``seconds`` for the watcher to install a newer snapshot
        (the next look asks the router itself, should the watcher be backing off)."""
        with self._installed:
            version = self.snapshot.get("version", -1)
            self._installed.wait_for(lambda: self.closed or self.snapshot.get("version", -1) != version, seconds)

    def _instances(self, service: str) -> list[InstanceInfo]:
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
        if not live:
            # Every replica we know is dead: ask for news (restarted replicas) before failing.
            insts = self.refresh()["services"].get(service) or {}
            live = [i for i in insts.values() if i.instance_id not in self.dead]
        if not live:
            raise ServiceUnavailable(
                f"service '{service}' on bus '{self.bus}' has {len(insts)} replica(s), none of them alive"
            )
        self._live[service] = (self._gen, live)
        return live

    def route(
        self,
        service: str,
        function: str,
        instance: str | None,
        exclude: Sequence[str],
        policy: str | None,
        wait: Callable[[], float] | None = None,
    ) -> tuple[InstanceInfo, Any]:
        """The replica a call goes to and its function's info: ``instance``
        (an instance id or actor name) when given, else one picked by
        ``policy`` (default: the service's) among live replicas not in
        ``exclude`` (all of them if none is left). ``wait()``: how long to
        wait for a replica Ray is restarting, when none is live (:meth:`instances`)."""
        if not isinstance(service, str) or not isinstance(function, str):
            raise InvalidCallArgument(f"service and function must be strings, got {service!r}, {function!r}")
        cands = self.instances(service, wait)
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
            rr = self.rr.get(service)
            if rr is None:
                rr = self.rr[service] = itertools.count()
            inst = pick_instance(pool, policy or pool[0].policy, self.outstanding, self.node_id, rr)
        finfo = inst.functions.get(function)
        if finfo is None:
            raise FunctionNotFound(
                f"service '{service}' has no function '{function}'; it has: "
                f"{', '.join(sorted(inst.functions)) or '(none)'}"
            )
        return inst, finfo

    def mark_dead(self, instance_id: str) -> None:
        """Stops routing to a replica seen dead here, until the registry drops it."""
        self.dead.add(instance_id)
        self._gen += 1

    def transport(self, node_id: str | None) -> Transport:
        """The transport to a subscriber or replica on ``node_id``."""
        if self._factory is not None:
            return self._factory(node_id)
        return self.shm if node_id == self.node_id or self.ray is None else self.ray

    def transport_for(self, inst: InstanceInfo) -> Transport:
        """The transport to one replica: shared memory on this node; across
        nodes, one Ray call straight to the replica's actor (or, for an
        in-process service, which has no actor, to its node's gateway); and
        the direct call on this node too when either side has no ring
        (shared memory is short)."""
        if self._factory is not None:
            return self._factory(inst.node_id)
        if inst.node_id == self.node_id:
            return self.shm if inst.request_queue and self.shm_ok else self.direct
        if inst.actor_name or not inst.request_queue:
            return self.direct
        return self.ray or self.direct

    def shm_full(self, e: BaseException) -> None:
        """This process could not make a ring: go over Ray from now on."""
        self.shm_ok = False
        shm_warn_once(f"a caller on bus '{self.bus}' could not make its reply ring ({e}); its calls go over Ray")

    # -- pub/sub
    def inbox(self, buffer_bytes: int | None = None) -> Inbox:
        if self._inbox is None:
            with self._snap_lock:
                if self._inbox is None:
                    self._inbox = Inbox(self.bus, self.namespace, buffer_bytes or EVENT_RING_BYTES)
        return self._inbox

    def count_sent(self, inst: InstanceInfo, transport: Transport) -> None:
        """One more message (a call or a send) to ``inst`` over ``transport``, in the stats."""
        s = self.stats
        s[transport.name] = s.get(transport.name, 0) + 1
        s["by_instance"][inst.instance_id] = s["by_instance"].get(inst.instance_id, 0) + 1

    def count_call(self, inst: InstanceInfo, transport: Transport, delta: int) -> None:
        """A call to ``inst`` left (``delta`` 1: counted in the stats too) or ended (-1)."""
        iid = inst.instance_id
        self.outstanding[iid] = self.outstanding.get(iid, 0) + delta
        if delta > 0:
            self.stats["calls"] += 1
            self.count_sent(inst, transport)

    def recount_call(self, was: Transport, now: Transport) -> None:
        """A call that could not leave over ``was`` goes over ``now`` instead."""
        s = self.stats
        s[was.name] -= 1
        s[now.name] = s.get(now.name, 0) + 1

    def uncount_call(self, inst: InstanceInfo, transport: Transport) -> None:
        """Takes back the counts of an attempt that never left (it is retried another way)."""
        s = self.stats
        s["calls"] -= 1
        s[transport.name] -= 1
        s["by_instance"][inst.instance_id] -= 1

    def forget_subscription(self, sub_id: str) -> None:
        """Stops delivering ``sub_id``'s events to its callback in this process."""
        if self._inbox is not None:
            self._inbox.callbacks.pop(sub_id, None)
        self.my_subs.pop(sub_id, None)

    def deliver_direct(self, sub: Subscription, req: Request) -> bool:
        """An event for a replica with no ring (shared memory was short): over Ray to its actor."""
        iid = sub.sub_id.split("/", 1)[0]
        for insts in self.snapshot["services"].values():
            inst = insts.get(iid)
            if inst is not None:
                try:
                    self.direct.send(inst, req, 0)
                    return True
                except SageCommError:
                    return False
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self._stop.done():
            self._stop.set_result(True)
        with self._installed:
            self._installed.notify_all()  # calls waiting for a restarting replica give up now
        if self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        if self._inbox is not None:
            self._inbox.close()
        if self._factory is None:  # a factory's transports are its owner's to close
            self.shm.close()
            if self.direct is not self.shm:
                self.direct.close()
        with Endpoint._lock:
            if Endpoint._by_bus.get(self.bus) is self:
                del Endpoint._by_bus[self.bus]
        lifecycle.unregister(self, "endpoints")

    @classmethod
    def close_all(cls) -> None:
        """Closes every endpoint of this process (a replica that stops, a test that ends)."""
        for ep in list(cls._by_bus.values()):
            ep.close()

    @classmethod
    def existing(cls, bus: str) -> Endpoint | None:
        """This process's open endpoint of ``bus``, without creating one."""
        ep = cls._by_bus.get(bus)
        return ep if ep is not None and not ep.closed else None
