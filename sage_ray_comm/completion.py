"""What happens when a call ends: its reply read as a value or a typed
exception (:func:`outcome`), the caller's accounting and metrics
(:class:`CallFinisher`), and the retry of idempotent asynchronous calls on
another replica (:class:`Retrying`). Also how long a call may wait for a
replica Ray is restarting (:class:`RestartBudget`), and how an asynchronous
call does that wait without blocking its caller (:func:`send_later`).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

from . import context
from ._future import CallFuture
from ._wire import (
    ERR_CANCELLED,
    ERR_DESERIALIZATION,
    ERR_FUNCTION,
    ERR_PROTOCOL,
    ERR_REMOTE,
    ERR_SERIALIZATION,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    ERR_VALIDATION,
    ST_OK,
    ErrorInfo,
    Reply,
)
from .endpoint import Endpoint
from .errors import (
    CallTimeout,
    DeserializationError,
    FunctionNotFound,
    InvalidCallArgument,
    ProtocolMismatch,
    RemoteError,
    SageCommError,
    SerializationError,
    ServiceUnavailable,
    ValidationError,
)
from .metrics import recorder

__all__ = [
    "CallFinisher",
    "RestartBudget",
    "RestartPending",
    "Retrying",
    "check_timeout",
    "outcome",
    "pick_timeout",
    "remote_error",
    "send_later",
]

log = logging.getLogger(__name__)


class Retrying:
    """The Future call_async returns for an idempotent function: when the
    replica dies (ServiceUnavailable), the call goes again to another
    replica, up to three times, within the first attempt's deadline. Other
    outcomes pass straight through. Retries are issued from the thread that
    completes the failed attempt."""

    MAX_RETRIES = 3

    def __init__(
        self,
        first: concurrent.futures.Future,
        iid: str,
        deadline: float,
        resend: Callable[[float, list[str], bool], tuple[concurrent.futures.Future, str]],
        stats: dict,
    ) -> None:
        """``resend(seconds_left, excluded_replicas, defer)`` makes one more
        attempt and returns its future and the replica it went to; with
        ``defer`` it raises RestartPending instead of waiting for a replica
        Ray is restarting (the retry then waits in a thread of its own, not
        in the one that completes calls). ``stats`` counts ``retries``."""
        self.future: concurrent.futures.Future = CallFuture(running=True)
        self.resend, self.stats = resend, stats
        self.deadline = deadline
        self.excluded: list[str] = []
        self._attempt(first, iid)

    def _attempt(self, fut: concurrent.futures.Future, iid: str) -> None:
        fut.add_done_callback(lambda f: self._done(f, iid))

    def _done(self, f: concurrent.futures.Future, iid: str) -> None:
        exc = f.exception()
        if exc is None:
            self.future.set_result(f.result())
            return
        left = self.deadline - time.monotonic()
        if not isinstance(exc, ServiceUnavailable) or len(self.excluded) >= self.MAX_RETRIES or left <= 0:
            self.future.set_exception(exc)
            return
        self.excluded.append(iid)
        self._resend(left, True)

    def _resend(self, left: float, defer: bool) -> None:
        try:
            nxt, nid = self.resend(left, self.excluded, defer)
        except RestartPending:  # every replica restarting: wait for one elsewhere
            end = time.monotonic() + left
            threading.Thread(  # (a timeout must stay positive: at worst the wait then ends at once)
                target=lambda: self._resend(max(end - time.monotonic(), 1e-3), False), name="sage-retry", daemon=True
            ).start()
            return
        except BaseException as e:  # no replica left, or the retry itself failed: that is the outcome
            self.future.set_exception(e)
            return
        self.stats["retries"] += 1
        self._attempt(nxt, nid)


class CallFinisher:
    """Turns an async call's reply into its outcome, in the thread that got the
    reply. One small object per pending call (a closure would be nine)."""

    __slots__ = ("bus", "cut_by", "ep", "function", "iid", "service", "t0", "transport")

    def __init__(
        self, ep: Endpoint, iid: str, service: str, function: str, transport: str, bus: str, cut_by: str | None = None
    ) -> None:
        self.ep, self.iid, self.service, self.function = ep, iid, service, function
        self.transport, self.bus, self.t0 = transport, bus, time.perf_counter()
        self.cut_by = cut_by  # why the timeout is shorter than asked: the parent call's deadline

    def __call__(self, rep: Reply | None, exc: BaseException | None) -> Any:
        ep = self.ep
        ep.outstanding[self.iid] -= 1
        dt = time.perf_counter() - self.t0
        if exc is None:
            try:
                value = outcome(rep, self.service, self.function)  # type: ignore[arg-type]
            except SageCommError as e:
                ep.stats["errors"] += 1
                recorder.call(
                    self.bus, self.service, self.function, self.transport, "request_response", dt, type(e).__name__
                )
                raise
            except concurrent.futures.CancelledError as e:  # skipped by the replica: as a cancel() that won
                exc = e
            else:
                recorder.call(self.bus, self.service, self.function, self.transport, "request_response", dt)
                return value
        if isinstance(exc, ServiceUnavailable):
            ep.mark_dead(self.iid)
        if isinstance(exc, SageCommError):
            ep.stats["timeouts" if isinstance(exc, CallTimeout) else "errors"] += 1
        recorder.call(
            self.bus, self.service, self.function, self.transport, "request_response", None, type(exc).__name__
        )
        if self.cut_by is not None and isinstance(exc, CallTimeout):
            raise CallTimeout(f"{exc} ({self.cut_by})") from exc
        raise exc


def pick_timeout(given: float | None, declared: float | None, default: float) -> float:
    """The call's own timeout, else the function's declared one, else the client's default."""
    return given if given is not None else (declared if declared is not None else default)


