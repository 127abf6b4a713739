"""Streaming calls: the consumer's side of a generator function's stream.

``client.stream(service, fn, *args)`` calls the generator function (which
opens the stream on one replica, running nothing yet) and returns a
:class:`Stream`: an iterator and context manager that fetches items in
batches of at most ``window`` (the replica's side is ``producers.py``).

- **Backpressure by credit:** each fetch asks for the free room in the
  consumer's window, so the producer is never more than ``window`` items
  ahead of the consumer, however slow the consumer is.
- **The end is explicit:** the generator returning ends iteration; the
  handler raising gives ``RemoteError`` (as a call would) after the items
  before it; the replica dying gives ``ServiceUnavailable``; no item within
  ``idle_timeout`` gives ``CallTimeout``.
- **Closing** (``close()``, leaving the ``with`` block, or dropping the last
  reference) closes the generator in the replica: ``GeneratorExit`` reaches
  its ``finally``.
- **A handle is picklable:** pass it to another actor or service and read it
  there. A stream has one consumer at a time, the first handle that reads;
  another gets :class:`~sage_ray_comm.StreamConsumed`. A handle that was
  pickled no longer closes the stream when it is dropped: the copy owns it.

>>> with client.stream("llm", "tokens", "Hello", window=32) as tokens:   # doctest: +SKIP
...     for tok in tokens:
...         print(tok, end="")

``client.astream(...)`` is the ``async for`` twin (:class:`AsyncStream`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

from . import context, lifecycle, shm
from ._wire import (
    END_CLOSED,
    END_CONSUMED,
    END_DONE,
    END_ERROR,
    END_MORE,
    STREAM_ACLOSE,
    STREAM_ANEXT,
    STREAM_CLOSE,
    STREAM_NEXT,
    ErrorInfo,
    StreamBatch,
    StreamOpened,
)
from .completion import remote_error
from .errors import InvalidCallArgument, ServiceNotFound, ServiceUnavailable, StreamClosed, StreamConsumed
from .producers import consumer_token

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_WINDOW",
    "OPENING",
    "AsyncStream",
    "Stream",
    "StreamCalls",
    "set_client_factory",
]

# Items a consumer lets the producer run ahead by default (measured: see the
# README's streaming section), and how long it waits for the next item.
DEFAULT_WINDOW = 256
DEFAULT_IDLE_TIMEOUT = 30.0

# Set while stream()/astream() make their opening call: the client lets only
# that call a generator function (a plain call() of one is refused).
OPENING: contextvars.ContextVar[bool] = contextvars.ContextVar("sage_stream_opening", default=False)

# bus -> a FunctionClient on it, for handles unpickled in another process
# (client.py registers it: this module does not import the client).
_client_factory: Callable[[str], Any] | None = None


def set_client_factory(factory: Callable[[str], Any]) -> None:
    """How an unpickled handle gets a client for its bus (set by ``client.py``)."""
    global _client_factory
    _client_factory = factory


class _Handle:
    """What Stream and AsyncStream share: where the stream is, the credit
    window, the local buffer and how the stream ended."""

    def __init__(
        self, client: Any, service: str, function: str, opened: StreamOpened, window: int, idle_timeout: float
    ) -> None:
        if not isinstance(opened, StreamOpened):
            raise InvalidCallArgument(f"{service}.{function} is not a generator function; use call() for it")
        self._client = client
        self.bus = client.bus
        self.service, self.function = service, function
        self.stream_id, self.instance, self.is_async = opened
        self.window = window
        self.idle_timeout = float(idle_timeout)
        self._buf: collections.deque = collections.deque()
        self._end: BaseException | None = None  # raised once the buffer is drained
        self._finished = False  # the replica's side is over (ended, closed, failed)
        self._owner = True  # False once pickled: the copy owns the stream
        self._token = consumer_token(shm.host_id(), os.getpid())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.service}.{self.function} {self.stream_id[:8]} on {self.instance}>"

    # -- pickling: a handle travels; the copy reads as a new consumer
    def __getstate__(self) -> dict:
        self._owner = False
        keep = ("bus", "service", "function", "stream_id", "instance", "is_async", "window", "idle_timeout")
        return {k: getattr(self, k) for k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._client = None
        self._buf = collections.deque()
        self._end, self._finished, self._owner = None, False, True
        self._token = consumer_token(shm.host_id(), os.getpid())

    def _get_client(self) -> Any:
        if self._client is None:
            if _client_factory is None:
                raise StreamClosed(f"no client to read stream {self.stream_id} with (import sage_ray_comm)")
            self._client = _client_factory(self.bus)
        return self._client

    def _fetch_args(self) -> tuple:
        return (self.stream_id, self.window - len(self._buf), self._token)

    def _take(self, batch: Any) -> None:
        """Keeps a fetch's items and notes how the stream ended, if it did."""
        if not isinstance(batch, tuple) or len(batch) != 3:
            raise StreamClosed(f"stream {self.stream_id} of '{self.service}': unexpected reply {type(batch).__name__}")
        items, end, error = StreamBatch(*batch)
        self._buf.extend(items)
        if end == END_MORE:
            return
        self._finished = True
        if end == END_ERROR:
            self._end = remote_error(ErrorInfo(*error), self.service, self.function)
        elif end == END_CONSUMED:
            self._end = StreamConsumed(error)
        elif end == END_CLOSED:
            self._end = StreamClosed(error)
        elif end != END_DONE:
            self._end = StreamClosed(f"stream {self.stream_id}: unknown end {end}")

    def _failed(self, e: BaseException) -> BaseException:
        """A fetch that failed ends the stream; the replica's side is closed."""
        self._finished = True
        if isinstance(e, ServiceNotFound):  # its replica left the registry: it died or stopped
            e = ServiceUnavailable(f"replica {self.instance} serving stream {self.service}.{self.function} is gone")
        self._end = e
        return e

    def _close_args(self) -> tuple:
        return (self.stream_id, self._token)

    def _fns(self) -> tuple[str, str]:
        """The replica's fetch and close functions for this stream's generator kind."""
        return (STREAM_ANEXT, STREAM_ACLOSE) if self.is_async else (STREAM_NEXT, STREAM_CLOSE)

    def _pop(self, stop: type[BaseException]) -> Any:
        """The next buffered item; else how the stream ended (raised once), else ``stop``."""
        if self._buf:
            return self._buf.popleft()
        if self._end is not None:
            end, self._end = self._end, None
            raise end
        raise stop

    def _closing(self) -> bool:
        """Marks the stream over; True when the replica still has to be told."""
        self._buf.clear()
        if self._finished and self._end is None:
            return False
        self._finished = True
        return True

    def abort(self) -> None:
        """Tells the replica to close the stream, without waiting (a send): how
        a dropped handle, a failed fetch and a cancelled parent call end it.
        Not after ``ray.shutdown()`` or at exit: a Ray call then would start a
        new Ray (the replica reaps the stream instead)."""
        if self._client is None or lifecycle.exiting() or not lifecycle.ray_alive():
            return
        try:
            self._client.send(self.service, self._fns()[1], *self._close_args(), instance=self.instance, timeout=1.0)
        except Exception:  # the replica, Ray or the interpreter is going: the replica reaps it
            pass

    def __del__(self) -> None:
        # Dropped unread: close it in the replica without waiting. Not once
        # pickled: the copy owns the stream.
        if getattr(self, "_owner", False) and not self._finished:
            self._finished = True
            self.abort()


