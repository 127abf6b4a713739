"""CallFuture: a ``concurrent.futures.Future`` that costs one object until someone waits.

A stock Future allocates a Condition (with an RLock and a deque) and two
lists up front: about a dozen objects the cyclic GC tracks. Ten thousand
pipelined calls then keep ~150k tracked objects alive, enough to trigger
full collections, and in a Ray driver (half a million objects) each full
collection takes ~80 ms: measured, that was 60% of ``call_async``'s cost.

Here the Condition and the lists are created only when a thread waits
(``result()`` on an unfinished future, ``concurrent.futures.wait``) or a
callback is added. State changes happen under one module lock, held for
a few instructions, and also under the Condition once it exists, so waiters,
``wait()``/``as_completed()`` and callbacks see exactly what a stock Future
would show them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future as _Future
from concurrent.futures import InvalidStateError
from concurrent.futures._base import (  # the states, as the stock Future spells them
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    LOGGER,
    PENDING,
    RUNNING,
)

__all__ = ["CallFuture"]

_LOCK = threading.Lock()
_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class CallFuture(_Future):
    """See the module docstring. Behaves as ``concurrent.futures.Future``."""

    def __init__(self, running: bool = False, canceller: Callable[[], bool] | None = None) -> None:
        # running=True: the call is under way (its request was or is being
        # written), so cancel() returns False instead of claiming it will not
        # run, unless ``canceller()`` (which asks the replica) says it won't.
        # No super().__init__(): that is what we avoid.
        self._state = RUNNING if running else PENDING
        self._canceller = canceller
        self._result: object = None
        self._exception: BaseException | None = None
        self._cond: threading.Condition | None = None
        self._wl: list | None = None
        self._cbs: list | None = None

    # -- lazily made parts, under the names the stock Future and wait() use
    @property  # the stock Future's attribute, made lazily (typeshed types it as a plain attribute)
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        c = self._cond
        if c is None:
            with _LOCK:
                c = self._cond
                if c is None:
                    c = self._cond = threading.Condition()
        return c

    @property
    def _waiters(self) -> list:  # type: ignore[override]
        wl = self._wl
        if wl is None:
            with _LOCK:
                wl = self._wl
                if wl is None:
                    wl = self._wl = []
        return wl

    @property
    def _done_callbacks(self) -> list:
        return self._cbs if self._cbs is not None else []

    # -- completion
    def _complete(self, state: str, result: object, exception: BaseException | None) -> None:
        with _LOCK:
            cond = self._cond
            if cond is None:  # nobody waits: the module lock alone orders the change
                if self._state in _DONE:
                    raise InvalidStateError(f"future already {self._state.lower()}")
                self._result, self._exception, self._state = result, exception, state
        if cond is not None:
            with cond:
                with _LOCK:
                    if self._state in _DONE:
                        raise InvalidStateError(f"future already {self._state.lower()}")
                    self._result, self._exception, self._state = result, exception, state
                for waiter in self._wl or ():
                    if exception is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
                cond.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]  # the stock Future's, untyped

    def set_result(self, result: object) -> None:
        self._complete(FINISHED, result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._complete(FINISHED, None, exception)

    def cancel(self) -> bool:
        if self._state == RUNNING:
            if self._canceller is not None and self._canceller():
                self.end_cancelled()
            # Cancelled here, or by the replica's own "not run" reply, which
            # can come back before the canceller's answer does.
            return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)
        cond = self._condition
        with cond:
            with _LOCK:
                if self._state in (RUNNING, FINISHED):
                    return False
                if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                    return True
                self._state = CANCELLED
            cond.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]  # the stock Future's, untyped
        return True

    def end_cancelled(self) -> bool:
        """The replica said this running call will never run: cancelled, as
        an executor's cancelled work item (waiters told, callbacks run).
        False when it had ended already (then it stays as it ended).

        >>> f = CallFuture(running=True)
        >>> f.end_cancelled(), f.cancelled(), f.end_cancelled()
        (True, True, False)
        """
        cond = self._condition
        with cond:
            with _LOCK:
                if self._state in _DONE:
                    return False  # it ended first (its reply, its timeout): cancel() is too late
                self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._wl or ():
                waiter.add_cancelled(self)
            cond.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]  # the stock Future's, untyped
        return True

    def set_running_or_notify_cancel(self) -> bool:
        """As the stock Future's: False if it was cancelled (it must not run),
        else it is running now. The common case takes no Condition."""
        with _LOCK:
            if self._state == PENDING:
                self._state = RUNNING
                return True
        return super().set_running_or_notify_cancel()  # cancelled: notifies wait()ers as the stock one does

    def add_done_callback(self, fn) -> None:
        with _LOCK:
            if self._state not in _DONE:
                cbs = self._cbs
                if cbs is None:
                    cbs = self._cbs = []
                cbs.append(fn)
                return
        try:
            fn(self)
        except Exception:
            LOGGER.exception("exception calling callback for %r", self)

    # -- fast reads: a finished future needs no lock
    def done(self) -> bool:
        return self._state in _DONE

    def result(self, timeout: float | None = None) -> object:
        if self._state == FINISHED:
            if self._exception is not None:
                exc = self._exception
                try:
                    raise exc
                finally:
                    del exc, self  # break the traceback cycle, as the stock Future does
            return self._result
        return super().result(timeout)

    def exception(self, timeout: float | None = None):
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)
