"""Services: classes whose methods other processes call by name.

Declare a service, expose functions, deploy replicas as Ray actors:

>>> @sage_service(name="calculator", replicas=2, num_cpus=0.1)     # doctest: +SKIP
... class Calculator(BaseService):
...     @service_function
...     def calculate(self, data: int, message=None) -> dict:
...         return {"result": data * 2}
...
...     @ServiceFunction(name="add")
...     def add_numbers(self, a: int, b: int) -> int:
...         return a + b
>>> handle = Calculator.deploy()                                  # doctest: +SKIP
>>> FunctionClient().call("calculator", "calculate", 42)          # doctest: +SKIP
{'result': 84}

or serve from the current process (driver or any actor): ``MyService().start()``.

How a replica serves: its request ring (a :class:`~sage_ray_comm.SageQueue`
in the bus's namespace) is read by dispatcher threads in a leader/follower
pattern: one thread waits on the ring, and when it takes a request it hands
the waiting role on and runs the handler itself (no hand-off on the hot
path). Threads are added, up to ``max_concurrency``, only while all are
busy, so a handler that calls another service never starves the dispatcher.
``async def`` handlers run on an asyncio loop in their own thread and really
are awaited. Annotated handler arguments are validated with pydantic.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from . import context, lifecycle, shm
from ._ray import ensure_ray
from ._replica import DEFAULT_MAX_CONCURRENCY, Runtime
from .arena import check_budget
from .client import FunctionClient
from .deploy import ServiceHandle, deploy_service
from .endpoint import Endpoint
from .errors import InvalidServiceDefinition, InvalidSubscription, ServiceUnavailable
from .intake import open_request_ring
from .malloc import tune_malloc
from .message import CommunicationPattern
from .ray_transport import ensure_janitor
from .router import (
    bus_namespace,
    code_id_of,
    router_client,
    validate_bus_name,
    validate_pattern,
)
from .routing import DEFAULT_POLICY, POLICIES
from .sage_api import ServiceCallMixin
from .transport import REQUEST_RING_BYTES

__all__ = [
    "DEFAULT_TIMEOUT",
    "BaseService",
    "ServiceFunction",
    "ServiceHandle",
    "sage_service",
    "service_function",
    "subscribe",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0


# ------------------------------------------------------------- decorators
class ServiceFunction:
    """Marks a method as callable by other processes (the original code's spelling).

    Args:
        name: the name callers use (default: the method's name).
        timeout: the default timeout, in seconds, of calls to this function
            (unset: the caller's default, 30 s unless configured).
        pattern: the communication pattern it is meant for (informational).
        idempotent: safe to run twice; a call whose replica died is retried on another.
        writable: the handler gets private, writable copies of the arrays in
            its arguments, models included (else, from this node: read-only).

    >>> class Calc(BaseService):
    ...     @ServiceFunction(name="add", timeout=5.0)
    ...     def add_numbers(self, a: int, b: int) -> int:
    ...         return a + b
    """

    def __init__(
        self,
        name: str | None = None,
        timeout: float | None = None,
        pattern: Any = CommunicationPattern.REQUEST_RESPONSE,
        idempotent: bool = False,
        writable: bool = False,
    ) -> None:
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise InvalidServiceDefinition(
                f"ServiceFunction timeout must be a positive number of seconds, got {timeout!r}"
            )
        self.name = name
        self.timeout = None if timeout is None else float(timeout)
        self.pattern = pattern.value if isinstance(pattern, CommunicationPattern) else str(pattern)
        self.idempotent = idempotent
        self.writable = writable

    def __call__(self, fn: Callable) -> Callable:
        fn.__sage_function__ = self  # type: ignore[attr-defined]
        if self.name is None:
            self.name = fn.__name__
        return fn


def service_function(fn: Callable | None = None, **options: Any) -> Any:
    """Exposes a method under its own name; ``@service_function(timeout=5, idempotent=True)``
    takes the options of :class:`ServiceFunction`.

    >>> class Calc(BaseService):
    ...     @service_function
    ...     def double(self, x: int) -> int:
    ...         return 2 * x
    """
    if fn is not None and callable(fn) and not options:
        return ServiceFunction()(fn)
    return ServiceFunction(**options)


def subscribe(pattern: str) -> Callable[[Callable], Callable]:
    """Makes a service method receive events whose topic matches ``pattern``
    (NATS wildcards: ``*`` one token, a final ``>`` the rest). The replicas of a
    service share the events: each event reaches one of them.

    >>> class Monitor(BaseService):
    ...     @subscribe("sensor.*")
    ...     def on_reading(self, payload, message=None):
    ...         print(message.topic, payload)
    """
    validate_pattern(pattern)

    def mark(fn: Callable) -> Callable:
        fn.__sage_subscribe__ = [*getattr(fn, "__sage_subscribe__", []), pattern]  # type: ignore[attr-defined]
        return fn

    return mark


# ----------------------------------------------------------- handler specs


# ------------------------------------------------------------------ runtime


# ------------------------------------------------------------- BaseService
def _mark_once(fn: Callable) -> Callable:
    fn.__sage_once__ = True  # type: ignore[attr-defined]
    return fn


def _once_per_phase(fn: Callable, hook: str) -> Callable:
    """Wraps a service's ``initialize`` or ``cleanup`` so that it runs once
    per start/stop cycle. ``super()`` calls inside it still run (only the
    outermost call is counted)."""
    import functools

    want = "ready" if hook == "initialize" else "clean"

    @functools.wraps(fn)
    def once(self: Any, *args: Any, **kwargs: Any) -> Any:
        st = self.__dict__.setdefault("_sage_phase", {"phase": "new", "depth": 0})
        if st["depth"] == 0 and st["phase"] == want:
            return None
        st["depth"] += 1
        try:
            return fn(self, *args, **kwargs)
        finally:
            st["depth"] -= 1
            if st["depth"] == 0:
                st["phase"] = want

    once.__sage_once__ = True  # type: ignore[attr-defined]
    return once


class BaseService(ServiceCallMixin):
    """Base class of every service.

    Args:
        service_name: the name callers use. Defaults to the ``name`` given to
            :func:`sage_service`, else the class name.
        service_id: this instance's id (default: generated).

    Override ``initialize()`` and ``cleanup()`` for start and stop work. From
    inside a handler, ``self.call_function``, ``self.broadcast`` and
    ``self.subscribe`` reach the rest of the bus.

    >>> class MyService(BaseService):                                 # doctest: +SKIP
    ...     def __init__(self):
    ...         super().__init__("my_service")
    ...     @service_function
    ...     def echo(self, x):
    ...         return x
    >>> svc = MyService().start()          # serves from this process  # doctest: +SKIP
    >>> svc.stop()                                                    # doctest: +SKIP
    """

    __sage_name__: str | None = None
    __sage_options__: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        # Code written for the original API calls initialize() and cleanup()
        # itself, around start() and stop(), which call them too: each runs
        # once per start/stop however many times it is called.
        for hook in ("initialize", "cleanup"):
            fn = cls.__dict__.get(hook)
            if fn is not None and not getattr(fn, "__sage_once__", False):
                setattr(cls, hook, _once_per_phase(fn, hook))

    def __init__(self, service_name: str | None = None, service_id: str | None = None, **_ignored: Any) -> None:
        name = service_name or type(self).__sage_name__ or type(self).__name__
        if not isinstance(name, str) or not name or any(c in name for c in "/\\\0"):
            raise InvalidServiceDefinition(f"service name must be a non-empty string without '/', got {name!r}")
        self.service_name = name
        self.service_id = service_id or f"{name}-{uuid.uuid4().hex[:8]}"
        self._runtime: Runtime | None = None
        self._client: Any = None

    def _ensure_base(self) -> None:
        # A subclass __init__ that forgot super().__init__() still works.
        if "service_name" not in self.__dict__:
            BaseService.__init__(self)

    # lifecycle hooks
    @_mark_once
    def initialize(self) -> None:
        """Runs once before the service takes requests. Override it. (Called
        by ``start()``; an extra call from user code before or after is a no-op.)"""

    @_mark_once
    def cleanup(self) -> None:
        """Runs once after the service stopped taking requests. Override it.
        (Called by ``stop()``; an extra call from user code is a no-op.)"""

    @classmethod
    def deploy(
        cls, *args: Any, replicas: int | None = None, bus: str | None = None, replace: bool = False, **kwargs: Any
    ) -> ServiceHandle:
        """Starts ``replicas`` Ray actors of this service on ``bus`` (defaults:
        the ``@sage_service`` declaration), each built with ``cls(*args,
        **kwargs)`` inside its actor; waits until all are registered.

        ``replace=True`` stops the replicas a different version of the class
        holds under the same names first. Returns a :class:`ServiceHandle`.

        >>> handle = Calculator.deploy(bus="pipeline")     # doctest: +SKIP
        >>> handle.replicas
        2
        """
        return deploy_service(cls, *args, replicas=replicas, bus=bus, replace=replace, **kwargs)

    def start_replica(self, bus: str, index: int, actor_name: str, replace: bool, code_id: str) -> Runtime:
        """Serves this instance as replica ``index`` of a deployment (what the
        replica actor of ``deploy.py`` calls); returns its runtime."""
        self._ensure_base()
        self.service_id = f"{self.service_name}#{index}-{uuid.uuid4().hex[:6]}"
        self.start(bus, replace=replace, _replica_index=index, _actor_name=actor_name, _code_id=code_id)
        assert self._runtime is not None  # start() raises otherwise
        return self._runtime

    def start(
        self,
        bus: str | None = None,
        *,
        max_concurrency: int | None = None,
        replace: bool = False,
        _replica_index: int = 0,
        _actor_name: str | None = None,
        _code_id: str = "",
    ) -> BaseService:
        """Serves this instance from the current process and registers it on ``bus``.

        Raises NameConflict if another class holds the name (``replace=True``
        takes it over). Returns ``self``.
        """
        self._ensure_base()
        if self._runtime is not None:
            return self
        opts = type(self).__sage_options__
        bus = validate_bus_name(bus or opts.get("bus") or "default")
        rt = _runtime(
            self,
            bus,
            replica_index=_replica_index,
            actor_name=_actor_name,
            max_concurrency=max_concurrency or opts.get("max_concurrency") or DEFAULT_MAX_CONCURRENCY,
            policy=opts.get("policy", DEFAULT_POLICY),
            replace=replace,
            queue_bytes=opts.get("queue_bytes") or REQUEST_RING_BYTES,
            arena_bytes=opts.get("arena_bytes"),
            code_id=_code_id or code_id_of(type(self)),
        )
        # Set before start(): once registered, requests can arrive, and a handler
        # calling out must see this service's bus (not the default one).
        self._runtime = rt
        try:
            rt.start()
        except BaseException:
            self._runtime = None
            raise
        lifecycle.register(self, "services", BaseService.stop)

        Endpoint.for_bus(bus).ensure_version(rt.version)
        return self

    def stop(self) -> None:
        """Stops serving: deregisters, finishes running handlers, runs ``cleanup()``,
        and removes the request ring."""
        rt, self._runtime = self._runtime, None
        lifecycle.unregister(self, "services")
        if rt is not None:
            rt.stop()
        c, self._client = self._client, None
        if c is not None:
            c.close()  # its reply rings (one per thread that called out) go too

    @property
    def is_running(self) -> bool:
        return self._runtime is not None

    @property
    def bus_name(self) -> str | None:
        return self._runtime.bus if self._runtime else type(self).__sage_options__.get("bus")

    def get_stats(self) -> dict:
        """Calls, errors, expired and dropped replies, in-flight and queued
        requests, open streams, and calls cancelled before they started."""
        rt = self._runtime
        if rt is None:
            return {"running": False, "service": self.service_name}
        return {
            "running": True,
            "service": self.service_name,
            "instance_id": rt.instance_id,
            "in_flight": rt.in_flight,
            "queued": rt.queued(),
            "threads": rt.thread_count,
            "streams": len(rt.producers),
            "cancelled": rt.calls.skipped,
            "arena": rt.reply.arena.stats() if rt.reply.arena is not None else None,
            **rt.stats,
        }

    # talking to the rest of the bus
    @property
    def client(self) -> Any:
        """A :class:`~sage_ray_comm.FunctionClient` on this service's bus."""
        self._ensure_base()
        if self._client is None:
            self._client = FunctionClient(client_id=self.service_id, bus=self.bus_name or "default")
        return self._client

    def _sage_client(self) -> Any:
        return self.client  # call_service[...] uses the service's own client and bus

    @staticmethod
    def deadline() -> float | None:
        """Inside a handler: the deadline of the request it is serving, in
        epoch seconds (None if its caller set none). Calls the handler makes
        inherit it.

        >>> class Search(BaseService):
        ...     @service_function
        ...     def query(self, q: str) -> list:
        ...         if self.remaining() is not None and self.remaining() < 0.05:
        ...             return []  # not worth starting
        ...         return self.call_function("index", "lookup", q)
        """
        return context.deadline()

    @staticmethod
    def remaining() -> float | None:
        """Inside a handler: seconds left before its request's deadline (None: no deadline)."""
        return context.remaining()

    def buffer(self, shape: Any, dtype: Any = "float64", timeout: float | None = None) -> Any:
        """Inside a handler: a writable numpy array in this replica's shared memory, to fill and
        return, read in place by a caller on this node (see ``FunctionClient.buffer``; ``timeout``
        default: what is left of the request's deadline, else 30 s).

        >>> @service_function
        ... def frame(self, h: int, w: int):  # of a BaseService
        ...     return self.buffer((h, w, 3), "uint8")  # fill it, then return it
        """
        if self._runtime is None:
            raise ServiceUnavailable(f"service '{self.service_name}' is not running: no arena to make a buffer in")
        return self._runtime.reply.buffer(shape, dtype, timeout, DEFAULT_TIMEOUT, f"service '{self.service_name}'")

    @staticmethod
    def cancelled() -> bool:
        """Inside a sync handler: whether its caller cancelled the call while
        it ran (``future.cancel()``). Poll it in long work and stop early.

        >>> class Batch(BaseService):
        ...     @service_function
        ...     def crunch(self, n: int) -> int:
        ...         done = 0
        ...         while done < n and not self.cancelled():
        ...             done += 1
        ...         return done
        """
        return context.cancelled()

    def call_function(
        self, target_service: str, function: str, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Calls another service's function and returns its result (the original code's API)."""
        return self.client.call(target_service, function, *args, timeout=timeout, **kwargs)

    def broadcast(self, topic: str, payload: Any) -> int:
        """Publishes ``payload`` on ``topic``; returns how many subscribers it reached."""
        return self.client.broadcast(topic, payload)

    def subscribe(self, pattern: str, callback: Callable | None = None, *, group: str | None = "") -> str:
        """Receives events matching ``pattern`` while the service runs.

        ``callback(payload, message=None)`` defaults to ``self.handle_event``,
        else ``self.handle_message`` (the original API); a service with
        neither still subscribes, and its events are counted
        (``get_stats()["events_unhandled"]``) and logged at debug level.
        By default the replicas of the service share the events (one gets
        each); ``group=None`` makes this replica get every one.
        """
        if self._runtime is None:
            raise ServiceUnavailable(f"service '{self.service_name}' must be started before it subscribes")
        cb = callback or getattr(self, "handle_event", None)
        if cb is None and callable(getattr(self, "handle_message", None)):
            cb = self._to_handle_message
        if cb is None:
            cb = self._unhandled_event
        elif not callable(cb):
            raise InvalidSubscription(
                f"service '{self.service_name}': subscribe({pattern!r}) callback is not callable: {cb!r}"
            )
        return self._runtime.add_subscription(pattern, cb, group)

    def _to_handle_message(self, payload: Any, message: Any = None) -> Any:
        # The original API: handle_message(message) gets the whole Message.
        return self.handle_message(message)  # type: ignore[attr-defined]

    def _unhandled_event(self, payload: Any, message: Any = None) -> None:
        rt = self._runtime
        if rt is not None:
            rt.stats["events_unhandled"] = rt.stats.get("events_unhandled", 0) + 1
        log.debug("service %s has no handler for event %s", self.service_name, getattr(message, "topic", None))


# ------------------------------------------------------------ as Ray actors


def sage_service(
    name: str | None = None,
    *,
    replicas: int = 1,
    bus: str | None = None,
    policy: str = DEFAULT_POLICY,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    queue_bytes: int = REQUEST_RING_BYTES,
    arena_bytes: int | None = None,
    **ray_actor_options: Any,
) -> Callable[[type], type]:
    """Declares a service class. Ray actor options (``num_cpus``,
    ``max_restarts``, ``resources``...) pass through to every replica.

    Args:
        name: the service name (default: the class name).
        replicas: how many actors :meth:`deploy` starts.
        bus: the bus it registers on (default ``"default"``).
        policy: ``"least_outstanding"`` (power of two choices on in-flight
            calls) or ``"round_robin"``: how callers spread calls over replicas.
        max_concurrency: handler threads per replica.
        queue_bytes: bytes of each replica's request ring (default 8 MiB). When
            it is full, callers block up to their timeout (backpressure), then
            get CallTimeout; nothing is dropped.
        arena_bytes: the most shared memory for the large buffers of each
            replica's replies (default: 1/4 of /dev/shm's free space, <= 1 GiB).

    >>> @sage_service(name="calculator", replicas=2, num_cpus=0.1)
    ... class Calculator(BaseService):
    ...     @service_function
    ...     def calculate(self, data: int) -> dict:
    ...         return {"result": data * 2}
    """
    if policy not in POLICIES:
        raise InvalidServiceDefinition(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
    check_budget(arena_bytes, InvalidServiceDefinition, f"service '{name or '(unnamed)'}'")

    def wrap(given: type) -> type:
        cls: type[BaseService]
        if isinstance(given, type) and issubclass(given, BaseService):
            cls = given
        else:  # plain classes get BaseService mixed in, as the original API allowed
            cls = type(
                given.__name__,
                (given, BaseService),
                {"__module__": given.__module__, "__qualname__": given.__qualname__},
            )
        cls.__sage_name__ = name or cls.__name__
        cls.__sage_options__ = {
            "name": name or cls.__name__,
            "replicas": replicas,
            "bus": bus,
            "policy": policy,
            "max_concurrency": max_concurrency,
            "queue_bytes": queue_bytes,
            "arena_bytes": arena_bytes,
            **ray_actor_options,
        }
        return cls

    return wrap


def _runtime(
    svc: BaseService,
    bus: str,
    *,
    actor_name: str | None = None,
    queue_bytes: int = REQUEST_RING_BYTES,
    arena_bytes: int | None = None,
    **options: Any,
) -> Runtime:
    """The runtime of ``svc`` on ``bus`` in this process, with the real
    router, a request ring in shared memory and the node's janitor.
    ``options`` are :class:`Runtime`'s keyword arguments."""
    import ray

    ensure_ray()
    tune_malloc()
    namespace = bus_namespace(bus)
    shm.gc(namespace)  # rings left by replicas and callers that were killed
    queue = open_request_ring(svc.service_name, svc.service_id, namespace, queue_bytes, bool(actor_name))
    node_id = ray.get_runtime_context().get_node_id()
    ensure_janitor(node_id)  # every node with a replica has its segment janitor
    rt = Runtime(
        svc,
        bus,
        router_client(bus),
        queue,
        node_id=node_id,
        reconnect=lambda: router_client(bus, create=False),
        actor_name=actor_name,
        **options,
    )
    rt.reply.arena_budget = arena_bytes
    return rt
