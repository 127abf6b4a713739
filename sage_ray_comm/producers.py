"""A replica's open streams: the generators its streaming functions made,
fetched by their consumer in batches.

A call to a generator function (sync or ``async def`` with ``yield``) runs
nothing: it makes the generator, keeps it here under a fresh stream id and
answers with a ``StreamOpened``. Its consumer then fetches items (the
reserved functions ``_wire.STREAM_NEXT`` / ``STREAM_ANEXT``): each fetch runs
the generator for at most the items asked for (the consumer's free credit),
so the producer is never more than one window ahead of the consumer, and
returns early once items have waited ``LINGER_SECONDS`` (a slow producer's
items are not held back for a full batch) or hold ``FETCH_MAX_BYTES``. A fetch is an ordinary call, so a
stream works on both paths (shared memory on one node, Ray across nodes).

The first handle that fetches owns the stream (one consumer at a time; a
handle passed to another process gives that process the stream if it reads
first). A stream is closed (``GeneratorExit`` reaches the generator's
``finally``) when its consumer closes it, when its consumer's process dies
on this host, when nobody fetched it for ``IDLE_SECONDS``, and when the
replica stops.

>>> from sage_ray_comm.producers import Producers
>>> p = Producers("svc", "svc-1", "host")
>>> opened = p.open((i * i for i in range(3)), False)
>>> p.next(opened.stream_id, 10, "me").items
[0, 1, 4]
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from . import shm
from ._wire import (
    END_CLOSED,
    END_CONSUMED,
    END_DONE,
    END_ERROR,
    END_MORE,
    ERR_REMOTE,
    STREAM_ACLOSE,
    STREAM_ANEXT,
    STREAM_CLOSE,
    STREAM_NEXT,
    StreamBatch,
    StreamOpened,
    encode_error,
)

__all__ = ["FETCH_MAX_BYTES", "IDLE_SECONDS", "LINGER_SECONDS", "MAX_FETCH", "Producers", "consumer_token"]

# A fetch returns once its first items have waited this long, full or not.
LINGER_SECONDS = 0.002
# A stream nobody fetched for this long is closed (its consumer is gone).
IDLE_SECONDS = 300.0
# The most items one fetch may ask for, and the bytes of items (``bytes``, or
# anything with ``nbytes``) after which it returns: a window of large items
# comes in several replies, not one the size of the whole window.
MAX_FETCH = 4096
FETCH_MAX_BYTES = 4 << 20


def _nbytes(item: Any) -> int:
    if isinstance(item, (bytes, bytearray)):
        return len(item)
    n = getattr(item, "nbytes", 0)
    return n if isinstance(n, int) else 0


def consumer_token(host_id: str, pid: int) -> str:
    """Names one consuming handle: its host and process (so the replica can
    tell a dead consumer on its own host) and a random part."""
    return f"{host_id}:{pid}:{uuid.uuid4().hex[:8]}"


class _Batch:
    """The items of one fetch, and whether it is full: ``n`` items, or
    FETCH_MAX_BYTES of them, or LINGER_SECONDS since the first."""

    __slots__ = ("first", "items", "n", "size")

    def __init__(self, n: int) -> None:
        self.items: list = []
        self.n = max(1, min(int(n), MAX_FETCH))
        self.first = 0.0
        self.size = 0

    def add(self, item: Any) -> bool:
        """Adds an item; True once the batch is full."""
        self.items.append(item)
        self.size += _nbytes(item)
        if len(self.items) == 1:
            self.first = time.monotonic()
            return self.n == 1 or self.size >= FETCH_MAX_BYTES
        return (
            len(self.items) >= self.n or self.size >= FETCH_MAX_BYTES or time.monotonic() - self.first > LINGER_SECONDS
        )


class _Open:
    __slots__ = ("consumer", "gen", "is_async", "last", "lock", "produced")

    def __init__(self, gen: Any, is_async: bool) -> None:
        self.gen = gen
        self.is_async = is_async
        self.consumer: str | None = None  # the token of the handle that fetched first
        self.lock = threading.Lock()  # one fetch at a time
        self.last = time.monotonic()
        self.produced = 0


class Producers:
    """The open streams of one replica (``service``/``instance_id`` on ``host_id``)."""

    def __init__(self, service: str, instance_id: str, host_id: str) -> None:
        self.service = service
        self.instance_id = instance_id
        self.host_id = host_id
        self._open: dict[str, _Open] = {}
        self.items = 0  # items sent, over all streams

    def __len__(self) -> int:
        return len(self._open)

    def handlers(self) -> dict[str, Any]:
        """The reserved functions consumers call, by name."""
        return {STREAM_NEXT: self.next, STREAM_ANEXT: self.anext, STREAM_CLOSE: self.close, STREAM_ACLOSE: self.aclose}

    def open(self, gen: Any, is_async: bool) -> StreamOpened:
        sid = uuid.uuid4().hex
        self._open[sid] = _Open(gen, is_async)
        return StreamOpened(sid, self.instance_id, is_async)

    def _claim(self, sid: str, consumer: str) -> _Open | StreamBatch:
        s = self._open.get(sid)
        if s is None:
            return StreamBatch(
                [], END_CLOSED, f"service '{self.service}' replica {self.instance_id} has no stream {sid}"
            )
        if s.consumer is None:
            s.consumer = consumer
        elif s.consumer != consumer:
            return StreamBatch([], END_CONSUMED, f"stream {sid} of '{self.service}' is consumed by another handle")
        s.last = time.monotonic()
        return s

    def _end(self, sid: str, items: list, e: BaseException | None) -> StreamBatch:
        self._open.pop(sid, None)
        self.items += len(items)
        if e is None:
            return StreamBatch(items, END_DONE)
        return StreamBatch(items, END_ERROR, encode_error(ERR_REMOTE, e))

    def _more(self, s: _Open, items: list) -> StreamBatch:
        s.produced += len(items)
        s.last = time.monotonic()
        self.items += len(items)
        return StreamBatch(items, END_MORE)

    def next(self, sid: str, n: int, consumer: str) -> StreamBatch:
        """Up to ``n`` items of a sync generator (see the module docstring)."""
        s = self._claim(sid, consumer)
        if isinstance(s, StreamBatch):
            return s
        batch = _Batch(n)
        with s.lock:
            try:
                while not batch.add(next(s.gen)):
                    pass
            except StopIteration:
                return self._end(sid, batch.items, None)
            except Exception as e:
                return self._end(sid, batch.items, e)
            return self._more(s, batch.items)

    async def anext(self, sid: str, n: int, consumer: str) -> StreamBatch:
        """:meth:`next` for an async generator (runs on the replica's loop)."""
        s = self._claim(sid, consumer)
        if isinstance(s, StreamBatch):
            return s
        batch = _Batch(n)
        try:
            while not batch.add(await s.gen.__anext__()):
                pass
        except StopAsyncIteration:
            return self._end(sid, batch.items, None)
        except Exception as e:
            return self._end(sid, batch.items, e)
        return self._more(s, batch.items)

    def _detach(self, sid: str, consumer: str | None) -> _Open | None:
        """Takes stream ``sid`` out to close it, unless unknown or another consumer's."""
        s = self._open.get(sid)
        if s is None or (consumer is not None and s.consumer not in (None, consumer)):
            return None
        del self._open[sid]
        return s

    def close(self, sid: str, consumer: str | None = None) -> bool:
        """Closes a sync generator (its ``finally`` runs now); False if unknown."""
        s = self._detach(sid, consumer)
        if s is None:
            return False
        with s.lock:  # after a fetch in progress
            s.gen.close()
        return True

    async def aclose(self, sid: str, consumer: str | None = None) -> bool:
        """Closes an async generator (on the replica's loop)."""
        s = self._detach(sid, consumer)
        if s is None:
            return False
        await s.gen.aclose()
        return True

    def reap(self, loop: asyncio.AbstractEventLoop | None, remote_alive: Any = None) -> int:
        """Closes streams whose consumer died, or that nobody fetched for
        IDLE_SECONDS (the heartbeat calls this); how many. A consumer on this
        host is checked by its pid; one on another host by
        ``remote_alive(host, pid)`` (callers.py), when given."""
        now = time.monotonic()
        gone = []
        for sid, s in list(self._open.items()):
            owner = (s.consumer or "").split(":")
            dead = False
            if len(owner) == 3 and owner[1].isdigit():
                host, pid = owner[0], int(owner[1])
                if host == self.host_id:
                    dead = not shm.process_alive(pid, 0)
                elif remote_alive is not None:
                    dead = not remote_alive(host, pid)
            if dead or now - s.last > IDLE_SECONDS:
                gone.append((sid, s))
        for sid, s in gone:
            self.close_one(sid, s, loop)
        return len(gone)

    def close_all(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Closes every stream (the replica stops)."""
        for sid, s in list(self._open.items()):
            self.close_one(sid, s, loop)

    def close_one(self, sid: str, s: _Open, loop: asyncio.AbstractEventLoop | None) -> None:
        self._open.pop(sid, None)
        try:
            if not s.is_async:
                with s.lock:
                    s.gen.close()
            elif loop is not None and loop.is_running():
                asyncio.run_coroutine_threadsafe(s.gen.aclose(), loop).result(timeout=5)
        except Exception:  # a generator whose cleanup raises: it is closed all the same
            pass