class Stream(_Handle):
    """An iterator over a stream's items (see the module docstring)."""

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        if not self._buf and not self._finished:
            try:
                batch = self._get_client().call(
                    self.service, self._fns()[0], *self._fetch_args(), timeout=self.idle_timeout, instance=self.instance
                )
            except Exception as e:
                self._failed(e)
                self.abort()  # the producer stops; a fetch it is still in is not waited for
                raise
            self._take(batch)
        return self._pop(StopIteration)

    def close(self) -> None:
        """Closes the stream in the replica (its generator's ``finally`` runs
        before this returns). Safe to call twice."""
        if not self._closing():
            return
        try:
            self._get_client().call(
                self.service, self._fns()[1], *self._close_args(), timeout=10, instance=self.instance
            )
        except Exception:  # the replica is gone: so is the stream
            pass

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncStream(_Handle):
    """The ``async for`` twin of :class:`Stream` (``client.astream``)."""

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Any:
        if not self._buf and not self._finished:
            try:
                batch = await self._get_client().acall(
                    self.service, self._fns()[0], *self._fetch_args(), timeout=self.idle_timeout, instance=self.instance
                )
            except Exception as e:
                self._failed(e)
                self.abort()
                raise
            self._take(batch)
        return self._pop(StopAsyncIteration)

    async def aclose(self) -> None:
        """Closes the stream in the replica. Safe to call twice."""
        if not self._closing():
            return
        try:
            await self._get_client().acall(
                self.service, self._fns()[1], *self._close_args(), timeout=10, instance=self.instance
            )
        except Exception:  # the replica is gone: so is the stream
            pass

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


