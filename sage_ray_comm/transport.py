"""Transports: how a request reaches a replica and its reply comes back.

One small interface, :class:`Transport`, with two implementations:

- :class:`ShmTransport` (caller and replica on the same Ray node): the request
  frame goes into the replica's request ring, the reply into the caller's
  reply ring, matched by correlation id. Synchronous calls use a reply ring
  per calling thread, read by that thread itself: no hand-off between threads
  on the hot path. Asynchronous calls share one ring per process, read by one
  thread that completes the futures.
- :class:`RayTransport` (different nodes): a Ray actor call to the
  :class:`_GatewayActor` of the replica's node, which makes the same shared
  memory call there and returns the reply. Same semantics, one more hop.

Payloads larger than a ring's frame limit travel in a one-off segment (the
frame carries a :class:`SegmentBlob`); across nodes, Ray's object store
carries them.

The client's routing logic only sees :class:`Transport`, so it is unit-tested
with a fake one (``tests/test_client_routing.py``).
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from . import shm
from ._future import CallFuture
from ._wire import (
    KIND_REQ_OOB,
    ST_OK,
    ST_OK_BLOB,
    BadRequest,
    Reply,
    Request,
    decode_request,
    encode_payload,
    encode_request,
    gateway_name,
    reply_ring_name,
)
from .errors import (
    CallTimeout,
    MessageTooLarge,
    QueueClosed,
    QueueEmpty,
    QueueFull,
    QueueNotFound,
    SageCommError,
    SerializationError,
    ServiceUnavailable,
)
from .queue import SageQueue
from .router import ROUTER_NAMESPACE, InstanceInfo, Subscription, get_or_create_actor

__all__ = [
    "DirectTransport",
    "RayTransport",
    "RingPool",
    "SegmentBlob",
    "ShmTransport",
    "Transport",
    "check_shm_space",
    "ensure_janitor",
    "get_gateway",
    "shm_warn_once",
]

log = logging.getLogger(__name__)

REQUEST_RING_BYTES = 8 << 20  # one frame may be half: 4 MiB
# How long a waiting reader spins before it sleeps on the futex. A caller
# waiting for a reply spins longer than a queue consumer's default 20 us: a
# futex wake-up costs ~40 us here, more than most handlers take.
REPLY_SPIN_US = 100.0
REQUEST_SPIN_US = 50.0
REPLY_RING_BYTES = 8 << 20
EVENT_RING_BYTES = 4 << 20
# While waiting for a reply, check this often that the replica still lives, so
# a dead replica costs a caller at most this long, not its whole timeout.
LIVENESS_SLICE = 0.25
GATEWAY_NAMESPACE = "sage_ray_comm"
# How often each node's gateway removes segments of processes that died there,
# and how long such a segment must have been left unwritten first (a process
# that exits cleans up after itself; the janitor is for those that could not).
JANITOR_SECONDS = 5.0
JANITOR_GRACE = 10.0
# reply_to of a request that came as a Ray actor call (no reply ring involved).
DIRECT_PREFIX = "@direct:"
# Below this much free /dev/shm a process warns once at start: a caller needs
# a reply ring per calling thread, a replica its request ring (8 MiB each).
SHM_COMFORT_BYTES = 64 << 20


# ------------------------------------------------------------ /dev/shm room
_SHM_WARNED = False


def shm_warn_once(what: str) -> None:
    """Logs, once per process, that shared memory is short and calls go over Ray."""
    global _SHM_WARNED
    if _SHM_WARNED:
        return
    _SHM_WARNED = True
    total, free = shm.shm_space()
    log.warning(
        "sage_ray_comm: /dev/shm is short (%d MiB free of %d MiB; each ring needs %d MiB, about %d MiB per "
        "calling process and per replica): %s. What does not fit goes through Ray instead (slower). "
        "Give it more room, e.g. `docker run --shm-size=1g`.",
        free >> 20,
        total >> 20,
        REPLY_RING_BYTES >> 20,
        (REPLY_RING_BYTES + REQUEST_RING_BYTES) >> 20,
        what,
    )


def check_shm_space() -> bool:
    """Warns once when /dev/shm has less free room than a caller and a replica
    need; True when it has enough. Called when a process first uses a bus."""
    total, free = shm.shm_space()
    if total and free < SHM_COMFORT_BYTES:
        shm_warn_once(f"less than {SHM_COMFORT_BYTES >> 20} MiB free leaves room for a few rings only")
        return False
    return True


# ------------------------------------------------------------ oversize
class SegmentBlob:
    """An oversize payload in a one-off shared-memory segment of its own.

    A frame may hold at most half its ring. A larger request or reply is
    written into a fresh segment sized for it, and the frame carries only
    this small handle. The receiver reads it and unlinks the segment; the
    sender unlinks it too once the call is over (for a receiver that died
    first), so none is left behind. Same node only: across nodes the Ray
    transport carries large payloads through Ray's object store itself.

    (Ray's ObjectRefs cannot be used here: an ObjectRef pickled outside Ray's
    own task arguments cannot be fetched by another worker in Ray 2.x; see
    ``tests/test_transport.py::test_out_of_band_object_refs_do_not_resolve``.)
    """

    __slots__ = ("name", "namespace", "nbytes")

    def __init__(self, name: str, namespace: str, nbytes: int) -> None:
        self.name = name
        self.namespace = namespace
        self.nbytes = nbytes

    @classmethod
    def put(cls, obj: Any, namespace: str) -> SegmentBlob:
        parts, kind = encode_payload(obj, f"an oversize payload in namespace '{namespace}'")
        nbytes = sum(memoryview(p).nbytes for p in parts)
        name = f"blob.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        cap = 2 * (nbytes + 64) + 4096
        if cap > shm.MAX_SEGMENT_BYTES:
            raise MessageTooLarge(
                f"a {nbytes}-byte payload exceeds the largest shared-memory segment ({shm.MAX_SEGMENT_BYTES // 2} bytes)"
            )
        q = SageQueue(name, cap, auto_cleanup=False, namespace=namespace)
        try:
            q.put_frame(parts, kind, 0.0)
        except BaseException:
            q.unlink()
            raise
        finally:
            q.release()
        return cls(name, namespace, nbytes)

    def get(self) -> Any:
        """Reads the payload and removes the segment (each blob is read once)."""
        try:
            q = SageQueue(self.name, auto_cleanup=False, namespace=self.namespace, create=False)
        except QueueNotFound:
            raise ServiceUnavailable(
                f"the {self.nbytes}-byte payload segment '{self.name}' is gone (its sender gave up or died)"
            ) from None
        try:
            return q.get(timeout=0)
        finally:
            q.unlink()
            q.release()

    def discard(self) -> None:
        """Removes the segment if the receiver has not (it died, or never came)."""
        try:
            shm.unlink(shm.segment_name(self.namespace, self.name))
        except Exception:
            pass

    def __reduce__(self):
        return (SegmentBlob, (self.name, self.namespace, self.nbytes))


def put_request(q: SageQueue, req: Request | tuple, timeout: float | None) -> None:
    """Writes one request frame (see _wire) into a replica's or subscriber's ring."""
    parts, kind = encode_request(req, q.label)
    q.put_frame(parts, kind, 0.0 if timeout == 0 else timeout)


def take_request(q: SageQueue) -> Request | BadRequest | None:
    """Waits for the next frame in a request or event ring and decodes it.

    Returns the Request; or the BadRequest for a frame whose header decoded
    but whose body did not, or that speaks another protocol version (the
    sender can still be answered); or None for a frame that is not a request
    at all (consumed and logged: the ring keeps serving). Raises QueueClosed
    once the ring is closed and drained.
    """
    payload, kind = q.get_frame(None, KIND_REQ_OOB)
    try:
        return decode_request(payload, kind)
    except BadRequest as e:
        return e
    except ValueError as e:
        log.warning("%s: dropped a frame that is not a request: %s", q.label, e)
        return None


def request_args(req: Request) -> tuple[tuple, dict | None]:
    """A request's positional and keyword arguments, read out of their
    segment when they were too large for the ring."""
    if isinstance(req.args, SegmentBlob):
        args, kwargs = req.args.get()
        return args, kwargs
    return req.args, req.kwargs


# ------------------------------------------------------------------ malloc
_TUNED = False
# glibc's mallopt parameters (malloc.h) and the values set.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 128 << 20


def tune_malloc() -> bool:
    """Keeps glibc from returning freed memory to the OS after every large message.

    By default glibc serves allocations over 128 KiB with fresh mmaps and trims
    the heap when its top is free, so each 1 MiB message pays for 256 page
    faults (measured: 1.1 ms against 0.09 ms for a 1 MiB ring round trip).
    Raising both thresholds keeps up to 128 MiB of freed memory for reuse.
    Applied once per process that makes or serves calls; set
    ``SAGE_COMM_TUNE_MALLOC=0`` to leave malloc alone.
    """
    global _TUNED
    if _TUNED or os.environ.get("SAGE_COMM_TUNE_MALLOC", "1") == "0":
        return _TUNED
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError):  # not glibc: nothing to tune
        ok = False
    _TUNED = ok  # a failed mallopt is tried again next time, never reported as done
    return ok


# ------------------------------------------------------------------- rings
class RingPool:
    """Open handles to other processes' rings in one bus namespace, by name."""

    def __init__(self, namespace: str, limit: int = 512) -> None:
        self.namespace = namespace
        self.limit = limit
        self._rings: collections.OrderedDict[str, SageQueue] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> SageQueue:
        q = self._rings.get(name)  # lock-free hit: dict reads are atomic under the GIL
        if q is not None:
            return q
        with self._lock:
            q = self._rings.get(name)
            if q is None:
                q = SageQueue(name, namespace=self.namespace, auto_cleanup=False, create=False)
                self._rings[name] = q
                while len(self._rings) > self.limit:
                    _, old = self._rings.popitem(last=False)
                    old.release()
            return q

    def drop(self, name: str) -> None:
        with self._lock:
            q = self._rings.pop(name, None)
        if q is not None:
            q.release()

    def close(self) -> None:
        with self._lock:
            rings, self._rings = list(self._rings.values()), collections.OrderedDict()
        for q in rings:
            q.release()


