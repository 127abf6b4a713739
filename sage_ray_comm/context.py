"""The request a handler is serving, as seen by the code it runs.

A replica sets it around each handler (a ``contextvars`` variable, so it
follows the handler into ``async`` code and stays out of other threads).
Calls the handler makes inherit its deadline, as gRPC's do: a nested call's
timeout is the smaller of its own and the time its parent has left, and a
call made after the parent's deadline passed fails at once, unsent.

>>> remaining() is None          # not inside a handler
True
"""

from __future__ import annotations

import contextvars
import dataclasses
import time
from typing import Any

from .errors import CallTimeout

__all__ = ["Handling", "adopt", "bound_by_parent", "cancelled", "current", "deadline", "enter", "leave", "remaining"]


@dataclasses.dataclass(frozen=True)
class Handling:
    """The request being handled: which function, its deadline (epoch
    seconds; None when the caller gave none, as for a send or an event), and
    the trace context it carried (passed on by its handler's calls when this
    process records no spans of its own; see tracing.py), and its entry in
    the replica's call registry (``cancels.Running``: whether it was cancelled)."""

    service: str
    function: str
    deadline: float | None
    trace: str | None = None
    call: Any = None


_current: contextvars.ContextVar[Handling | None] = contextvars.ContextVar("sage_ray_comm_handling", default=None)


current = _current.get  # a C call: the tracing code asks on every call
"""current() -> the request this thread or task is handling (a Handling), if any."""


def enter(handling: Handling) -> contextvars.Token:
    """Marks the start of a handler (the replica calls it); returns the token for :func:`leave`."""
    return _current.set(handling)


def leave(token: contextvars.Token) -> None:
    _current.reset(token)


def deadline() -> float | None:
    """The deadline of the request being handled, in epoch seconds (None: none, or not in a handler)."""
    h = _current.get()
    return None if h is None else h.deadline


def cancelled() -> bool:
    """Whether the caller cancelled the request being handled (False outside
    a handler). A sync handler that runs long polls it and stops early; an
    ``async def`` one gets ``asyncio.CancelledError`` instead."""
    h = _current.get()
    return h is not None and h.call is not None and h.call.cancelled


def adopt(child: Any) -> Any:
    """Ties ``child`` (a call's future, or a stream) to the request being
    handled, if it can be cancelled: cancelling that request cancels the
    child (a stream is closed), as gRPC cancels the calls a cancelled call
    made. Returns ``child``."""
    h = _current.get()
    if h is not None and h.call is not None:
        h.call.adopt(child)
    return child


def remaining() -> float | None:
    """Seconds left before the deadline of the request being handled (may be
    negative once it passed); None when there is no deadline."""
    d = deadline()
    return None if d is None else d - time.time()


def bound_by_parent(timeout: float, service: str, function: str) -> tuple[float, str | None]:
    """A nested call's timeout: ``timeout``, or less if the request being
    handled has less time left. Returns the timeout and, when the parent's
    deadline cut it, a note naming that deadline (for the CallTimeout).
    Raises CallTimeout, before anything is sent, when the deadline passed."""
    h = _current.get()
    if h is None or h.deadline is None:
        return timeout, None
    left = h.deadline - time.time()
    if left <= 0:
        raise CallTimeout(
            f"call to {service}.{function} not sent: the deadline of the call being handled "
            f"({h.service}.{h.function}) passed {-left:.3f} s ago"
        )
    if left < timeout:
        return left, f"cut to the {left:.3f} s left before the deadline of {h.service}.{h.function}"
    return timeout, None
