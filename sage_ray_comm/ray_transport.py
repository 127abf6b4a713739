"""Calls over Ray: straight to a replica's actor, or through a node's gateway.

- :class:`DirectTransport`: one Ray actor call straight to the replica's
  actor (``ServiceActor.handle``), carrying the same request frame as the
  ring path and served by the same dispatch code. Every call to a deployed
  replica on another node takes it, and so does a call on one node when
  shared memory is short.
- :class:`RayTransport`: a Ray actor call to the gateway actor of the
  replica's node, which makes the shared-memory call there. Only in-process
  services (``X().start()`` in a driver or actor) need it across nodes: they
  have no actor of their own.

The gateway (one detached actor per node) is what still needs a process per
node: the hop to in-process services, delivering events to that node's
subscribers, and the janitor, which every ``JANITOR_SECONDS`` removes
segments of dead processes idle for ``JANITOR_GRACE``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from . import shm
from ._ray import cancel_on_replica, get_or_create_actor, hello_replica
from ._wire import (
    BadRequest,
    Reply,
    Request,
    bad_request_reply,
    decode_request,
    direct_payload,
    frame_bytes,
    frame_kind,
    read_direct_reply,
)
from .errors import CallTimeout, DeserializationError, SageCommError, SerializationError, ServiceUnavailable
from .names import direct_caller_name, gateway_name
from .router import ROUTER_NAMESPACE, InstanceInfo, Subscription
from .shm_transport import ShmTransport
from .transport import Finish, Pending, Transport, settle_from_ref

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_FRAMES",
    "GATEWAY_NAMESPACE",
    "JANITOR_GRACE",
    "JANITOR_SECONDS",
    "DirectTransport",
    "RayTransport",
    "ensure_janitor",
    "forget_bus_on_gateways",
    "get_gateway",
]

log = logging.getLogger(__name__)


GATEWAY_NAMESPACE = "sage_ray_comm"


# How often each node's gateway removes segments of processes that died there,
# and how long such a segment must have been left unwritten first (a process
# that exits cleans up after itself; the janitor is for those that could not).
JANITOR_SECONDS = 5.0


JANITOR_GRACE = 10.0


class _GatewayActor:
    """One per node (named ``sage:gateway:<node id>``, detached). Two jobs that
    need a process on every node:

    - makes shared-memory calls on its node for callers on other nodes;
    - the node's janitor: every :data:`JANITOR_SECONDS` it removes the bus
      segments of processes that died on its node (callers, replicas, jobs
      killed without closing) once unwritten for :data:`JANITOR_GRACE`,
      keeping legacy queues, which outlive their creators until their bus ends.
    """

    def __init__(self) -> None:
        self._transports: dict[str, ShmTransport] = {}
        self._lock = threading.Lock()
        self.collected = 0
        # What went through this gateway: calls and sends (to in-process
        # services), event frames from other nodes, and events handed on.
        self.counts = {"calls": 0, "sends": 0, "event_frames": 0, "events_delivered": 0}
        self._janitor = threading.Thread(target=self._sweep_forever, name="sage-janitor", daemon=True)
        self._janitor.start()

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(JANITOR_SECONDS)  # a detached actor: it lives as long as the node
            try:
                self.collected += len(shm.gc_buses(min_idle=JANITOR_GRACE))
            except Exception as e:  # /dev/shm unreadable for a moment: try next time
                log.debug("janitor sweep failed: %s", e)

    def janitor_stats(self) -> dict:
        """Segments this node's janitor removed so far, and how often it looks."""
        return {"collected": self.collected, "interval": JANITOR_SECONDS, "grace": JANITOR_GRACE, "pid": os.getpid()}

    def stats(self) -> dict:
        """What went through this gateway (see ``counts``), and the janitor's work."""
        return {**self.counts, **self.janitor_stats()}

    def _shm(self, namespace: str) -> ShmTransport:
        t = self._transports.get(namespace)
        if t is None:
            with self._lock:
                t = self._transports.setdefault(namespace, ShmTransport(namespace))
        return t

    def ping(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    # Callers on other nodes send whole request frames (see _wire): the
    # gateway reads the same versioned header a replica does, so a caller on
    # another protocol version is answered here, before anything is run.
    def call(self, namespace: str, inst: InstanceInfo, payload: bytes, timeout: float):
        self.counts["calls"] += 1
        try:
            req = decode_request(payload, frame_kind(payload))
        except BadRequest as e:
            return ("ok", bad_request_reply(e, inst.service, f"the gateway of node {inst.node_id}"))
        try:
            return ("ok", self._shm(namespace).call(inst, req, timeout))
        except SageCommError as e:
            return ("err", e)

    def send(self, namespace: str, inst: InstanceInfo, payload: bytes, timeout: float):
        self.counts["sends"] += 1
        try:
            self._shm(namespace).send(inst, decode_request(payload, frame_kind(payload)), timeout)
            return ("ok", None)
        except BadRequest as e:
            return ("err", DeserializationError(f"gateway of node {inst.node_id}: {e}"))
        except SageCommError as e:
            return ("err", e)

    def deliver(self, namespace: str, subs: list[Subscription], payload: bytes) -> int:
        """One event frame from another node for every subscriber of it on
        this node (one copy per node, not per subscriber): each gets it in
        its ring, as ``function``/``service`` of its subscription. Returns
        how many took it (a full ring drops it, as on the same node)."""
        self.counts["event_frames"] += 1
        try:
            event = decode_request(payload, frame_kind(payload))
        except BadRequest as e:
            log.warning("gateway dropped an event for %d subscriber(s) it could not decode: %s", len(subs), e)
            return 0
        t = self._shm(namespace)
        n = sum(t.deliver(sub, event._replace(function=sub.function or "", service=sub.group or "")) for sub in subs)
        self.counts["events_delivered"] += n
        return n

    def forget(self, namespace: str) -> bool:
        """The bus is shutting down: drop its rings (reply rings, open handles)."""
        with self._lock:
            t = self._transports.pop(namespace, None)
        if t is not None:
            t.close()
        return t is not None


def forget_bus_on_gateways(namespace: str, timeout: float = 10.0) -> int:
    """Tells every node's gateway to drop a bus's rings; returns how many had any."""
    import ray

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == GATEWAY_NAMESPACE and a["name"].startswith("sage:gateway:")
    ]
    refs = []
    for n in names:
        try:
            refs.append(ray.get_actor(n, namespace=GATEWAY_NAMESPACE).forget.remote(namespace))
        except ValueError:
            pass
    try:
        return sum(ray.get(refs, timeout=timeout))
    except Exception:  # a gateway on a lost node: its rings went with the node
        return 0