def instance_alive(inst: InstanceInfo) -> bool:
    """Whether the replica's process still runs (same host only)."""
    return shm.process_alive(inst.pid, inst.pid_start)


# --------------------------------------------------------------- interface
# finish(reply, error) -> value, or raises: turns a reply into the call's outcome.
Finish = Callable[[Reply | None, BaseException | None], Any]


def settle(fut: concurrent.futures.Future, finish: Finish, rep: Reply | None, exc: BaseException | None) -> None:
    """Completes ``fut`` with ``finish(rep, exc)``."""
    try:
        value = finish(rep, exc)
    except BaseException as e:
        if not fut.done():
            fut.set_exception(e)
        return
    if not fut.done():
        fut.set_result(value)


def settle_from_ref(
    ref: Any, finish: Finish, unwrap: Callable[[Any], Reply], ray_error: Callable[[BaseException], BaseException]
) -> concurrent.futures.Future:
    """A future completed, on Ray's callback, with ``finish`` of the reply that
    ``unwrap`` makes of the Ray object, or of the error ``ray_error`` maps a
    RayError to (the Ray transports' call_async)."""
    import ray

    result: concurrent.futures.Future = CallFuture()

    def done(f: concurrent.futures.Future) -> None:
        try:
            rep, exc = unwrap(f.result()), None
        except ray.exceptions.RayError as e:
            rep, exc = None, ray_error(e)
        except BaseException as e:
            rep, exc = None, e
        settle(result, finish, rep, exc)

    ref.future().add_done_callback(done)
    return result