def restart_wait(given: Any, default: float, service: str, function: str) -> float:
    """How long a call to a service with no live replica waits for one Ray
    is restarting (Endpoint.route): the call's timeout (``given``, else the
    client's ``default``; the function's own is not known before a replica
    is), cut by the deadline of the call being handled; 0 for a timeout that
    is not a positive number (check_timeout reports it once routed)."""
    t = given if given is not None else default
    if not isinstance(t, (int, float)) or not t > 0:
        return 0.0
    return context.bound_by_parent(float(t), service, function)[0]


class RestartPending(SageCommError):
    """Raised by a deferring :class:`RestartBudget`: the call found no live
    replica, only ones Ray is restarting. Never reaches a user: the call
    goes on waiting in a thread of its own (:func:`send_later`)."""


class RestartBudget:
    """How long a call that finds no live replica may wait for one Ray is
    restarting: ``Endpoint.route`` calls it, only then, for the seconds
    (:func:`restart_wait`, less what the call already waited). The time
    waited comes off the call's timeout (:meth:`left`): a call never takes
    longer than its timeout, as with a gRPC deadline. ``defer``: raise
    RestartPending instead (an asynchronous call must not block its caller).

    >>> b = RestartBudget(5.0, 30.0, "calc", "add")
    >>> b.left(5.0)  # never asked: nothing waited
    5.0
    >>> 0 < b() <= 5.0, b.left(5.0) <= 5.0
    (True, True)
    """

    __slots__ = ("default", "defer", "function", "given", "service", "since")

    def __init__(self, given: Any, default: float, service: str, function: str, defer: bool = False) -> None:
        self.given, self.default, self.service, self.function = given, default, service, function
        self.defer = defer
        self.since: float | None = None  # when the call first found no live replica

    def __call__(self) -> float:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        if self.defer:
            raise RestartPending(f"{self.service}.{self.function}: every replica is restarting")
        return restart_wait(self.given, self.default, self.service, self.function) - (now - self.since)

    def left(self, t: float) -> float:
        """The call's timeout ``t`` less the time it waited for a replica;
        raises CallTimeout when nothing is left."""
        if self.since is None:
            return t
        waited = time.monotonic() - self.since
        if waited >= t:
            raise CallTimeout(
                f"call to {self.service}.{self.function}: its {t:.3g} s timeout passed while it waited "
                f"{waited:.3g} s for a restarting replica"
            )
        return t - waited