def ensure_janitor(node_id: str | None) -> None:
    """Makes sure ``node_id`` has its gateway (and so its janitor); once per process and node."""
    if not node_id or node_id in _JANITORS:
        return
    try:
        get_gateway(node_id)
        _JANITORS.add(node_id)
    except SageCommError as e:  # calls still work; only the periodic sweep is missing
        log.warning("no janitor on node %s: %s", node_id, e)


def get_gateway(node_id: str) -> Any:
    """The gateway actor on ``node_id``, created there if missing."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        return get_or_create_actor(
            _GatewayActor,
            gateway_name(node_id),
            GATEWAY_NAMESPACE,
            num_cpus=0,
            max_concurrency=64,
            max_restarts=-1,
            lifetime="detached",  # serves every job's callers on that node
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
    except ValueError as e:
        raise ServiceUnavailable(f"cannot find or create the gateway actor on node {node_id}: {e}") from None


class RayTransport(Transport):
    """Cross-node calls: a Ray actor call to the replica node's gateway."""

    name = "ray"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._gateways: dict[str, Any] = {}

    def _gw(self, inst_or_sub: Any) -> Any:
        node = inst_or_sub.node_id
        gw = self._gateways.get(node)
        if gw is None:
            gw = self._gateways[node] = get_gateway(node)
        return gw

    @staticmethod
    def _unwrap(inst: InstanceInfo, fn: str, out: Any) -> Any:
        kind, value = out
        if kind == "err":
            raise value
        return value

    def _ray_error(self, inst: InstanceInfo, fn: str, e: BaseException) -> SageCommError:
        import ray

        self._gateways.pop(inst.node_id or "", None)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            return CallTimeout(f"call to {inst.service}.{fn} on node {inst.node_id} got no reply in time")
        return ServiceUnavailable(
            f"call to {inst.service}.{fn}: node {inst.node_id} of replica {inst.instance_id} is unreachable "
            f"({type(e).__name__}: {e})"
        )

    def call(self, inst: InstanceInfo, req: Request, timeout: float) -> Reply:
        import ray

        try:
            ref = self._gw(inst).call.remote(self.namespace, inst, frame_bytes(req), timeout)
            # A little slack: the gateway's own timeout error should win the race.
            out = ray.get(ref, timeout=timeout + 1.0)
        except (ray.exceptions.RayError, ServiceUnavailable) as e:
            raise self._ray_error(inst, req.function, e) from None
        return self._unwrap(inst, req.function, out)

    def call_async(self, inst: InstanceInfo, req: Request, timeout: float, finish: Finish) -> concurrent.futures.Future:
        ref = self._gw(inst).call.remote(self.namespace, inst, frame_bytes(req), timeout)
        return settle_from_ref(
            ref,
            finish,
            lambda out: self._unwrap(inst, req.function, out),
            lambda e: self._ray_error(inst, req.function, e),
            timeout,
            lambda: CallTimeout(f"call to {inst.service}.{req.function} on node {inst.node_id} got no reply in time"),
        )

    def send(self, inst: InstanceInfo, req: Request, timeout: float) -> None:
        self._gw(inst).send.remote(self.namespace, inst, frame_bytes(req), timeout)

    def deliver(self, sub: Subscription, req: Request) -> bool:
        return self.deliver_many([sub], req) == 1

    def deliver_many(self, subs: list[Subscription], event: Request) -> int:
        """Sends ``event`` once to the gateway of the subscribers' node (all on
        one node), which hands it to each. Does not wait: returns how many it
        was sent for (at-most-once, as every event)."""
        self._gw(subs[0]).deliver.remote(self.namespace, subs, frame_bytes(event))
        return len(subs)