class Transport(abc.ABC):
    """Carries requests to one replica. ``name`` is what stats call it."""

    name = "?"

    @abc.abstractmethod
    def call(self, inst: InstanceInfo, req: Request, timeout: float) -> Reply:
        """Sends ``req`` and waits for its reply. Raises CallTimeout, ServiceUnavailable."""

    @abc.abstractmethod
    def call_async(self, inst: InstanceInfo, req: Request, timeout: float, finish: Finish) -> concurrent.futures.Future:
        """Sends ``req`` and returns a future at once. When the reply (or a
        transport error) arrives, the future gets ``finish(reply, None)`` (or
        ``finish(None, error)``): its return value, or what it raises."""

    @abc.abstractmethod
    def send(self, inst: InstanceInfo, req: Request, timeout: float) -> None:
        """Delivers ``req`` with no reply. Blocks (up to ``timeout``) while the replica is full."""

    @abc.abstractmethod
    def deliver(self, sub: Subscription, req: Request) -> bool:
        """Offers an event to a subscriber without blocking; False if its buffer was full."""

    def close(self) -> None:  # noqa: B027 - optional: most transports hold nothing
        """Releases what the transport holds (rings, threads)."""


class _ReplyRing:
    __slots__ = ("cids", "name", "queue")

    def __init__(self, namespace: str) -> None:
        self.name = reply_ring_name(os.getpid(), uuid.uuid4().hex[:12])
        self.queue = SageQueue(
            self.name, REPLY_RING_BYTES, auto_cleanup=True, namespace=namespace, spin_us=REPLY_SPIN_US
        )
        self.cids = itertools.count(1)


