"""Which calls a replica has started, finished, or was told to cancel.

Whether a queued call still runs is decided by a claim in shared memory
(claims.py) when the call carries a ticket; this registry then only tells
running calls that they were cancelled (:meth:`CallRegistry.tell`), and
cancels the running calls of callers that died (:meth:`CallRegistry.orphans`).

A call without a ticket (every claim slot of its caller was in use, or it
came over Ray) is decided here instead. A call that came through a ring is
known by its caller's reply ring and its correlation id; one over Ray by
its caller's name and cancellation id. A canceller (the caller's
``future.cancel()``, through the replica's actor) and the dispatcher that
takes the request race under one lock, and exactly one wins:

- the request was not taken yet: it is marked, ``cancel`` returns True, and
  the dispatcher skips it when it comes (no reply: the caller's future is
  already cancelled);
- it is running: ``cancel`` returns False, and the cancellation is delivered
  (a running ``async def`` handler gets ``asyncio.CancelledError``; a sync one
  sees ``self.cancelled()`` turn True);
- it finished: ``cancel`` returns False.

>>> calls = CallRegistry()
>>> calls.cancel(("rep.1.x", 7), ttl=10.0)
True
>>> calls.start(("rep.1.x", 7)) is None      # skipped when it arrives
True
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

__all__ = ["DONE_KEPT", "MAX_CHILDREN", "CallRegistry", "LoopTask", "Running"]

# How many finished calls are remembered: a cancel that arrives after the call
# finished (its reply on the way) must hear False, not be taken for one that
# has not arrived yet.
DONE_KEPT = 1 << 16


class Running:
    """A call being handled: whether it was cancelled, the future of its
    ``async def`` handler, and the calls and streams its handler started
    (context.adopt); all of them are cancelled with it."""

    __slots__ = ("cancelled", "children", "future", "kept", "key")

    def __init__(self, key: Any = None, kept: bool = True) -> None:
        self.key = key  # its CallRegistry key
        self.kept = kept  # remembered once done (a canceller may ask by key)
        self.cancelled = False
        self.future: Any = None
        self.children: list = []

    def adopt(self, child: Any) -> None:
        if len(self.children) > MAX_CHILDREN:  # a long handler's finished calls are let go
            self.children = [c for c in self.children if not _over(c)]
        self.children.append(child)
        if self.cancelled:  # made after the cancellation arrived
            _cancel_child(child)

    def cancel(self) -> None:
        self.cancelled = True
        if self.future is not None:
            self.future.cancel()
        for child in list(self.children):
            _cancel_child(child)


class LoopTask:
    """An ``async def`` handler's task on the replica's event loop, for
    ``Running.future``: :meth:`cancel` cancels the task on its loop, so the
    future of :meth:`run` finishes, cancelled, only once the handler's own
    cleanup (``except CancelledError``, ``finally``) has run. The future that
    ``run_coroutine_threadsafe`` returns says "cancelled" at once instead,
    and the caller could hear it while the handler still runs.

    >>> loop = asyncio.new_event_loop()
    >>> t = LoopTask(loop)
    >>> t.cancel(); loop.run_until_complete(asyncio.sleep(0)); t.asked
    True
    >>> loop.close()
    """

    __slots__ = ("asked", "loop", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.task: asyncio.Task | None = None
        self.asked = False  # cancel() came before the task started

    async def run(self, coro: Any) -> Any:
        """Awaits ``coro`` as this task (run_coroutine_threadsafe this)."""
        self.task = asyncio.current_task()
        if self.asked:  # both run on the loop: cancel() came first
            coro.close()
            raise asyncio.CancelledError
        return await coro

    def cancel(self) -> None:
        self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        self.asked = True
        if self.task is not None:
            self.task.cancel()


# A handler keeps at most about this many of its own calls to cancel with it.
MAX_CHILDREN = 1024


def _over(child: Any) -> bool:
    done = getattr(child, "done", None)
    return bool(done()) if callable(done) else bool(getattr(child, "_finished", False))


def _cancel_child(child: Any) -> None:
    try:
        if hasattr(child, "cancel"):
            child.cancel()  # a call's future: asks its replica, as the caller's cancel() does
        else:
            child.abort()  # a stream (sync or async): its generator's finally runs soon after
    except Exception:  # a child whose replica is gone: nothing left to stop
        pass


class CallRegistry:
    """The calls of one replica (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Any, Running] = {}
        self._cancelled: dict[Any, float] = {}  # key -> until when to remember it (monotonic)
        self._told: dict[Any, float] = {}  # not started yet, to start cancelled (tell()); same

        self._done: set = set()
        self._done_order: collections.deque = collections.deque()
        self.skipped = 0  # requests not run because they were cancelled first

    def start(self, key: Any) -> Running | None:
        """A dispatcher is about to run ``key``: its Running, or None when it
        was cancelled first (then it must not run)."""
        with self._lock:
            if self._cancelled and self._cancelled.pop(key, None) is not None:
                self.skipped += 1
                return None
            r = self._running[key] = Running(key)
            if self._told and self._told.pop(key, None) is not None:
                r.cancelled = True  # told while its claim was won and before it started
            return r

    def admit(self, key: Any, caller_alive: bool, by_key: bool = True) -> Running | None:
        """:meth:`start`, but None (counted as skipped) also when the call's
        caller died while it waited: nobody wants it any more. ``by_key``
        False: a call nobody can cancel by its key (a plain ``call()``, whose
        caller blocks on it), tracked only so its caller's death reaches it:
        no lock, nothing remembered once done (0.5 us a call here instead of
        0.9 us)."""
        if not by_key:
            if not caller_alive:
                self.count_skipped()
                return None
            light = self._running[key] = Running(key, kept=False)  # one dict store: atomic under the GIL
            return light
        r = self.start(key)
        if r is not None and not caller_alive:
            self.finish(key)
            self.count_skipped()
            return None
        return r

    def count_skipped(self, n: int = 1) -> None:
        """Counts requests not run because their claim was lost (claims.py)
        or their caller died before they started."""
        with self._lock:
            self.skipped += n

    def finish(self, key: Any) -> None:
        r = self._running.get(key)
        if r is not None and not r.kept:
            del self._running[key]
            return
        with self._lock:
            self._running.pop(key, None)
            self._done.add(key)
            self._done_order.append(key)
            if len(self._done_order) > DONE_KEPT:
                self._done.discard(self._done_order.popleft())

    def cancel(self, key: Any, ttl: float) -> bool:
        """True when ``key`` will never run; False when it runs or ran (a
        running one is told). ``ttl``: how long to wait for a request that
        has not arrived (its deadline)."""
        with self._lock:
            r = self._running.get(key)
            if r is None:
                if key in self._done:
                    return False
                self._cancelled[key] = time.monotonic() + max(0.0, ttl) + 1.0
                return True
        r.cancel()
        return False

    def tell(self, key: Any, ttl: float) -> None:
        """Tells a call whose claim the replica won that it was cancelled: a
        running one at once, one about to start when it starts (it then
        starts with its flag set). A finished one is left alone."""
        with self._lock:
            r = self._running.get(key)
            if r is None:
                if key not in self._done:
                    self._told[key] = time.monotonic() + max(0.0, ttl) + 1.0
                return
        r.cancel()

    def orphans(self, alive: Any) -> int:
        """Cancels the running calls of callers that died: ``alive(name)``
        says whether the caller named by a key's first part lives. Returns
        how many were cancelled (the heartbeat calls it)."""
        running = [(k, r) for k, r in list(self._running.items()) if not r.cancelled]  # list(): atomic
        verdict: dict = {}
        n = 0
        for key, r in running:
            name = key[0]
            if name not in verdict:
                verdict[name] = alive(name)
            if not verdict[name]:
                r.cancel()
                n += 1
        return n

    def prune(self) -> None:
        """Forgets cancellations of requests that never came (the heartbeat calls it)."""
        now = time.monotonic()
        with self._lock:
            for marks in (self._cancelled, self._told):
                for key in [k for k, until in marks.items() if until < now]:
                    del marks[key]
