"""The replica's reply path: results and errors into callers' reply rings.

A caller that died is noticed before its reply is written (its pid is in its
reply ring's name): the reply is dropped and counted, and the dead caller's
ring removed. A result too large for a ring travels in a segment, swept once
read or once its reader died. A call that came over Ray is answered through
the ``sink`` its handler was given instead (``Runtime.handle_direct``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from . import shm
from ._codec import abandon, big_buffers, encode_payload
from ._wire import (
    ERR_SERIALIZATION,
    ERR_TIMEOUT,
    OP_CALL,
    ST_OK,
    ST_OK_BLOB,
    BadRequest,
    Request,
    StreamBatch,
    bad_request_reply,
    error_reply,
)
from .arena import ArenaOwner, fill
from .bigbytes import holds_big_bytes, wrap_big_bytes
from .blobs import SegmentBlob
from .errors import CallTimeout, MessageTooLarge, QueueClosed, QueueFull, QueueNotFound, SerializationError
from .loans import drop_kept
from .names import caller_pid, reply_ring_pid
from .shm_transport import RingPool

__all__ = ["REPLY_PUT_TIMEOUT", "ReplyWriter", "Sink", "future_sink"]

log = logging.getLogger(__name__)

# Where the reply of a call that came over Ray goes (see Runtime.handle_direct).
Sink = Callable[[tuple], object]


def future_sink(fut: concurrent.futures.Future) -> Sink:
    """The sink of a call over Ray waiting on ``fut``: the reply completes it,
    unless the replica's stop failed it first."""

    def sink(rep: tuple) -> None:
        if not fut.done():
            fut.set_result(rep)

    return sink


# A reply ring that stays full this long means the caller stopped reading.
REPLY_PUT_TIMEOUT = 2.0