def send_later(
    wait: Callable[[], object], send: Callable[[], concurrent.futures.Future], name: str
) -> concurrent.futures.Future:
    """A call that must wait for a replica Ray is restarting, made without
    blocking its caller: returns a future at once; a thread (``name``) runs
    ``wait()`` (until a replica is live, or raises), then ``send()``, whose
    future's outcome becomes the returned one's. The thread runs in the
    caller's context (its deadline, its trace) and ends with the wait: it
    never outlives the call's timeout. Cancelling the future before it is
    sent means it is never sent; after that, it asks the sent call's future.
    """
    inner: list[concurrent.futures.Future] = []
    outer = CallFuture(canceller=lambda: bool(inner) and inner[0].cancel())

    def copy(f: concurrent.futures.Future) -> None:
        if f.cancelled():
            outer.end_cancelled()
        elif f.exception() is not None:
            outer.set_exception(f.exception())
        else:
            outer.set_result(f.result())

    def run() -> None:
        try:
            wait()
            if not outer.set_running_or_notify_cancel():
                return  # cancelled while it waited: never sent
            fut = send()
        except BaseException as e:
            if not outer.done():
                outer.set_exception(e)
            return
        inner.append(fut)
        fut.add_done_callback(copy)

    threading.Thread(target=contextvars.copy_context().run, args=(run,), name=name, daemon=True).start()
    return outer


def check_timeout(t: Any, service: str, function: str) -> float:
    if not isinstance(t, (int, float)) or t != t or t <= 0:
        raise InvalidCallArgument(
            f"timeout of the call to {service}.{function} must be a positive number of seconds, got {t!r}"
        )
    return float(t)


def remote_error(info: ErrorInfo, service: str, function: str) -> BaseException:
    """The exception a caller sees for a handler that raised."""
    original = None
    if info.exc_pickle is not None:
        try:
            original = pickle.loads(info.exc_pickle)
        except Exception:
            original = None
    cls: type[RemoteError] = RemoteError
    if isinstance(original, RemoteError):
        cls = type(original)  # a handler's own call failed: keep what it was (``except ValueError`` still works)
    elif isinstance(original, Exception):
        cls = _dual_class(type(original))
    try:
        err = cls.__new__(cls)
        Exception.__init__(err, *(original.args if original is not None else (info.message,)))
        if original is not None:
            err.__dict__.update(getattr(original, "__dict__", {}))
    except Exception:
        err = RemoteError(info.message)
    err.remote_type = info.type_name
    err.remote_message = info.message
    err.remote_traceback = info.traceback
    err.service = service
    err.function = function
    return err


_DUALS: dict[type, type[RemoteError]] = {}


def _dual_class(t: type) -> type[RemoteError]:
    """A subclass of both RemoteError and ``t``, so ``except t`` still catches it."""
    d = _DUALS.get(t)
    if d is None:
        try:
            d = type(f"RemoteError[{t.__name__}]", (RemoteError, t), {"__str__": RemoteError.__str__})
        except TypeError:  # layout conflict (a C type with its own fields): plain RemoteError
            d = RemoteError
        _DUALS[t] = d
    return d


def outcome(rep: Reply, service: str, function: str) -> Any:
    """The value of a reply, or its typed exception raised."""
    _cid, status, value = rep
    if status == ST_OK:
        return value
    info = ErrorInfo(*value)
    code = info.code
    if code == ERR_REMOTE:
        raise remote_error(info, service, function)
    if code == ERR_FUNCTION:
        raise FunctionNotFound(info.message)
    if code == ERR_VALIDATION:
        raise ValidationError(info.message, info.extra)
    if code == ERR_TIMEOUT:
        raise CallTimeout(info.message)
    if code == ERR_SERIALIZATION:
        raise SerializationError(info.message)
    if code == ERR_DESERIALIZATION:
        raise DeserializationError(info.message)
    if code == ERR_UNAVAILABLE:
        raise ServiceUnavailable(info.message)
    if code == ERR_CANCELLED:  # its caller's cancel() came first; the future ends cancelled (transport.settle)
        raise concurrent.futures.CancelledError(f"call to {service}.{function}: {info.message}")
    if code == ERR_PROTOCOL:
        theirs, ours = info.extra if isinstance(info.extra, tuple) else (None, None)
        raise ProtocolMismatch(
            f"call to {service}.{function}: {info.message}", caller_version=theirs, replica_version=ours
        )
    raise RemoteError(f"{service}.{function} failed: {info.message}")