# A caller coalesces the calls it makes to one replica while that replica
# already runs as many of its calls as it has handler threads: they wait here
# and go in one Ray call (up to this many frames and bytes) when one of the
# running calls returns. Ray's cost is per call, so a pipeline of small calls
# pays it once per batch; a replica that is not saturated gets each call at once.
BATCH_MAX_FRAMES = 64
BATCH_MAX_BYTES = 1 << 20


# A call waiting in a lane: its Ray argument (_wire.direct_payload), its size,
# its pending outcome, and its function's name (for errors).
_Queued = tuple[bytes | tuple, int, Pending, str]


class _Lane:
    """The calls of this process to one replica over Ray: how many Ray calls
    are out, and those queued behind them."""

    __slots__ = ("in_flight", "lock", "queued", "window")

    def __init__(self, window: int) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.window = max(1, window)
        self.queued: list[_Queued] = []

    def take_batch(self) -> tuple[list[_Queued], list[_Queued]]:
        """The next batch of queued calls (the caller holds ``lock``): a fair
        share, 1/``window`` of the queue, so the replica's handler threads
        each get some (a batch runs in order in one thread: taking the whole
        queue would run it on one); at most BATCH_MAX_FRAMES and
        BATCH_MAX_BYTES. Also returns the calls passed over because their
        future was cancelled while queued. The batch is empty only when the
        queue ran out."""
        share = min(BATCH_MAX_FRAMES, -(-len(self.queued) // self.window))
        batch: list[_Queued] = []
        cancelled: list[_Queued] = []
        size, k = 0, 0
        for entry in self.queued:
            if batch and (len(batch) == share or size + entry[1] > BATCH_MAX_BYTES):
                break
            k += 1
            if entry[2].future.set_running_or_notify_cancel():  # from here on, cancel() says False
                batch.append(entry)
                size += entry[1]
            else:
                cancelled.append(entry)  # cancel() said True: it is never sent
        del self.queued[:k]
        return batch, cancelled


class DirectTransport(Transport):
    """A Ray actor call straight to the replica's actor, served by the same
    dispatch code as the ring path (``ServiceActor.handle``): every call to a
    deployed replica on another node, and a call on this node when shared
    memory is short.

    ``call_async`` sends each call at once while the replica runs fewer of
    this process's calls than it has handler threads (``max_concurrency``);
    beyond that, calls queue here and go in batches (``handle_many``) as
    running ones return, as Ray Serve's router holds requests beyond a
    replica's ``max_ongoing_requests``. Each call keeps its own deadline,
    reply and errors."""

    name = "ray"

    def __init__(self, namespace: str, release: Callable[[Any], None] | None = None) -> None:
        """``release``: how close() lets go of this caller's life (a Ray
        object; see _hello); None: it is dropped."""
        self.namespace = namespace
        self._release = release
        self._actors: dict[str, Any] = {}
        self._lanes: dict[str, _Lane] = {}
        # call_async calls, and the Ray calls that carried them (fewer when batched).
        self.counts = {"calls": 0, "ray_calls": 0}
        # Who this caller is to the replicas it calls (a dead one on their host is noticed).
        self.caller = direct_caller_name(os.getpid(), shm.host_id(), uuid.uuid4().hex[:12])
        self._cancel_ids = itertools.count(1)
        self._life: Any = None  # see _hello

    def _actor(self, inst: InstanceInfo) -> Any:
        a = self._actors.get(inst.instance_id)
        if a is None:
            import ray

            if not inst.actor_name:
                raise ServiceUnavailable(
                    f"replica {inst.instance_id} of service '{inst.service}' serves only through shared memory, "
                    "and there is no room in /dev/shm for this caller's reply ring"
                )
            try:
                a = ray.get_actor(inst.actor_name, namespace=ROUTER_NAMESPACE)
            except ValueError:
                raise ServiceUnavailable(f"replica {inst.instance_id} of service '{inst.service}' is gone") from None
            self._actors[inst.instance_id] = a
            self._hello(a)
        return a

    def _error(self, inst: InstanceInfo, fn: str, e: BaseException) -> SageCommError:
        import ray

        self._actors.pop(inst.instance_id, None)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            return CallTimeout(
                f"call to {inst.service}.{fn} (replica {inst.instance_id}, over Ray) got no reply in time"
            )
        return ServiceUnavailable(
            f"replica {inst.instance_id} of service '{inst.service}' died or is unreachable "
            f"while handling '{fn}' ({type(e).__name__})"
        )

    def call(self, inst: InstanceInfo, req: Request, timeout: float) -> Reply:
        import ray

        try:
            out = ray.get(self._actor(inst).handle.remote(direct_payload(req)[0]), timeout=timeout + 1.0)
        except ray.exceptions.RayError as e:
            raise self._error(inst, req.function, e) from None
        return read_direct_reply(out)

    def call_async(self, inst: InstanceInfo, req: Request, timeout: float, finish: Finish) -> concurrent.futures.Future:
        # The frame names this caller and carries an id to cancel the call by
        # once it is sent: the replica skips it if it has not started (cancels.py).
        cancel_id = next(self._cancel_ids)
        payload, nbytes = direct_payload(req._replace(reply_to=self.caller), cancel_id)
        fn = req.function
        call = Pending(
            finish,
            timeout,
            lambda: CallTimeout(
                f"call to {inst.service}.{fn} (replica {inst.instance_id}, over Ray) got no reply in time"
            ),
            running=False,  # while it waits in the lane, cancel() can still keep it from being sent
            canceller=functools.partial(self._cancel_sent, inst, cancel_id, timeout),
        )
        lane = self._lanes.get(inst.instance_id)
        if lane is None:
            lane = self._lanes.setdefault(inst.instance_id, _Lane(inst.max_concurrency))
        with lane.lock:
            self.counts["calls"] += 1
            if lane.in_flight >= lane.window:
                lane.queued.append((payload, nbytes, call, fn))
                return call.future
            lane.in_flight += 1
            self.counts["ray_calls"] += 1
            call.future.set_running_or_notify_cancel()  # sent at once: nobody could cancel it yet
        self._send(inst, lane, [(payload, nbytes, call, fn)])
        return call.future

    def _hello(self, actor: Any) -> None:
        """The first call to a replica hands it this caller's life
        (callers.py): if this process dies, the replica cancels its calls
        and closes its streams, even from another host."""
        import ray

        if self._life is None:
            self._life = ray.put(b"")  # owned by this process: Ray fails it when the process dies
        hello_replica(actor, self.caller, self._life)

    def _cancel_sent(self, inst: InstanceInfo, cancel_id: int, ttl: float) -> bool:
        """cancel() of a call already sent: a round trip to its replica, True
        only when the replica confirms it will never start it."""
        return (
            bool(inst.actor_name)
            and cancel_on_replica(inst.actor_name or "", ROUTER_NAMESPACE, [(self.caller, cancel_id)], ttl)[0]
        )

    def _send(self, inst: InstanceInfo, lane: _Lane, batch: list[_Queued]) -> None:
        """One Ray call with ``batch``; its completion settles each call and
        sends the next batch queued meanwhile."""
        try:
            actor = self._actor(inst)
            if len(batch) == 1:
                ref = actor.handle.remote(batch[0][0])
            else:
                ref = actor.handle_many.remote([payload for payload, _, _, _ in batch])
        except SageCommError as e:  # the replica is gone: these calls fail, the queue moves on
            self._settle(inst, lane, batch, None, e)
            return
        except Exception as e:  # Ray could not serialize an argument sent beside the frame
            err = SerializationError(f"cannot send the arguments of {inst.service}.{batch[0][3]} over Ray: {e}")
            self._settle(inst, lane, batch, None, err)
            return
        ref.future().add_done_callback(functools.partial(self._done, inst, lane, batch))

    def _done(self, inst: InstanceInfo, lane: _Lane, batch: list[_Queued], f: concurrent.futures.Future) -> None:
        try:
            out, exc = f.result(), None
        except BaseException as e:
            out, exc = None, e
        self._settle(inst, lane, batch, out, exc)

    def _settle(
        self,
        inst: InstanceInfo,
        lane: _Lane,
        batch: list[_Queued],
        out: Any,
        exc: BaseException | None,
    ) -> None:
        import ray

        with lane.lock:  # keep the replica busy first: the next batch goes before these settle
            nxt, cancelled = lane.take_batch() if lane.queued else ([], [])
            if not nxt:
                lane.in_flight -= 1
            else:
                self.counts["ray_calls"] += 1
        if nxt:
            self._send(inst, lane, nxt)
        for (
            _payload,
            _nbytes,
            call,
            _fn,
        ) in cancelled:  # their accounting (in flight, metrics); the future stays cancelled
            call.complete(None, concurrent.futures.CancelledError())
        replies = [out] if exc is None and len(batch) == 1 else out
        for k, (_payload, _nbytes, call, fn) in enumerate(batch):
            if exc is None:
                try:
                    call.complete(read_direct_reply(replies[k]), None)
                except BaseException as e:  # a reply that does not unpickle here
                    call.complete(None, e)
            elif isinstance(exc, (ray.exceptions.RayError, SageCommError)):
                call.complete(None, exc if isinstance(exc, SageCommError) else self._error(inst, fn, exc))
            else:
                call.complete(None, exc)

    def send(self, inst: InstanceInfo, req: Request, timeout: float) -> None:
        self._actor(inst).handle.remote(direct_payload(req)[0])

    def close(self) -> None:
        life, self._life = self._life, None
        if life is not None and self._release is not None:
            self._release(life)  # the endpoint's lifecycle.release: never freed while Ray shuts down

    def deliver(self, sub: Subscription, req: Request) -> bool:
        return False  # subscribers always have a ring; see FunctionClient.broadcast


_JANITORS: set = set()