@contextlib.contextmanager
def _opening() -> Iterator[None]:
    """The client's calls in this block may call generator functions (see OPENING)."""
    token = OPENING.set(True)
    try:
        yield
    finally:
        OPENING.reset(token)


def _window(window: Any) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InvalidCallArgument(f"window must be an integer of at least 1, got {window!r}")
    return window


def _idle(idle_timeout: float | None, timeout: float | None) -> float:
    return float(idle_timeout if idle_timeout is not None else timeout if timeout is not None else DEFAULT_IDLE_TIMEOUT)


class StreamCalls:
    """``stream()`` and ``astream()`` of :class:`~sage_ray_comm.FunctionClient` (it inherits them)."""

    call: Callable[..., Any]
    call_async: Callable[..., Any]

    def stream(
        self,
        service: str,
        function: str,
        *args: Any,
        timeout: float | None = None,
        window: int = DEFAULT_WINDOW,
        idle_timeout: float | None = None,
        instance: str | None = None,
        headers: dict | None = None,
        **kwargs: Any,
    ) -> Stream:
        """Calls a generator function and returns its :class:`~sage_ray_comm.streams.Stream`:
        an iterator and context manager over its items, at most ``window``
        of them made ahead of the consumer. ``timeout`` bounds the opening
        call; ``idle_timeout`` (default ``timeout``, or 30 s) the wait for
        each next batch. See ``sage_ray_comm.streams``.

        >>> with client.stream("scan", "rows", "table") as rows:    # doctest: +SKIP
        ...     total = sum(r["n"] for r in rows)
        """
        window = _window(window)  # before the stream is opened: a refused one would be left open
        with _opening():
            opened = self.call(service, function, *args, timeout=timeout, instance=instance, headers=headers, **kwargs)
        return context.adopt(Stream(self, service, function, opened, window, _idle(idle_timeout, timeout)))

    async def astream(
        self,
        service: str,
        function: str,
        *args: Any,
        timeout: float | None = None,
        window: int = DEFAULT_WINDOW,
        idle_timeout: float | None = None,
        instance: str | None = None,
        headers: dict | None = None,
        **kwargs: Any,
    ) -> AsyncStream:
        """The ``async for`` twin of :meth:`stream`: ``async with await client.astream(...) as s``."""
        window = _window(window)
        with _opening():
            fut = self.call_async(
                service, function, *args, timeout=timeout, instance=instance, headers=headers, **kwargs
            )
        opened = await asyncio.wrap_future(fut)
        return context.adopt(AsyncStream(self, service, function, opened, window, _idle(idle_timeout, timeout)))
