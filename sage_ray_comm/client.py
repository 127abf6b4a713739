"""FunctionClient: call services by name, in four patterns.

>>> client = FunctionClient()                                   # doctest: +SKIP
>>> client.call("calculator", "calculate", 42)                  # request-response
{'result': 84}
>>> fut = client.call_async("calculator", "add", 1, 2)          # a concurrent.futures.Future
>>> await client.acall("calculator", "calculate", 1)            # from async code
>>> client.send("logger", "write", "hello")                     # point-to-point, no reply
>>> client.broadcast("sensor.kitchen.temp", 21.5)               # publish-subscribe

Calls to a service with several replicas are load-balanced (``round_robin``
or ``least_outstanding``, same-node replicas first). The client never asks the
router on the way: it keeps the bus registry cached in the process (one
:class:`Endpoint` per bus, shared by every client), kept fresh by a long poll
on the router, and refreshed at once when a name is not found.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from . import context, tracing
from ._wire import (
    OP_CALL,
    OP_SEND,
    Request,
)
from .arena import check_budget
from .completion import (
    CallFinisher,
    RestartBudget,
    RestartPending,
    Retrying,
    check_timeout,
    outcome,
    pick_timeout,
    send_later,
)
from .endpoint import Endpoint, TransportFactory
from .errors import (
    CallTimeout,
    InvalidCallArgument,
    SageCommError,
    ServiceUnavailable,
    SharedMemoryFull,
)
from .metrics import recorder
from .pubsub import PubSubCalls
from .router import (
    validate_bus_name,
)
from .routing import POLICIES
from .streams import OPENING, StreamCalls, set_client_factory
from .views import RegistryViews

__all__ = ["DEFAULT_TIMEOUT", "FunctionClient"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
_MISSING = object()


class FunctionClient(StreamCalls, PubSubCalls, RegistryViews):
    """Calls functions of services on a bus.

    Args:
        client_id: names this caller in messages (default: generated).
        bus: the bus name (default ``"default"``) or a CommunicationBus.
        timeout: default timeout of calls, in seconds, when the function
            declares none (``$SAGE_COMM_TIMEOUT`` or 30).
        policy: override every service's load-balancing policy.
        transport: a factory ``node_id -> Transport`` used for every call and
            event instead of shared memory and Ray (as httpx takes a
            transport); ``sage_ray_comm.testing.FakeTransport`` is one. The
            client then gets a registry cache of its own.
        router: the registry to read instead of the bus's router actor, such
            as ``sage_ray_comm.testing.FakeRouter`` (then no Ray is needed);
            ``node_id`` names this process's node for same-node preference.

    >>> client = FunctionClient(bus="production_bus")                # doctest: +SKIP
    >>> client.call("calculator", "add", 1, 2, timeout=5)            # doctest: +SKIP
    3

    In a test, without Ray:

    >>> from sage_ray_comm.testing import FakeRouter, FakeTransport
    >>> fake = FakeTransport(handler=lambda inst, req: sum(req.args))
    >>> router = FakeRouter("b").add_replica("calculator", "calc-1", functions=["add"])
    >>> FunctionClient(bus="b", transport=lambda node: fake, router=router).call("calculator", "add", 1, 2)
    3
    """

    def __init__(
        self,
        client_id: str | None = None,
        bus: Any = None,
        *,
        timeout: float | None = None,
        policy: str | None = None,
        transport: TransportFactory | None = None,
        router: Any = None,
        node_id: str | None = None,
        arena_bytes: int | None = None,
    ) -> None:
        """``arena_bytes``: the most shared memory this process's arena on
        this bus may take for large buffers of calls (default: a quarter of
        /dev/shm's free space, at most 1 GiB); the first client of the bus in
        a process that says so sets it."""
        check_budget(arena_bytes, InvalidCallArgument, f"FunctionClient(bus={bus!r})")
        self._arena_bytes = arena_bytes
        if bus is not None and not isinstance(bus, str):
            bus = getattr(bus, "name", bus)
        self.bus = validate_bus_name(bus or "default")
        if policy is not None and policy not in POLICIES:
            raise InvalidCallArgument(f"policy must be one of {POLICIES}, got {policy!r}")
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:8]}"
        default = timeout if timeout is not None else os.environ.get("SAGE_COMM_TIMEOUT", DEFAULT_TIMEOUT)
        self.default_timeout = float(default)
        self.policy = policy
        self._own = (transport, router, node_id) if (transport is not None or router is not None) else None
        self._ep: Endpoint | None = None
        self._subs: list[str] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def endpoint(self) -> Endpoint:
        ep = self._ep
        if ep is None or ep.closed:
            if self._closed:
                raise ServiceUnavailable(f"client '{self.client_id}' is closed")
            if self._own is not None:  # given transports or a registry: a private endpoint
                transport, router, node_id = self._own
                ep = self._ep = Endpoint(self.bus, transport=transport, router=router, node_id=node_id)
            else:
                ep = self._ep = Endpoint.for_bus(self.bus)
            ep.refs += 1
            if self._arena_bytes is not None and getattr(ep.shm, "arena", True) is None:
                ep.shm.arena_budget = self._arena_bytes  # type: ignore[attr-defined]  # ShmTransport's
        return ep

    # -- routing
    def _attempt(
        self,
        service: str,
        function: str,
        args: tuple,
        kwargs: dict,
        timeout: float | None,
        instance: str | None,
        exclude: Sequence[str],
        headers: dict | None,
        trace: str | None,
        span: Any,
        budget: RestartBudget | None = None,
    ) -> tuple:
        """The start of one attempt of a call, synchronous or not, counted as in flight: (endpoint, replica,
        function info, timeout (cut by the parent's deadline and by any wait for a restarting replica), what
        cut it, transport, request). ``budget``: how long it may wait for a replica Ray is restarting."""
        ep = self.endpoint
        if budget is None:
            budget = RestartBudget(timeout, self.default_timeout, service, function)
        inst, finfo = ep.route(service, function, instance, exclude, self.policy, budget)
        if finfo.stream != OPENING.get():
            what = "is a generator function: read it with stream()" if finfo.stream else "is not a generator function"
            raise InvalidCallArgument(f"{service}.{function} {what}")
        t = check_timeout(pick_timeout(timeout, finfo.timeout, self.default_timeout), service, function)
        t, cut_by = context.bound_by_parent(budget.left(t), service, function)
        transport = ep.transport_for(inst)
        deadline = time.time() + t
        req = Request(
            OP_CALL, 0, function, args, kwargs or None, None, deadline, self.client_id, headers, service, trace
        )
        ep.count_call(inst, transport, 1)
        if span is not None:
            tracing.set_route(span, inst.instance_id, transport.name)
        return ep, inst, finfo, t, cut_by, transport, req

    def call(
        self,
        service: str,
        function: str,
        *args: Any,
        timeout: float | None = None,
        instance: str | None = None,
        headers: dict | None = None,
        **kwargs: Any,
    ) -> Any:
        """Calls ``service.function(*args, **kwargs)`` and returns its result.

        Raises ServiceNotFound, FunctionNotFound, ValidationError, CallTimeout
        (no reply within ``timeout``, default the function's own),
        ServiceUnavailable (the replica died; idempotent functions are retried
        on another replica first) or the handler's exception as a RemoteError.
        When every replica is restarting, waits for one. Waits and retries
        all count against ``timeout``.
        """
        span, trace = tracing.start_call(service, function, self.bus) if tracing.ENABLED else tracing.UNTRACED
        try:
            excluded: list[str] = []
            given, end = timeout, 0.0
            while True:
                ep, inst, finfo, t, cut_by, transport, req = self._attempt(
                    service, function, args, kwargs, given, instance, excluded, headers, trace, span
                )
                end = end or time.monotonic() + t  # a retry gets what is left of the first attempt's time
                t0 = time.perf_counter()
                try:
                    rep = transport.call(inst, req, t)
                except SharedMemoryFull as e:
                    if transport is ep.direct:
                        raise
                    ep.shm_full(e)  # no room for this call's rings: the same call over Ray
                    ep.uncount_call(inst, transport)
                    continue
                except ServiceUnavailable:
                    ep.mark_dead(inst.instance_id)
                    ep.stats["errors"] += 1
                    recorder.call(
                        self.bus, service, function, transport.name, "request_response", None, "ServiceUnavailable"
                    )
                    given = end - time.monotonic()
                    if finfo.idempotent and instance is None and len(excluded) < 3 and given > 0:
                        excluded.append(inst.instance_id)
                        ep.stats["retries"] += 1
                        continue
                    raise
                except CallTimeout as e:
                    ep.stats["timeouts"] += 1
                    recorder.call(self.bus, service, function, transport.name, "request_response", None, "CallTimeout")
                    if cut_by is not None:
                        raise CallTimeout(f"{e} ({cut_by})") from e
                    raise
                finally:
                    ep.count_call(inst, transport, -1)
                try:
                    value = outcome(rep, service, function)
                except SageCommError as e:
                    ep.stats["errors"] += 1
                    recorder.call(
                        self.bus,
                        service,
                        function,
                        transport.name,
                        "request_response",
                        time.perf_counter() - t0,
                        type(e).__name__,
                    )
                    raise
                recorder.call(self.bus, service, function, transport.name, "request_response", time.perf_counter() - t0)
                if span is not None:
                    tracing.finish(span)
                return value
        except BaseException as e:
            if span is not None:
                tracing.finish(span, e)
            raise

    def buffer(self, shape: Any, dtype: Any = "float64", timeout: float | None = None) -> Any:
        """A writable numpy array that lives in shared memory (this process's
        arena): passing it to a service on this node copies nothing, and it
        turns read-only once sent (what the service saw never changes).

        When receivers hold every slot of the arena, it waits for one to come
        back up to ``timeout`` seconds (default: this client's call timeout;
        inside a handler, no later than its request's deadline), then raises
        CallTimeout.

        >>> frame = client.buffer((1080, 1920, 3), "uint8")  # doctest: +SKIP
        >>> camera.read_into(frame); client.call("detector", "detect", frame)  # doctest: +SKIP
        """
        make = getattr(self.endpoint.shm, "buffer", None)
        if make is None:
            raise InvalidCallArgument("this client has no shared-memory transport to make a buffer in")
        return make(shape, dtype, timeout, self.default_timeout, f"client {self.client_id}")

    def call_async(
        self,
        service: str,
        function: str,
        *args: Any,
        timeout: float | None = None,
        instance: str | None = None,
        headers: dict | None = None,
        **kwargs: Any,
    ) -> concurrent.futures.Future:
        """Like :meth:`call`, but returns a ``concurrent.futures.Future`` at once.

        The request is usually on its way when this returns (it blocks only
        while the replica's request queue is full: backpressure; when every
        replica is restarting, the call waits for one in a thread of its own,
        within its timeout, and ``cancel()`` before it is sent stops it), so the
        future is ``running()`` and its ``cancel()`` returns False: the call
        may still run, and ``cancel()`` never claims otherwise. Over Ray, a
        call that waits in this process because the replica already runs as
        many of its calls as it has threads is not sent yet: ``cancel()``
        returns True, and it never runs. As with
        :meth:`call`, an idempotent function whose replica died is retried
        on another one, within the call's timeout.
        """
        span, trace = tracing.start_call(service, function, self.bus) if tracing.ENABLED else tracing.UNTRACED
        call = (service, function, args, kwargs, timeout, instance, headers, trace, span)
        budget = RestartBudget(timeout, self.default_timeout, service, function, defer=True)
        try:
            return context.adopt(self._call_async(call, budget))
        except RestartPending:  # every replica restarting: wait for one in a thread, not in the caller's
            budget.defer = False
            return context.adopt(
                send_later(
                    lambda: self._await_replica(call, budget),
                    lambda: self._call_async(call, budget),
                    f"sage-wait-{service}",
                )
            )

    def _await_replica(self, call: tuple, budget: RestartBudget) -> None:
        try:
            self.endpoint.instances(call[0], budget)
        except BaseException as e:
            tracing.finish(call[-1], e)
            raise

    def _call_async(self, call: tuple, budget: RestartBudget) -> concurrent.futures.Future:
        service, function, args, kwargs, timeout, instance, headers, trace, span = call
        try:
            fut, iid, idempotent, deadline = self._call_async_once(
                service, function, args, kwargs, timeout, instance, headers, (), trace, span, budget
            )
        except RestartPending:
            raise
        except BaseException as e:
            tracing.finish(span, e)
            raise
        if instance is not None or not idempotent:  # the common case: the attempt is the call
            return fut if span is None else tracing.finish_with(span, fut)

        def resend(left: float, excluded: list[str], defer: bool) -> tuple[concurrent.futures.Future, str]:
            again = RestartBudget(left, self.default_timeout, service, function, defer)
            nxt, nid, _, _ = self._call_async_once(
                service, function, args, kwargs, left, None, headers, excluded, trace, span, again
            )
            return nxt, nid

        return tracing.finish_with(span, Retrying(fut, iid, deadline, resend, self.endpoint.stats).future)

    def _call_async_once(
        self,
        service: str,
        function: str,
        args: tuple,
        kwargs: dict,
        timeout: float | None,
        instance: str | None,
        headers: dict | None,
        exclude: Sequence[str],
        trace: str | None,
        span: Any,
        budget: RestartBudget,
    ) -> tuple:
        """One attempt: (future, replica id, idempotent, monotonic deadline)."""
        ep, inst, finfo, t, cut_by, transport, req = self._attempt(
            service, function, args, kwargs, timeout, instance, exclude, headers, trace, span, budget
        )
        finish = CallFinisher(ep, inst.instance_id, service, function, transport.name, self.bus, cut_by)
        try:
            fut = transport.call_async(inst, req, t, finish)
            return fut, inst.instance_id, finfo.idempotent, time.monotonic() + t
        except SharedMemoryFull as e:
            if transport is ep.direct:
                ep.count_call(inst, transport, -1)
                raise
            ep.shm_full(e)  # no room for this call's rings: the same call over Ray
            ep.recount_call(transport, ep.direct)
            finish.transport = ep.direct.name
            return ep.direct.call_async(inst, req, t, finish), inst.instance_id, finfo.idempotent, time.monotonic() + t
        except BaseException:
            ep.count_call(inst, transport, -1)
            raise

    async def acall(
        self,
        service: str,
        function: str,
        *args: Any,
        timeout: float | None = None,
        instance: str | None = None,
        headers: dict | None = None,
        **kwargs: Any,
    ) -> Any:
        """``await``-able :meth:`call`, for async code (an async Ray actor, a notebook)."""
        return await asyncio.wrap_future(
            self.call_async(service, function, *args, timeout=timeout, instance=instance, headers=headers, **kwargs)
        )

    def send(
        self,
        service: str,
        function: str,
        *args: Any,
        instance: str | None = None,
        timeout: float | None = None,
        headers: dict | None = None,
        **kwargs: Any,
    ) -> str:
        """Point-to-point: delivers the call with no reply (fire-and-forget).

        ``instance=`` (an instance id or actor name) targets one replica.
        Returns the replica's instance id. Blocks only while its queue is full,
        or while every replica is restarting (within ``timeout``).
        """
        ep = self.endpoint
        budget = RestartBudget(timeout, self.default_timeout, service, function)
        inst, finfo = ep.route(service, function, instance, (), self.policy, budget)
        t = budget.left(check_timeout(pick_timeout(timeout, finfo.timeout, self.default_timeout), service, function))
        transport = ep.transport_for(inst)
        span, trace = tracing.start_send(service, function, self.bus) if tracing.ENABLED else tracing.UNTRACED
        req = Request(OP_SEND, 0, function, args, kwargs or None, None, None, self.client_id, headers, service, trace)
        try:
            try:
                transport.send(inst, req, t)
            except SharedMemoryFull as e:
                if transport is ep.direct:
                    raise
                ep.shm_full(e)
                transport = ep.direct
                transport.send(inst, req, t)
        except BaseException as e:
            tracing.finish(span, e)
            raise
        tracing.set_route(span, inst.instance_id, transport.name)
        tracing.finish(span)
        ep.count_sent(inst, transport)
        recorder.call(
            self.bus, service, function, transport.name, "point_to_point" if instance else "load_balanced", None
        )
        return inst.instance_id

    def stats(self) -> dict:
        """Calls made from this process on this bus, by transport (``shm`` / ``ray``) and replica."""
        s = dict(self.endpoint.stats)
        s["by_instance"] = dict(s["by_instance"])
        s["stale_replies"] = getattr(self.endpoint.shm, "stale_replies", 0)
        s["reply_spin_us"] = getattr(self.endpoint.shm, "reply_spin_us", list)()  # per calling thread (spinning.py)
        arena = getattr(self.endpoint.shm, "arena", None)  # large buffers of this process's calls
        return s | {"arena": arena.stats() if arena is not None else None}

    def close(self) -> None:
        """Drops this client's subscriptions; the last client of the bus in this
        process also removes the process's reply and event rings."""
        if self._closed:
            return
        self._closed = True
        ep, self._ep = self._ep, None
        if ep is None or ep.closed:
            return
        for sid in list(self._subs):
            try:
                ep.router.unsubscribe(sid)
            except Exception:
                pass
            ep.forget_subscription(sid)
        ep.refs -= 1
        if ep.refs <= 0:
            ep.close()

    def __enter__(self) -> FunctionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FunctionClient({self.client_id!r}, bus={self.bus!r})"


# ------------------------------------------------- SAGE's service-call surface


set_client_factory(lambda bus: FunctionClient(bus=bus))  # for stream handles unpickled in another process