class ReplyWriter(ArenaOwner):
    """Writes one replica's replies. ``stats`` is the replica's counters
    (``errors``, ``replies_dropped``). Each method takes a ``sink``: where
    the reply of a call that came over Ray goes instead of a ring."""

    def __init__(self, namespace: str, stats: dict, service: str = "") -> None:
        self.namespace = namespace
        self.stats = stats
        self.service = service
        self.replies = RingPool(namespace)
        self._callers: dict[str, tuple] = {}  # reply ring -> (checked at, caller alive)
        # Oversize replies not yet known to be read: (blob, reply ring), swept by the heartbeat.
        self.blobs: list[tuple] = []

    def sweep_blobs(self) -> None:
        """Removes oversize replies whose caller read them, or died without reading."""
        if not self.blobs:
            return
        keep = []
        for blob, reply_to in self.blobs:
            if not os.path.exists(shm.SHM_DIR + shm.segment_name(self.namespace, blob.name)):
                continue  # read (the reader unlinks it)
            if not self.caller_alive(reply_to):
                blob.discard()
                self.stats["replies_dropped"] += 1
                continue
            keep.append((blob, reply_to))
        self.blobs = keep

    def error(self, req: Request, code: str, message: str, extra: Any = None, sink: Sink | None = None) -> None:
        self.put(req, error_reply(req.cid, code, message, extra), sink=sink)

    def result(self, req: Request, result: Any, sink: Sink | None = None) -> None:
        if sink is not None:  # over Ray: Ray carries any size, and pickles it
            sink((req.cid, ST_OK, result))
            return
        if type(result) is StreamBatch:
            # A stream's items, fetched as one reply: each large one goes through the arena, as a call's result would.
            located = big_buffers(result.items) or holds_big_bytes(result.items)
            if located:
                result = result._replace(items=wrap_big_bytes(result.items))
        else:
            # Deeper bytes too: pickle would take them in-band, never telling the one-call put.
            located = big_buffers(result) or holds_big_bytes(result)
        try:
            self.put(req, (req.cid, ST_OK, result), raise_too_large=True, located=located)
        except MessageTooLarge:
            blob = SegmentBlob.put(result, self.namespace)
            self.blobs.append((blob, req.reply_to))
            self.put(req, (req.cid, ST_OK_BLOB, blob))
        except SerializationError as e:
            self.stats["errors"] += 1
            self.error(req, ERR_SERIALIZATION, f"the result of {req.service}.{req.function} cannot be sent back: {e}")
        except CallTimeout as e:
            # This replica's arena stayed full (its callers hold every slot): the
            # caller hears why now, instead of waiting out its own timeout.
            self.stats["errors"] += 1
            self.error(
                req,
                ERR_TIMEOUT,
                f"the result of {req.service}.{req.function} could not be sent back: {e} (let go of arrays "
                "received from this service, or give it more room: arena_bytes=)",
            )

    def bad_request(self, e: BadRequest, by: str) -> None:
        """Answers a request that cannot be run (see _wire.BadRequest), read by ``by``."""
        if e.reply_to is None:
            log.warning("service %s dropped an event or send it could not decode: %s", self.service, e)
            return
        req = Request(OP_CALL, e.cid, e.function, (), None, e.reply_to, None, None, None, self.service)
        self.put(req, tuple(bad_request_reply(e, self.service, by)))

    def caller_lives(self, name: str) -> bool:
        """A fresh :meth:`caller_alive` (the heartbeat's): only a dead verdict
        is remembered, so the reply path never acts on an older "alive"."""
        return self.caller_alive(name, fresh=True)

    def caller_alive(self, reply_to: str, fresh: bool = False) -> bool:
        """Whether the process that owns a reply ring (or made a call over Ray
        from this host, names.direct_caller_name) lives (checked at most every
        100 ms per name, or now if ``fresh``; a caller on another host counts
        as alive)."""
        now = time.monotonic()
        hit = self._callers.get(reply_to)
        if hit is not None and (
            not hit[1] or (not fresh and now - hit[0] < 0.1)
        ):  # dead stays dead: names are never reused
            return hit[1]
        pid = caller_pid(reply_to, shm.host_id())
        if pid is None:
            return True
        alive = shm.process_alive(pid, 0)
        if len(self._callers) > 4096:
            self._callers = {k: v for k, v in self._callers.items() if not v[1]} if len(self._callers) < 65536 else {}
        self._callers[reply_to] = (now, alive)
        return alive

    def known_dead(self, name: str) -> bool:
        """Whether :meth:`caller_alive` already found this caller dead (no
        system call: a check costs about 7 us, too much for every request)."""
        hit = self._callers.get(name)
        return hit is not None and not hit[1]

    def put(
        self, req: Request, rep: tuple, raise_too_large: bool = False, sink: Sink | None = None, located: bool = False
    ) -> None:
        if sink is not None:
            sink(rep)
            return
        if req.reply_to is None:
            return
        if not self.caller_alive(req.reply_to):
            # The caller died mid-call: drop the reply, count it, and remove its
            # ring (its creator is dead, so nobody else will).
            self.stats["replies_dropped"] += 1
            self.replies.drop(req.reply_to)
            shm.unlink(shm.segment_name(self.namespace, req.reply_to))
            _cid, status, value = rep
            if status == ST_OK_BLOB:
                value.discard()
            return
        try:
            q = self.replies.get(req.reply_to)
            # Large buffers go into this replica's arena, read in place by the
            # caller: those big_buffers sees at the top of the result at once,
            # and any deeper in it (a dict, a list, a model) once the one-call
            # put finds the result has buffers.
            if located or not q.put_plain(rep, REPLY_PUT_TIMEOUT):
                self._put_located(q, req.reply_to, rep)
        except (MessageTooLarge, SerializationError):
            if raise_too_large:  # the caller (result()) parks it or reports it
                raise
            self.stats["replies_dropped"] += 1
        except (QueueNotFound, QueueClosed, QueueFull):
            # The caller is gone or stopped reading: drop and count, and forget its ring.
            self.stats["replies_dropped"] += 1
            self.replies.drop(req.reply_to)

    def _put_located(self, q: Any, reply_to: str, rep: tuple) -> None:
        cid, status, value = rep
        placed: list = []
        fills: list = []  # copied in after the frame is sent, while the caller reads them (arena.fill)
        parts, kind = encode_payload(
            (cid, status, wrap_big_bytes(value)),
            q.label,
            self.own_arena(),
            reply_ring_pid(reply_to) or 0,
            REPLY_PUT_TIMEOUT,
            placed,
            fills,
        )
        drop_kept()  # the request's slots: the reply holds what it sends on
        try:
            q.put_frame(parts, kind, REPLY_PUT_TIMEOUT)
        except BaseException:
            abandon(placed)
            raise
        if fills:
            fill(fills)

    def close(self) -> None:
        """Removes unread oversize replies and closes the reply rings."""
        for blob, _ in self.blobs:
            blob.discard()
        self.blobs.clear()
        self.replies.close()
        self.close_arena()
