"""Same-node calls through shared-memory rings (:class:`ShmTransport`).

The request frame (see ``_wire``) goes into the replica's request ring, the
reply into the caller's reply ring, matched by correlation id. Synchronous
calls use a reply ring per calling thread, read by that thread itself: no
hand-off between threads on the hot path. Asynchronous calls share one ring
per process, read by one thread that completes the futures.

Payloads larger than a ring's frame limit travel in a one-off segment (the
frame carries a :class:`SegmentBlob`). The helpers that write and read
request frames (:func:`put_request`, :func:`take_request`) are shared with the
replica's dispatcher and the event inbox.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import logging
import os
import threading
import time
import uuid
from typing import Any

from . import shm
from ._future import CallFuture
from ._ray import cancel_on_replica
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
    request_tuple,
)
from .errors import (
    CallTimeout,
    MessageTooLarge,
    QueueClosed,
    QueueEmpty,
    QueueFull,
    QueueNotFound,
    SerializationError,
    ServiceUnavailable,
    SharedMemoryFull,
)
from .malloc import tune_malloc
from .names import blob_name, reply_ring_name, request_ring_name
from .queue import SageQueue
from .router import ROUTER_NAMESPACE, InstanceInfo, Subscription
from .transport import REPLY_RING_BYTES, REPLY_SPIN_US, REQUEST_SPIN_US, Finish, Transport, settle, shm_warn_once

__all__ = [
    "RingPool",
    "SegmentBlob",
    "ShmTransport",
    "instance_alive",
    "open_request_ring",
    "put_request",
    "request_args",
    "take_request",
]

log = logging.getLogger(__name__)


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
        name = blob_name(os.getpid(), uuid.uuid4().hex[:12])
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


def put_request_parking(
    q: SageQueue, req: Request, timeout: float | None, namespace: str, cid: int, reply_to: str | None
) -> SegmentBlob | None:
    """Writes ``req`` (with this attempt's ``cid`` and ``reply_to``) into a
    ring; arguments too large for it go into a segment the frame then carries.
    Returns that segment (None if not needed); if the frame still cannot be
    written, the segment is removed and the error raised."""
    try:
        put_request(q, request_tuple(req, cid, reply_to), timeout)
        return None
    except MessageTooLarge:
        blob = SegmentBlob.put((req.args, req.kwargs), namespace)
    try:
        put_request(q, request_tuple(req, cid, reply_to, blob, None), timeout)
    except BaseException:
        blob.discard()
        raise
    return blob


def take_request(q: SageQueue) -> tuple[Request | BadRequest | None, int]:
    """Waits for the next frame in a request or event ring and decodes it.

    Returns the frame's size (for spans) and the Request; or the BadRequest for a frame whose header decoded
    but whose body did not, or that speaks another protocol version (the
    sender can still be answered); or None for a frame that is not a request
    at all (consumed and logged: the ring keeps serving). Raises QueueClosed
    once the ring is closed and drained.
    """
    payload, kind = q.get_frame(None, KIND_REQ_OOB)
    try:
        return decode_request(payload, kind), len(payload)
    except BadRequest as e:
        return e, len(payload)
    except ValueError as e:
        log.warning("%s: dropped a frame that is not a request: %s", q.label, e)
        return None, len(payload)


def request_args(req: Request) -> tuple[tuple, dict | None]:
    """A request's positional and keyword arguments, read out of their
    segment when they were too large for the ring."""
    if isinstance(req.args, SegmentBlob):
        args, kwargs = req.args.get()
        return args, kwargs
    return req.args, req.kwargs


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


class _ReplyRing:
    __slots__ = ("cids", "name", "queue")

    def __init__(self, namespace: str, cancellable: bool = False) -> None:
        self.name = reply_ring_name(os.getpid(), uuid.uuid4().hex[:12], cancellable)
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
        # correlation id -> (future, instance, monotonic end, oversize-args blob, finish)
        self._pending: dict[int, tuple] = {}
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
        try:
            return put_request_parking(q, req, timeout, self.namespace, cid, reply_to)
        except SerializationError as e:
            cause = e.__cause__ or e
            raise SerializationError(
                f"the arguments of the call to {inst.service}.{req.function} cannot be pickled: "
                f"{type(cause).__name__}: {cause}"
            ) from None
        except QueueFull:
            raise CallTimeout(
                f"call to {inst.service}.{req.function}: replica {inst.instance_id}'s request queue "
                f"stayed full for {timeout:.3g} s (backpressure: the replica is overloaded)"
            ) from None
        except QueueClosed:
            self.pool.drop(inst.request_queue)
            raise ServiceUnavailable(
                f"replica {inst.instance_id} of service '{inst.service}' is stopping (its request "
                f"queue is closed); call to '{req.function}' not delivered"
            ) from None

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
                if rep[0] == cid:  # (cid, status, value), a plain tuple
                    return self._resolve(inst, Reply(*rep))
                self._stale(inst, rep)
        finally:
            if blob is not None:
                blob.discard()

    def _stale(self, inst: InstanceInfo | None, rep: tuple) -> None:
        # The reply to a call that already timed out: drop it (and its segment).
        self.stale_replies += 1
        _cid, status, value = rep
        if status == ST_OK_BLOB:
            value.discard()

    # -- asynchronous calls: one shared ring, one reader thread
    def _async_ring(self) -> _ReplyRing:
        if self._async is None:
            with self._lock:
                if self._async is None:
                    if self._closed:
                        raise ServiceUnavailable("the client is closed")
                    r = _ReplyRing(self.namespace, cancellable=True)  # call_async's: cancel() may claim calls back
                    self._rings.append(r)
                    self._reader = threading.Thread(target=self._read_loop, args=(r,), name="sage-replies", daemon=True)
                    self._async = r
                    self._reader.start()
        return self._async

    def call_async(self, inst: InstanceInfo, req: Request, timeout: float, finish: Finish) -> concurrent.futures.Future:
        ring = self._async_ring()
        cid = next(ring.cids)
        # A deployed replica can be asked to cancel it (see _cancel); an in-process one cannot.
        canceller = functools.partial(self._cancel, inst, ring.name, cid, timeout) if inst.actor_name else None
        fut: concurrent.futures.Future = CallFuture(running=True, canceller=canceller)
        self._pending[cid] = (fut, inst, time.monotonic() + timeout, None, finish)
        try:
            blob = self._put(inst, req, timeout, cid, ring.name)
        except BaseException:
            self._pending.pop(cid, None)
            raise
        if blob is not None:
            entry = self._pending.get(cid)
            if entry is not None:
                fut_, inst_, end, _, finish_ = entry
                self._pending[cid] = (fut_, inst_, end, blob, finish_)
            else:
                blob.discard()
        return fut

    def _cancel(self, inst: InstanceInfo, reply_to: str, cid: int, ttl: float) -> bool:
        """Asks the replica (through its actor) to cancel call ``cid``: True when
        it won the race, and the call will never run; then no reply comes."""
        if not cancel_on_replica(inst.actor_name or "", ROUTER_NAMESPACE, [(reply_to, cid)], ttl)[0]:
            return False
        entry = self._pending.pop(cid, None)
        if entry is not None:
            _fut, _inst, _end, blob, finish = entry
            if blob is not None:
                blob.discard()  # its arguments' segment: never read now
            try:
                finish(None, concurrent.futures.CancelledError())  # its accounting: in flight, metrics
            except BaseException:
                pass
        return True

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
                cid, status, _ = rep
                entry = pending.pop(cid, None)
                if entry is None:
                    self._stale(None, rep)
                else:
                    fut, _inst, _end, blob, finish = entry
                    if blob is None and status == ST_OK:
                        settle(fut, finish, rep, None)  # the common case, inline
                    else:
                        pending[cid] = entry
                        self._finish(cid, Reply(*rep))
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
            put_request_parking(q, req, 0, self.namespace, req.cid, req.reply_to)
            return True
        except (QueueFull, QueueClosed):
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


# While waiting for a reply, check this often that the replica still lives, so
# a dead replica costs a caller at most this long, not its whole timeout.
LIVENESS_SLICE = 0.25


def instance_alive(inst: InstanceInfo) -> bool:
    """Whether the replica's process still runs (same host only)."""
    return shm.process_alive(inst.pid, inst.pid_start)


def open_request_ring(
    service: str, instance_id: str, namespace: str, queue_bytes: int, serves_over_ray: bool
) -> SageQueue | None:
    """A replica's request ring; None when /dev/shm has no room for it and
    the replica can serve over Ray instead (a deployed one can)."""
    try:
        return SageQueue(
            request_ring_name(service, instance_id),
            queue_bytes,
            auto_cleanup=True,
            namespace=namespace,
            spin_us=REQUEST_SPIN_US,
        )
    except SharedMemoryFull as e:
        if not serves_over_ray:  # an in-process service has no other way in
            raise SharedMemoryFull(
                f"service '{service}' cannot serve from this process: {e}. Deploy it as Ray "
                "actors (Cls.deploy()), which serve over Ray when shared memory is short, or give "
                "/dev/shm more room (docker run --shm-size=1g)"
            ) from None
        shm_warn_once(f"service '{service}' replica {instance_id}: {e}; it serves over Ray")
        return None
