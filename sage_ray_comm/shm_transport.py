"""Same-node calls through shared-memory rings (:class:`ShmTransport`).

The request frame (see ``_wire``) goes into the replica's request ring, the
reply into the caller's reply ring, matched by correlation id. Synchronous
calls use a reply ring per calling thread, read by that thread itself: no
hand-off between threads on the hot path. Asynchronous calls share one ring
per process, read by one thread that completes the futures.

Payloads larger than a ring's frame limit travel in a one-off segment (the
frame carries a ``blobs.SegmentBlob``); large buffers go into the arena
(arena.py) and are read in place. The helpers that write and read
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
from ._codec import (
    abandon,
    decode_oob,
    encode_payload,
    holds_no_buffers,
)
from ._future import CallFuture
from ._ray import cancel_on_replica, tell_replica
from ._wire import (
    ST_OK,
    ST_OK_BLOB,
    Reply,
    Request,
    encode_request,
    request_tuple,
)
from .arena import Arena, ArenaOwner, fill
from .bigbytes import wrap_big_bytes
from .blobs import SegmentBlob
from .claims import EXPIRED, ClaimTable
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
from .loans import track_sent, untrack_sent
from .malloc import tune_malloc
from .names import claim_table_name, reply_ring_name
from .queue import SageQueue
from .router import ROUTER_NAMESPACE, InstanceInfo, Subscription
from .spinning import SpinTuner
from .transport import REPLY_RING_BYTES, REPLY_SPIN_MAX_US, REPLY_SPIN_US, Finish, Transport, settle, shm_warn_once

__all__ = [
    "RingPool",
    "ShmTransport",
    "instance_alive",
    "put_request",
]

log = logging.getLogger(__name__)


def put_request(
    q: SageQueue, req: Request | tuple, timeout: float | None, ticket: int = 0, arena: Arena | None = None, pid: int = 0
) -> None:
    """Writes one request frame (see _wire) into a replica's or subscriber's
    ring; ``ticket``: its claim ticket (claims.py), the header's cancellation
    id. With an ``arena``, large buffers go into it (read in place by the
    replica, process ``pid``); they are let go of if the frame cannot be written.
    They are copied in after the frame is written, while the replica already
    reads them (arena.fill): it no longer waits for the whole copy first."""
    placed: list = []
    fills: list = []
    parts, kind = encode_request(req, q.label, False, ticket, arena, pid, timeout, placed, fills)
    try:
        q.put_frame(parts, kind, 0.0 if timeout == 0 else timeout)
    except BaseException:
        abandon(placed)
        raise
    if fills:
        fill(fills)


def put_request_parking(
    q: SageQueue,
    req: Request,
    timeout: float | None,
    namespace: str,
    cid: int,
    reply_to: str | None,
    ticket: int = 0,
    arena: Arena | None = None,
    pid: int = 0,
) -> SegmentBlob | None:
    """Writes ``req`` (with this attempt's ``cid``, ``reply_to`` and claim
    ``ticket``) into a ring; large buffers go into ``arena`` if given (see
    put_request), and arguments still too large for the ring into a segment
    the frame then carries. Returns that segment (None if not needed); if the
    frame still cannot be written, the segment is removed and the error raised."""
    try:
        if arena is not None:
            args, kwargs = wrap_big_bytes(req.args), wrap_big_bytes(req.kwargs)
            put_request(q, request_tuple(req, cid, reply_to, args, kwargs), timeout, ticket, arena, pid)
        else:
            put_request(q, request_tuple(req, cid, reply_to), timeout, ticket)
        return None
    except MessageTooLarge:
        blob = SegmentBlob.put((req.args, req.kwargs), namespace)
    try:
        put_request(q, request_tuple(req, cid, reply_to, blob, None), timeout, ticket)
    except BaseException:
        blob.discard()
        raise
    return blob


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
    __slots__ = ("cids", "claims", "name", "queue", "spin")

    def __init__(self, namespace: str, cancellable: bool = False) -> None:
        self.name = reply_ring_name(os.getpid(), uuid.uuid4().hex[:12], cancellable)
        self.queue = SageQueue(
            self.name, REPLY_RING_BYTES, auto_cleanup=True, namespace=namespace, spin_us=REPLY_SPIN_US
        )
        self.cids = itertools.count(1)
        # How long call() spins for a reply: as long as replies have lately taken.
        self.spin = SpinTuner(self.queue, REPLY_SPIN_US, REPLY_SPIN_MAX_US)
        # The claims of its calls (claims.py): cancel() wins or loses a call in
        # shared memory. None without room for it: cancel() asks the replica.
        self.claims: ClaimTable | None = None
        if cancellable:
            try:
                self.claims = ClaimTable(claim_table_name(self.name), namespace)
            except SharedMemoryFull as e:
                shm_warn_once(f"no claim table for this process's call_async calls ({e}); cancel() asks replicas")


class ShmTransport(Transport, ArenaOwner):
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
        self._tickets: dict[int, int] = {}  # correlation id -> its claim ticket (claims.py)
        self._reader: threading.Thread | None = None
        self._closed = False
        self.stale_replies = 0

    # -- request side
    def _put(
        self,
        inst: InstanceInfo,
        req: Request,
        timeout: float | None,
        cid: int = 0,
        reply_to: str | None = None,
        ticket: int = 0,
    ) -> SegmentBlob | None:
        """Puts the request frame (with ``cid``, ``reply_to`` and claim
        ``ticket`` filled in); returns the blob it had to park, if any."""
        try:
            q = self.pool.get(inst.request_queue)
        except QueueNotFound:
            raise ServiceUnavailable(
                f"replica {inst.instance_id} of service '{inst.service}' is gone (its request queue "
                f"no longer exists) while calling '{req.function}'"
            ) from None
        try:
            return put_request_parking(
                q, req, timeout, self.namespace, cid, reply_to, ticket, self.own_arena(), inst.pid
            )
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

    def reply_spin_us(self) -> list[float]:
        """How long each calling thread's reply ring now spins for its reply
        before it sleeps, in microseconds (spinning.SpinTuner). Not the
        call_async ring's: its reader thread's waits are not calls'."""
        with self._lock:
            return [r.spin.spin_us for r in self._rings if r is not self._async]

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
        # The large bytes this call sends, recorded: a reply that returns one gets the object back, uncopied.
        token = track_sent()
        try:
            blob = self._put(inst, req, timeout, cid, ring.name)
        except BaseException:
            untrack_sent(token)
            raise
        try:
            get = ring.queue.get
            sent = time.perf_counter()
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
                    ring.spin.waited(time.perf_counter() - sent)
                    return self._resolve(inst, Reply(*rep))
                self._stale(inst, rep)
        finally:
            untrack_sent(token)
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
        ticket = ring.claims.arm() if ring.claims is not None else 0
        # With a ticket, cancel() races the replica for it in shared memory;
        # without one, a deployed replica is asked (see _cancel).
        can = ticket or inst.actor_name
        canceller = functools.partial(self._cancel, inst, ring, cid, ticket, timeout) if can else None
        fut: concurrent.futures.Future = CallFuture(running=True, canceller=canceller)
        self._pending[cid] = (fut, inst, time.monotonic() + timeout, None, finish)
        if ticket:
            self._tickets[cid] = ticket
        try:
            blob = self._put(inst, req, timeout, cid, ring.name, ticket)
        except BaseException:
            self._pending.pop(cid, None)
            self._release(cid)
            raise
        if blob is not None:
            entry = self._pending.get(cid)
            if entry is not None:
                fut_, inst_, end, _, finish_ = entry
                self._pending[cid] = (fut_, inst_, end, blob, finish_)
            else:
                blob.discard()
        return fut

    def _cancel(self, inst: InstanceInfo, ring: _ReplyRing, cid: int, ticket: int, ttl: float) -> bool:
        """Cancels call ``cid``: True when it will never run (then no reply
        comes). With a ticket, one compare-and-swap in shared memory against
        the replica that takes it (claims.py); a call it lost is running, and
        its replica is told without waiting (a running handler sees it).
        Without one, the replica is asked through its actor."""
        if ticket and ring.claims is not None:
            if not ring.claims.cancel(ticket):
                if inst.actor_name and cid in self._pending:
                    tell_replica(inst.actor_name, ROUTER_NAMESPACE, [(ring.name, cid)], ttl)
                return False
        elif not cancel_on_replica(inst.actor_name or "", ROUTER_NAMESPACE, [(ring.name, cid)], ttl)[0]:
            return False
        self._release(cid)
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

    def _release(self, cid: int, cancel: bool = False) -> None:
        """Frees call ``cid``'s claim slot; ``cancel``: first make sure a
        replica never starts it (it timed out, its replica died, or the
        client closed: nobody waits for it)."""
        ticket = self._tickets.pop(cid, 0)
        claims = self._async.claims if self._async is not None else None
        if ticket and claims is not None:
            if cancel:
                claims.cancel(ticket, EXPIRED)
            claims.release(ticket)

    def _finish(self, cid: int, rep: Reply | None = None, exc: BaseException | None = None) -> None:
        self._release(cid, cancel=exc is not None)
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
        get, pending, tickets = ring.queue.get, self._pending, self._tickets
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
                        if tickets:
                            self._release(cid)
                        settle(fut, finish, rep, None)  # the common case, inline
                    else:
                        pending[cid] = entry
                        self._finish(cid, Reply(*rep))
                rep = entry = None  # a reply's arena slots stay held by its future only
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

    def fanout(self, payload: Any) -> Any:
        """``payload`` with its large buffers written once into the arena and
        read back as views of their slots, so that delivering it to each
        subscriber on this node only adds a holder (no copy per subscriber);
        the slots are free once the last subscriber lets go. ``payload``
        itself when it has none, or the arena has no free slot now (a
        publisher never waits). Arrays below the top level count too: events
        are often message models that hold them."""
        if holds_no_buffers(payload):  # nothing to find: skip the trial pickling
            return payload
        placed: list = []
        try:
            parts, _kind = encode_payload(wrap_big_bytes(payload), "an event", self.own_arena(), 0, 0.0, placed)
        except (CallTimeout, SerializationError):
            return payload
        if not placed:  # no buffer the arena takes
            return payload
        return decode_oob(memoryview(b"".join(parts)))

    def deliver(self, sub: Subscription, req: Request) -> bool:
        try:
            q = self.pool.get(sub.queue)
        except QueueNotFound:
            return False
        try:
            # Large buffers by location (fanout()); one that needs a slot and
            # finds none drops the event for this subscriber: a publisher never waits.
            put_request_parking(q, req, 0, self.namespace, req.cid, req.reply_to, 0, self.own_arena(), sub.pid)
            return True
        except (QueueFull, QueueClosed, CallTimeout):
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
            if r.claims is not None:
                r.claims.close()
        self.pool.close()
        self.close_arena()  # views of its slots that replicas still hold stay valid


# While waiting for a reply, check this often that the replica still lives, so
# a dead replica costs a caller at most this long, not its whole timeout.
LIVENESS_SLICE = 0.25


def instance_alive(inst: InstanceInfo) -> bool:
    """Whether the replica's process still runs (same host only)."""
    return shm.process_alive(inst.pid, inst.pid_start)