class ShmTransport(Transport):
    """Same-node calls through shared-memory rings (see the module docstring)."""

    name = "shm"

    def __init__(self, namespace: str) -> None:
        tune_malloc()
        self.namespace = namespace
        self.pool = RingPool(namespace)
        self._tls = threading.local()
        self._rings: list = []  # every reply ring made, released by close()
        self._lock = threading.Lock()
        self._async: _ReplyRing | None = None
        self._pending: dict[int, tuple] = {}  # cid -> (future, instance, monotonic end, blob, finish)
        self._reader: threading.Thread | None = None
        self._closed = False
        self.stale_replies = 0

    # -- request side
    def _put(
        self, inst: InstanceInfo, req: Request, timeout: float | None, cid: int = 0, reply_to: str | None = None
    ) -> SegmentBlob | None:
        """Puts the request frame (with ``cid`` and ``reply_to`` filled in);
        returns the blob it had to park, if any."""
        try:
            q = self.pool.get(inst.request_queue)
        except QueueNotFound:
            raise ServiceUnavailable(
                f"replica {inst.instance_id} of service '{inst.service}' is gone (its request queue "
                f"no longer exists) while calling '{req.function}'"
            ) from None
        blob = None
        try:
            try:
                # A plain tuple pickles 4x faster than the NamedTuple, and building it
                # directly beats NamedTuple._replace by 10x.
                put_request(q, (req[0], cid, req[2], req[3], req[4], reply_to, req[6], req[7], req[8], req[9]), timeout)
            except MessageTooLarge:
                blob = SegmentBlob.put((req.args, req.kwargs), self.namespace)
                put_request(q, (req[0], cid, req[2], blob, None, reply_to, req[6], req[7], req[8], req[9]), timeout)
        except SerializationError as e:
            if blob is not None:
                blob.discard()
            cause = e.__cause__ or e
            raise SerializationError(
                f"the arguments of the call to {inst.service}.{req.function} cannot be pickled: "
                f"{type(cause).__name__}: {cause}"
            ) from None
        except QueueFull:
            if blob is not None:
                blob.discard()
            raise CallTimeout(
                f"call to {inst.service}.{req.function}: replica {inst.instance_id}'s request queue "
                f"stayed full for {timeout:.3g} s (backpressure: the replica is overloaded)"
            ) from None
        except QueueClosed:
            if blob is not None:
                blob.discard()
            self.pool.drop(inst.request_queue)
            raise ServiceUnavailable(
                f"replica {inst.instance_id} of service '{inst.service}' is stopping (its request "
                f"queue is closed); call to '{req.function}' not delivered"
            ) from None
        return blob

    @staticmethod
    def _resolve(inst: InstanceInfo, rep: Reply) -> Reply:
        """Reads an oversize reply out of its segment."""
        if rep.status != ST_OK_BLOB:
            return rep
        return Reply(rep.cid, ST_OK, rep.value.get())

    def _thread_ring(self) -> _ReplyRing:
        r = getattr(self._tls, "ring", None)
        if r is None:
            r = _ReplyRing(self.namespace)
            self._tls.ring = r
            with self._lock:
                self._rings.append(r)
        return r

    def call(self, inst: InstanceInfo, req: Request, timeout: float) -> Reply:
        ring = self._thread_ring()
        cid = next(ring.cids)
        end = time.monotonic() + timeout
        blob = self._put(inst, req, timeout, cid, ring.name)
        try:
            get = ring.queue.get
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise CallTimeout(
                        f"call to {inst.service}.{req.function} (replica {inst.instance_id}) got no "
                        f"reply within {timeout:.3g} s"
                    )
                try:
                    rep = get(timeout=min(left, LIVENESS_SLICE))
                except QueueEmpty:
                    if not instance_alive(inst):
                        raise ServiceUnavailable(
                            f"replica {inst.instance_id} of service '{inst.service}' (pid {inst.pid}) "
                            f"died while handling '{req.function}'"
                        ) from None
                    continue
                if rep[0] == cid:
                    return self._resolve(inst, Reply(*rep))
                self._stale(inst, rep)
        finally:
            if blob is not None:
                blob.discard()

    def _stale(self, inst: InstanceInfo, rep: tuple) -> None:
        # The reply to a call that already timed out: drop it (and its segment).
        self.stale_replies += 1
        if rep[1] == ST_OK_BLOB:
            rep[2].discard()

    # -- asynchronous calls: one shared ring, one reader thread
    def _async_ring(self) -> _ReplyRing:
        if self._async is None:
            with self._lock:
                if self._async is None:
                    if self._closed:
                        raise ServiceUnavailable("the client is closed")
                    r = _ReplyRing(self.namespace)
                    self._rings.append(r)
                    self._reader = threading.Thread(target=self._read_loop, args=(r,), name="sage-replies", daemon=True)
                    self._async = r
                    self._reader.start()
        return self._async

    def call_async(self, inst: InstanceInfo, req: Request, timeout: float, finish: Finish) -> concurrent.futures.Future:
        ring = self._async_ring()
        cid = next(ring.cids)
        fut: concurrent.futures.Future = CallFuture()
        self._pending[cid] = (fut, inst, time.monotonic() + timeout, None, finish)
        try:
            blob = self._put(inst, req, timeout, cid, ring.name)
        except BaseException:
            self._pending.pop(cid, None)
            raise
        if blob is not None:
            entry = self._pending.get(cid)
            if entry is not None:
                self._pending[cid] = (*entry[:3], blob, finish)
            else:
                blob.discard()
        return fut

    def _finish(self, cid: int, rep: Reply | None = None, exc: BaseException | None = None) -> None:
        entry = self._pending.pop(cid, None)
        if entry is None:
            return
        fut, inst, _, blob, finish = entry
        if blob is not None:
            blob.discard()
        if exc is None:
            try:
                rep = self._resolve(inst, rep)  # type: ignore[arg-type]
            except BaseException as e:  # the oversize reply's segment could not be read
                rep, exc = None, e
        settle(fut, finish, rep, exc)

    def _read_loop(self, ring: _ReplyRing) -> None:
        last_sweep = time.monotonic()
        get, pending = ring.queue.get, self._pending
        while True:
            try:
                rep = get(timeout=LIVENESS_SLICE)
                entry = pending.pop(rep[0], None)
                if entry is None:
                    self._stale(None, rep)
                elif entry[3] is None and rep[1] == ST_OK:
                    settle(entry[0], entry[4], rep, None)  # the common case, inline
                else:
                    pending[rep[0]] = entry
                    self._finish(rep[0], Reply(*rep))
            except QueueEmpty:
                pass
            except QueueClosed:
                break
            except Exception:  # a reply that failed to unpickle: its call times out
                log.exception("undecodable reply on %s", ring.name)
            now = time.monotonic()
            if self._pending and now - last_sweep >= LIVENESS_SLICE:
                last_sweep = now
                self._sweep(now)
        for cid in list(self._pending):
            self._finish(cid, exc=ServiceUnavailable("the client was closed before the reply arrived"))

    def _sweep(self, now: float) -> None:
        """Fails calls past their timeout, and calls to replicas that died."""
        dead: dict[str, bool] = {}
        for cid, (_fut, inst, end, *_) in list(self._pending.items()):
            if now >= end:
                self._finish(
                    cid, exc=CallTimeout(f"call to {inst.service} (replica {inst.instance_id}) got no reply in time")
                )
                continue
            alive = dead.get(inst.instance_id)
            if alive is None:
                alive = dead[inst.instance_id] = instance_alive(inst)
            if not alive:
                self._finish(
                    cid,
                    exc=ServiceUnavailable(
                        f"replica {inst.instance_id} of service '{inst.service}' (pid {inst.pid}) died before replying"
                    ),
                )

    # -- no reply
    def send(self, inst: InstanceInfo, req: Request, timeout: float) -> None:
        self._put(inst, req, timeout)
        # An oversize fire-and-forget payload's segment is removed by its reader
        # (or by gc, should the replica die before reading it).

    def deliver(self, sub: Subscription, req: Request) -> bool:
        try:
            q = self.pool.get(sub.queue)
        except QueueNotFound:
            return False
        try:
            put_request(q, tuple(req), 0)
            return True
        except (QueueFull, QueueClosed):
            return False
        except MessageTooLarge:
            blob = SegmentBlob.put((req.args, req.kwargs), self.namespace)
            try:
                put_request(q, tuple(req._replace(args=blob, kwargs=None)), 0)
                return True
            except (QueueFull, QueueClosed):
                blob.discard()
                return False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            rings, self._rings = self._rings, []
        for r in rings:
            r.queue.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2)
        for r in rings:
            r.queue.release()
        self.pool.close()


# --------------------------------------------------------------- Ray path
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

    def _shm(self, namespace: str) -> ShmTransport:
        t = self._transports.get(namespace)
        if t is None:
            with self._lock:
                t = self._transports.setdefault(namespace, ShmTransport(namespace))
        return t

    def ping(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def call(self, namespace: str, inst: InstanceInfo, req: Request, timeout: float):
        try:
            return ("ok", self._shm(namespace).call(inst, req, timeout))
        except SageCommError as e:
            return ("err", e)

    def send(self, namespace: str, inst: InstanceInfo, req: Request, timeout: float):
        try:
            self._shm(namespace).send(inst, req, timeout)
            return ("ok", None)
        except SageCommError as e:
            return ("err", e)

    def deliver(self, namespace: str, sub: Subscription, req: Request) -> bool:
        return self._shm(namespace).deliver(sub, req)

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


_JANITORS: set = set()


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

        self._gateways.pop(inst.node_id, None)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            return CallTimeout(f"call to {inst.service}.{fn} on node {inst.node_id} got no reply in time")
        return ServiceUnavailable(
            f"call to {inst.service}.{fn}: node {inst.node_id} of replica {inst.instance_id} is unreachable "
            f"({type(e).__name__}: {e})"
        )

    def call(self, inst: InstanceInfo, req: Request, timeout: float) -> Reply:
        import ray

        try:
            ref = self._gw(inst).call.remote(self.namespace, inst, req, timeout)
            # A little slack: the gateway's own timeout error should win the race.
            out = ray.get(ref, timeout=timeout + 1.0)
        except (ray.exceptions.RayError, ServiceUnavailable) as e:
            raise self._ray_error(inst, req.function, e) from None
        return self._unwrap(inst, req.function, out)

    def call_async(self, inst: InstanceInfo, req: Request, timeout: float, finish: Finish) -> concurrent.futures.Future:
        ref = self._gw(inst).call.remote(self.namespace, inst, req, timeout)
        return settle_from_ref(
            ref,
            finish,
            lambda out: self._unwrap(inst, req.function, out),
            lambda e: self._ray_error(inst, req.function, e),
        )

    def send(self, inst: InstanceInfo, req: Request, timeout: float) -> None:
        self._gw(inst).send.remote(self.namespace, inst, req, timeout)

    def deliver(self, sub: Subscription, req: Request) -> bool:
        self._gw(sub).deliver.remote(self.namespace, sub, req)
        return True


# ------------------------------------------------------------ direct to a replica
class DirectTransport(Transport):
    """A Ray actor call straight to the replica's actor, served by the same
    dispatch code as the ring path (``_ServiceActor.handle``). Used when
    shared memory is short: a replica that could not make its request ring,
    or a caller that could not make a reply ring."""

    name = "ray"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._actors: dict[str, Any] = {}

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
        return a

    @staticmethod
    def _frame(req: Request) -> tuple[bytes, int]:
        # The same frame as the ring path (header and all), as one bytes.
        parts, kind = encode_request(req._replace(cid=0, reply_to=None), "a call over Ray")
        return b"".join(parts), kind

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
            out = ray.get(self._actor(inst).handle.remote(*self._frame(req)), timeout=timeout + 1.0)
        except ray.exceptions.RayError as e:
            raise self._error(inst, req.function, e) from None
        return Reply(*out)

    def call_async(self, inst: InstanceInfo, req: Request, timeout: float, finish: Finish) -> concurrent.futures.Future:
        ref = self._actor(inst).handle.remote(*self._frame(req))
        return settle_from_ref(ref, finish, lambda out: Reply(*out), lambda e: self._error(inst, req.function, e))

    def send(self, inst: InstanceInfo, req: Request, timeout: float) -> None:
        self._actor(inst).handle.remote(*self._frame(req))

    def deliver(self, sub: Subscription, req: Request) -> bool:
        return False  # subscribers always have a ring; see FunctionClient.broadcast
