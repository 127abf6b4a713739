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

import asyncio
import concurrent.futures
import inspect
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import pydantic

from . import lifecycle, shm
from ._wire import (
    ERR_DESERIALIZATION,
    ERR_FUNCTION,
    ERR_PROTOCOL,
    ERR_REMOTE,
    ERR_SERIALIZATION,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    ERR_VALIDATION,
    OP_CALL,
    OP_EVENT,
    PROTOCOL_VERSION,
    ST_ERROR,
    ST_OK,
    ST_OK_BLOB,
    BadRequest,
    ErrorInfo,
    Reply,
    Request,
    actor_name,
    decode_header,
    decode_request,
    encode_error,
    reply_ring_pid,
)
from .client import ServiceCallMixin
from .errors import (
    InvalidServiceDefinition,
    InvalidSubscription,
    MessageTooLarge,
    NameConflict,
    QueueClosed,
    QueueFull,
    QueueNotFound,
    SageCommError,
    SerializationError,
    ServiceUnavailable,
    SharedMemoryFull,
)
from .message import CommunicationPattern, envelope
from .metrics import recorder
from .queue import SageQueue
from .router import (
    HEARTBEAT_INTERVAL,
    ROUTER_NAMESPACE,
    FunctionInfo,
    InstanceInfo,
    Subscription,
    bus_namespace,
    class_id_of,
    code_id_of,
    get_router,
    validate_bus_name,
    validate_pattern,
)
from .transport import (
    DIRECT_PREFIX,
    REQUEST_RING_BYTES,
    REQUEST_SPIN_US,
    RingPool,
    SegmentBlob,
    ensure_janitor,
    shm_warn_once,
    take_request,
    tune_malloc,
)

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
DEFAULT_MAX_CONCURRENCY = 16
# A reply that cannot be put in this long (the caller stopped reading) is dropped and counted.
REPLY_PUT_TIMEOUT = 2.0


# ------------------------------------------------------------- decorators
class ServiceFunction:
    """Marks a method as callable by other processes (the seed's spelling).

    Args:
        name: the name callers use (default: the method's name).
        timeout: the default timeout, in seconds, of calls to this function
            (unset: the caller's default, 30 s unless configured).
        pattern: the communication pattern it is meant for (informational).
        idempotent: safe to run twice; a call whose replica died is retried on another.

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
    ) -> None:
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise InvalidServiceDefinition(
                f"ServiceFunction timeout must be a positive number of seconds, got {timeout!r}"
            )
        self.name = name
        self.timeout = None if timeout is None else float(timeout)
        self.pattern = pattern.value if isinstance(pattern, CommunicationPattern) else str(pattern)
        self.idempotent = idempotent

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
class _Handler:
    """One callable function of a running service, ready to invoke."""

    __slots__ = ("fn", "info", "is_async", "name", "params", "service", "takes_payload", "validated", "wants_message")

    def __init__(self, service: str, name: str, bound: Callable, meta: ServiceFunction | None) -> None:
        self.service = service
        self.name = name
        self.fn = bound
        resolvable = True
        try:  # resolve string annotations (``from __future__ import annotations``)
            sig = inspect.signature(bound, eval_str=True)
        except Exception:
            # A class from the caller's __main__ named only in a string
            # annotation: the replica cannot resolve it, so it cannot check it.
            sig = inspect.signature(bound)
            resolvable = False
        self.params = [
            p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        self.is_async = inspect.iscoroutinefunction(bound)
        self.wants_message = "message" in sig.parameters
        # The original API's `call_function(..., payload=data)`: when the handler
        # has no parameter of that name, `payload` is its one argument.
        self.takes_payload = "payload" in sig.parameters or any(
            p.kind is p.VAR_KEYWORD for p in sig.parameters.values()
        )
        annotated = any(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values())
        # Validate only annotated handlers: pydantic costs a few microseconds a call.
        self.validated = bound
        if annotated and resolvable:
            try:
                self.validated = pydantic.validate_call(bound, config=pydantic.ConfigDict(arbitrary_types_allowed=True))
            except Exception as e:  # an annotation pydantic cannot build a schema for
                log.warning("%s.%s: arguments are not validated (%s: %s)", service, name, type(e).__name__, e)
        elif annotated:
            log.warning(
                "%s.%s: arguments are not validated: its annotations name classes this "
                "process cannot resolve (defined in the deploying script?)",
                service,
                name,
            )
        self.info = FunctionInfo(
            name=name,
            timeout=meta.timeout if meta else None,
            idempotent=meta.idempotent if meta else False,
            is_async=self.is_async,
            signature=f"{name}{sig}",
            pattern=meta.pattern if meta else "request_response",
        )


def _collect(svc: BaseService) -> tuple:
    functions: dict[str, _Handler] = {}
    events: dict[str, list[str]] = {}
    seen = set()
    for klass in type(svc).__mro__:
        for attr, raw in vars(klass).items():
            if attr in seen:
                continue
            seen.add(attr)
            meta = getattr(raw, "__sage_function__", None)
            pats = getattr(raw, "__sage_subscribe__", None)
            if meta is None and not pats:
                continue
            bound = getattr(svc, attr)
            if meta is not None:
                name = meta.name or attr
                if name in functions:
                    raise NameConflict(
                        f"service '{svc.service_name}' exposes two functions named '{name}' "
                        f"({functions[name].fn.__name__} and {attr})"
                    )
                functions[name] = _Handler(svc.service_name, name, bound, meta)
            if pats:
                functions.setdefault(f"@event:{attr}", _Handler(svc.service_name, attr, bound, None))
                events[f"@event:{attr}"] = list(pats)
    return functions, events


def _validation_message(service: str, fn: str, e: pydantic.ValidationError, params: list[str]) -> tuple:
    errs = []
    for d in e.errors(include_url=False):
        # pydantic names positional arguments by index: name them as the handler does
        parts = [
            params[x] if isinstance(x, int) and i == 0 and x < len(params) else str(x)
            for i, x in enumerate(d.get("loc", ()))
        ]
        loc = ".".join(parts) or "(arguments)"
        errs.append({"loc": list(d.get("loc", ())), "msg": d.get("msg", ""), "type": d.get("type", "")})
        errs[-1]["field"] = loc
    detail = "; ".join(f"{x['field']}: {x['msg']}" for x in errs)
    return f"invalid arguments for {service}.{fn}: {detail}", errs


# ------------------------------------------------------------------ runtime
class _Runtime:
    """Serves one service instance from this process: request ring,
    dispatcher threads, async loop, registration and heartbeats."""

    def __init__(
        self,
        svc: BaseService,
        bus: str,
        *,
        replica_index: int = 0,
        actor_name: str | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        policy: str = "least_outstanding",
        replace: bool = False,
        queue_bytes: int = REQUEST_RING_BYTES,
        code_id: str = "",
    ) -> None:
        import ray

        _ensure_ray()
        tune_malloc()
        self.svc = svc
        self.bus = bus
        self.namespace = bus_namespace(bus)
        self.instance_id = svc.service_id
        self.max_concurrency = max(1, int(max_concurrency))
        self.functions, self.events = _collect(svc)
        self.router = get_router(bus)
        shm.gc(self.namespace)  # rings left by replicas and callers that were killed
        self.queue: SageQueue | None = None
        try:
            self.queue = SageQueue(
                f"req.{svc.service_name}.{self.instance_id}",
                queue_bytes,
                auto_cleanup=True,
                namespace=self.namespace,
                spin_us=REQUEST_SPIN_US,
            )
        except SharedMemoryFull as e:
            if not actor_name:  # an in-process service has no other way in
                raise SharedMemoryFull(
                    f"service '{svc.service_name}' cannot serve from this process: {e}. Deploy it as Ray "
                    "actors (Cls.deploy()), which serve over Ray when shared memory is short, or give "
                    "/dev/shm more room (docker run --shm-size=1g)"
                ) from None
            # A deployed replica serves every call over Ray (direct actor calls) instead.
            shm_warn_once(f"service '{svc.service_name}' replica {self.instance_id}: {e}; it serves over Ray")
        # Direct calls (over Ray, to this replica's actor) wait here for their reply.
        self._direct: dict[str, concurrent.futures.Future] = {}
        self._direct_ids = itertools.count(1)
        self.replies = RingPool(self.namespace)
        self._callers: dict[str, tuple] = {}  # reply ring -> (checked at, caller alive)
        self._frames_dropped_seen = 0
        # Oversize replies not yet known to be read: (blob, reply ring), swept by the heartbeat.
        self.blobs: list[tuple] = []
        self.stats = {"calls": 0, "errors": 0, "expired": 0, "replies_dropped": 0, "events": 0, "sends": 0}
        self.in_flight = 0
        self._lock = threading.Lock()
        self._leader = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._hb_thread: threading.Thread | None = None
        pid = os.getpid()
        self.info = InstanceInfo(
            service=svc.service_name,
            instance_id=self.instance_id,
            class_id=class_id_of(type(svc)),
            node_id=ray.get_runtime_context().get_node_id(),
            host_id=shm.host_id(),
            pid=pid,
            pid_start=shm.process_start_time(pid),
            request_queue=self.queue.name if self.queue is not None else "",
            functions={n: h.info for n, h in self.functions.items() if not n.startswith("@event:")},
            actor_name=actor_name,
            replica_index=replica_index,
            max_concurrency=self.max_concurrency,
            policy=policy,
            started_at=time.time(),
            code_id=code_id,
        )
        self._replace = replace
        ensure_janitor(self.info.node_id)  # every node with a replica has its segment janitor

    # -- lifecycle
    def start(self) -> None:
        try:
            self.svc.initialize()
            if self.queue is not None:
                self._spawn()
            import ray

            self.version = ray.get(self.router.register.remote(self.info, self._replace))
            for key, pats in self.events.items():
                for p in pats:
                    self.version = ray.get(self.router.subscribe.remote(self._subscription(key, p)))
        except BaseException as e:
            self._shutdown(deregister=False)
            cause = getattr(e, "cause", None)
            if isinstance(cause, SageCommError):  # a RayTaskError around our own error
                raise cause from None
            raise
        self._hb_thread = threading.Thread(target=self._heartbeat, name=f"sage-hb-{self.instance_id}", daemon=True)
        self._hb_thread.start()

    def _subscription(self, key: str, pattern: str, group: str | None = "") -> Subscription:
        return Subscription(
            sub_id=f"{self.instance_id}/{key}/{pattern}",
            pattern=pattern,
            queue=self.queue.name if self.queue is not None else "",
            node_id=self.info.node_id,
            host_id=self.info.host_id,
            pid=self.info.pid,
            pid_start=self.info.pid_start,
            group=self.info.service if group == "" else group,
            function=key,
        )

    def add_subscription(self, pattern: str, callback: Callable, group: str | None) -> str:
        import ray

        validate_pattern(pattern)
        key = f"@cb:{uuid.uuid4().hex[:8]}"
        self.functions[key] = _Handler(self.info.service, getattr(callback, "__name__", key), callback, None)
        sub = self._subscription(key, pattern, group)
        self.version = ray.get(self.router.subscribe.remote(sub))
        return sub.sub_id

    def _heartbeat(self) -> None:
        import ray

        while not self._stopping.wait(HEARTBEAT_INTERVAL):
            if not lifecycle.ray_alive():
                # ray.shutdown() under a running service: it cannot be reached
                # any more, so it stops (cleanup() runs) and drops its Ray handles.
                threading.Thread(target=self.svc.stop, name=f"sage-stop-{self.instance_id}", daemon=True).start()
                return
            try:
                self._sweep_blobs()
                load = {"in_flight": self.in_flight, "queued": self.queued(), **self.stats}
                self._record_gauges()
                known = ray.get(self.router.heartbeat.remote(self.instance_id, load), timeout=10)
                if not known and not self._stopping.is_set():
                    # The router restarted and forgot us: register again.
                    self.router = get_router(self.bus, create=False)
                    ray.get(self.router.register.remote(self.info, False), timeout=10)
                    for key, pats in self.events.items():
                        for p in pats:
                            ray.get(self.router.subscribe.remote(self._subscription(key, p)), timeout=10)
            except Exception as e:  # router restarting or Ray shutting down: try again next beat
                if self._stopping.is_set():
                    return
                log.debug("heartbeat of %s failed: %s", self.instance_id, e)
                try:
                    # Ray restarts a crashed router; one ended by bus.shutdown()
                    # must stay ended, so a heartbeat never creates one.
                    self.router = get_router(self.bus, create=False)
                except Exception:
                    pass

    def _record_gauges(self) -> None:
        """Replica gauges for the dashboard, every heartbeat (off the call path)."""
        tags = (self.bus, self.info.service, (self.info.actor_name or self.instance_id).split(":")[-1])
        recorder.gauge("sage_replica_in_flight", tags, self.in_flight)
        if self.queue is None:
            return
        st = self.queue.stats()
        recorder.gauge("sage_ring_fill_ratio", tags, (st["tail"] - st["head"]) / max(1, st["capacity"]))
        dropped = st["frames_dropped"]
        recorder.count("sage_frames_dropped_total", (self.bus, "ring"), dropped - self._frames_dropped_seen)
        self._frames_dropped_seen = dropped

    def _sweep_blobs(self) -> None:
        """Removes oversize replies whose caller read them, or died without reading."""
        if not self.blobs:
            return
        keep = []
        for blob, reply_to in self.blobs:
            if not os.path.exists(shm.SHM_DIR + shm.segment_name(self.namespace, blob.name)):
                continue  # read (the reader unlinks it)
            try:
                caller_pid = int(reply_to.split(".")[1])
            except (AttributeError, IndexError, ValueError):
                caller_pid = 0
            if caller_pid and not shm.process_alive(caller_pid, 0):
                blob.discard()
                self.stats["replies_dropped"] += 1
                continue
            keep.append((blob, reply_to))
        self.blobs = keep

    def stop(self) -> None:
        self._shutdown(deregister=True)

    def _shutdown(self, deregister: bool) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if deregister and lifecycle.ray_alive():  # after ray.shutdown() there is no router to tell
            try:
                import ray

                ray.get(self.router.deregister.remote(self.instance_id), timeout=10)
            except Exception as e:  # the router is gone: nothing to deregister from
                log.debug("deregistering %s failed: %s", self.instance_id, e)
        if self.queue is not None:
            self.queue.close()  # wakes every dispatcher; callers now get ServiceUnavailable
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(timeout=10)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=5)
        if self._hb_thread is not None and self._hb_thread is not threading.current_thread():
            self._hb_thread.join(timeout=5)
        try:
            self.svc.cleanup()
        finally:
            for blob, _ in self.blobs:
                blob.discard()
            self.blobs.clear()
            self.replies.close()
            if self.queue is not None:
                self.queue.destroy()
            for fut in list(self._direct.values()):
                if not fut.done():
                    fut.set_exception(
                        ServiceUnavailable(f"replica {self.instance_id} of '{self.info.service}' stopped")
                    )

    # -- dispatch
    def queued(self) -> int:
        """Requests waiting in the ring (0 without one)."""
        return self.queue.qsize() if self.queue is not None else 0

    def handle_direct(self, payload: bytes, kind: int) -> tuple | None:
        """Serves one request frame that came as a Ray actor call (this
        replica has no ring, or its caller has none): the same header, checks
        and handlers as the ring path. Returns the reply (None for events and
        sends)."""
        try:
            req = decode_request(payload, kind)
        except BadRequest as e:
            if e.reply_to is None and e.code != ERR_PROTOCOL:
                return None
            extra = (e.header.version, PROTOCOL_VERSION) if e.code == ERR_PROTOCOL else None
            return Reply(e.cid, ST_ERROR, encode_error(e.code, e.error, str(e.error), extra))
        if self._stopping.is_set():
            return (
                req.cid,
                ST_ERROR,
                tuple(
                    ErrorInfo(
                        ERR_UNAVAILABLE,
                        "",
                        f"replica {self.instance_id} of '{self.info.service}' is stopping",
                        "",
                        None,
                        None,
                    )
                ),
            )
        if req.op != OP_CALL:
            self._handle(req)
            return None
        key = f"{DIRECT_PREFIX}{next(self._direct_ids)}"
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._direct[key] = fut
        try:
            self._handle(req._replace(reply_to=key))
            left = None if req.deadline is None else max(0.0, req.deadline - time.time()) + 1.0
            return fut.result(timeout=left)  # async handlers reply from their loop
        except concurrent.futures.TimeoutError:
            return (
                req.cid,
                ST_ERROR,
                tuple(
                    ErrorInfo(
                        ERR_TIMEOUT,
                        "",
                        f"call to {req.service}.{req.function} got no reply before its deadline",
                        "",
                        None,
                        None,
                    )
                ),
            )
        finally:
            self._direct.pop(key, None)

    def _spawn(self) -> None:
        # Caller holds self._lock, or is start().
        t = threading.Thread(
            target=self._dispatch, name=f"sage-dispatch-{self.instance_id}-{len(self._threads)}", daemon=True
        )
        self._threads.append(t)
        self._idle += 1
        t.start()

    def _dispatch(self) -> None:
        while True:
            with self._leader:  # one thread waits on the ring at a time
                if self._stopping.is_set():
                    return
                try:
                    req = take_request(self.queue)
                except QueueClosed:
                    return
                except SageCommError as e:  # a corrupted frame: consumed, keep serving
                    log.warning("service %s dropped a frame: %s", self.info.service, e)
                    self.stats["errors"] += 1
                    continue
                if not isinstance(req, Request):  # not a request, or one that cannot be run
                    self.stats["errors"] += 1
                    if req is not None:
                        self._bad_request(req)
                    continue
                with self._lock:
                    self._idle -= 1
                    if self._idle == 0 and len(self._threads) < self.max_concurrency:
                        self._spawn()  # every thread is busy: one more waits on the ring
            try:
                self._handle(req)
            except Exception:  # never lose the dispatcher thread
                log.exception("service %s failed handling a request", self.info.service)
            with self._lock:
                self._idle += 1

    def _bad_request(self, e: BadRequest) -> None:
        if e.reply_to is None:
            log.warning("service %s dropped an event or send it could not decode: %s", self.info.service, e)
            return
        req = Request(OP_CALL, e.cid, e.function, (), None, e.reply_to, None, None, None, self.info.service)
        if e.code == ERR_PROTOCOL:
            self._reply_error(req, ERR_PROTOCOL, str(e.error), (e.header.version, PROTOCOL_VERSION))
            return
        self._reply_error(
            req,
            ERR_DESERIALIZATION,
            f"the arguments of the call to {self.info.service}.{e.function} could not be unpickled by "
            f"replica {self.instance_id}: {e}",
        )

    def _handle(self, req: Request) -> None:
        op = req.op
        if req.deadline is not None and time.time() > req.deadline:
            self.stats["expired"] += 1
            if op == OP_CALL:
                self._reply_error(
                    req,
                    ERR_TIMEOUT,
                    f"deadline of the call to {req.service}.{req.function} passed "
                    "before a replica could start it; not run",
                )
            return
        h = self.functions.get(req.function)
        if h is None:
            if op == OP_CALL:
                known = sorted(n for n in self.functions if not n.startswith("@"))
                self._reply_error(
                    req,
                    ERR_FUNCTION,
                    f"service '{req.service}' has no function '{req.function}'; it has: {', '.join(known) or '(none)'}",
                )
            self.stats["errors"] += 1
            return
        args, kwargs = req.args, req.kwargs
        if isinstance(args, SegmentBlob):
            args, kwargs = args.get()
        if not args and kwargs and "payload" in kwargs and not h.takes_payload:
            kwargs = dict(kwargs)
            args = (kwargs.pop("payload"),)
        if h.wants_message:
            kwargs = dict(kwargs or {})
            kwargs["message"] = envelope(req)
        self.stats["calls" if op == OP_CALL else ("events" if op == OP_EVENT else "sends")] += 1
        self.in_flight += 1
        try:
            result = h.validated(*args, **(kwargs or {}))
        except pydantic.ValidationError as e:
            self.in_flight -= 1
            msg, errs = _validation_message(req.service, h.name, e, h.params)
            self.stats["errors"] += 1
            if op == OP_CALL:
                self._reply_error(req, ERR_VALIDATION, msg, errs)
            else:
                log.warning("%s", msg)
            return
        except Exception as e:
            self.in_flight -= 1
            self._failed(req, e)
            return
        if h.is_async:
            fut = asyncio.run_coroutine_threadsafe(result, self._async_loop())
            fut.add_done_callback(lambda f, req=req: self._async_done(req, f))
            return
        self.in_flight -= 1
        if op == OP_CALL:
            self._reply(req, result)

    def _async_done(self, req: Request, fut: Any) -> None:
        self.in_flight -= 1
        try:
            result = fut.result()
        except BaseException as e:
            self._failed(req, e)
            return
        if req.op == OP_CALL:
            self._reply(req, result)

    def _failed(self, req: Request, e: BaseException) -> None:
        self.stats["errors"] += 1
        if req.op == OP_CALL:
            self._put_reply(req, (req.cid, ST_ERROR, encode_error(ERR_REMOTE, e)))
        else:
            log.warning("%s.%s raised (no caller waits): %r", req.service, req.function, e)

    def _async_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            with self._lock:
                if self._loop is None:
                    loop = asyncio.new_event_loop()
                    self._loop_thread = threading.Thread(
                        target=loop.run_forever, name=f"sage-async-{self.instance_id}", daemon=True
                    )
                    self._loop_thread.start()
                    self._loop = loop
        return self._loop

    def _reply_error(self, req: Request, code: str, message: str, extra: Any = None) -> None:
        self._put_reply(req, (req.cid, ST_ERROR, tuple(ErrorInfo(code, "", message, "", None, extra))))

    def _reply(self, req: Request, result: Any) -> None:
        try:
            self._put_reply(req, (req.cid, ST_OK, result), raise_too_large=True)
        except MessageTooLarge:
            blob = SegmentBlob.put(result, self.namespace)
            self.blobs.append((blob, req.reply_to))
            self._put_reply(req, (req.cid, ST_OK_BLOB, blob))
        except SerializationError as e:
            self.stats["errors"] += 1
            self._reply_error(
                req, ERR_SERIALIZATION, f"the result of {req.service}.{req.function} cannot be sent back: {e}"
            )

    def _caller_alive(self, reply_to: str) -> bool:
        """Whether the process that owns a reply ring lives (checked at most every 100 ms per ring)."""
        now = time.monotonic()
        hit = self._callers.get(reply_to)
        if hit is not None and now - hit[0] < 0.1:
            return hit[1]
        pid = reply_ring_pid(reply_to)
        if pid is None:
            return True
        alive = shm.process_alive(pid, 0)
        if len(self._callers) > 4096:
            self._callers.clear()
        self._callers[reply_to] = (now, alive)
        return alive

    def _put_reply(self, req: Request, rep: tuple, raise_too_large: bool = False) -> None:
        if req.reply_to is None:
            return
        if (
            req.reply_to[0] == DIRECT_PREFIX[0]
        ):  # "@direct:<n>": a direct call waits in handle_direct (Ray carries any size)
            fut = self._direct.get(req.reply_to)
            if fut is not None and not fut.done():
                fut.set_result(rep)
            return
        if not self._caller_alive(req.reply_to):
            # The caller died mid-call: drop the reply, count it, and remove its
            # ring (its creator is dead, so nobody else will).
            self.stats["replies_dropped"] += 1
            self.replies.drop(req.reply_to)
            shm.unlink(shm.segment_name(self.namespace, req.reply_to))
            if rep[1] == ST_OK_BLOB:
                rep[2].discard()
            return
        try:
            q = self.replies.get(req.reply_to)
            q.put(rep, timeout=REPLY_PUT_TIMEOUT)
        except MessageTooLarge:
            if raise_too_large:
                raise
            self.stats["replies_dropped"] += 1
        except SerializationError:
            if raise_too_large:
                raise
            self.stats["replies_dropped"] += 1
        except (QueueNotFound, QueueClosed, QueueFull):
            # The caller is gone or stopped reading: drop and count, and forget its ring.
            self.stats["replies_dropped"] += 1
            self.replies.drop(req.reply_to)


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        # An embedded local Ray, as a notebook or script would want.
        ray.init(ignore_reinit_error=True, log_to_driver=False, configure_logging=False)


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
        self._runtime: _Runtime | None = None
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
        rt = _Runtime(
            self,
            bus,
            replica_index=_replica_index,
            actor_name=_actor_name,
            max_concurrency=max_concurrency or opts.get("max_concurrency") or DEFAULT_MAX_CONCURRENCY,
            policy=opts.get("policy", "least_outstanding"),
            replace=replace,
            queue_bytes=opts.get("queue_bytes") or REQUEST_RING_BYTES,
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
        from .client import _Endpoint

        _Endpoint.for_bus(bus).ensure_version(rt.version)
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
        """Calls, errors, expired and dropped replies, in-flight and queued requests."""
        rt = self._runtime
        if rt is None:
            return {"running": False, "service": self.service_name}
        return {
            "running": True,
            "service": self.service_name,
            "instance_id": rt.instance_id,
            "in_flight": rt.in_flight,
            "queued": rt.queued(),
            "threads": len(rt._threads),
            **rt.stats,
        }

    # talking to the rest of the bus
    @property
    def client(self) -> Any:
        """A :class:`~sage_ray_comm.FunctionClient` on this service's bus."""
        self._ensure_base()
        if self._client is None:
            from .client import FunctionClient

            self._client = FunctionClient(client_id=self.service_id, bus=self.bus_name or "default")
        return self._client

    def _sage_client(self) -> Any:
        return self.client  # call_service[...] uses the service's own client and bus

    def call_function(
        self, target_service: str, function: str, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Calls another service's function and returns its result (the seed's API)."""
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
class _ServiceActor:
    """The Ray actor that hosts one replica. The user's class is built here,
    inside the actor, so its instances (locks, files, loggers) are never pickled."""

    def __init__(
        self,
        cls: type,
        args: tuple,
        kwargs: dict,
        bus: str,
        index: int,
        actor_name: str,
        replace: bool,
        code_id: str = "",
    ) -> None:
        import ray

        self._args = (cls, args, kwargs, bus, index, actor_name, replace, code_id)
        self.svc: BaseService | None = None
        self._stopped = threading.Event()
        self._start_lock = threading.Lock()  # concurrent deployers call start() at once
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Ray restarted this replica (max_restarts): serve and register again.
            self.start()

    def start(self) -> InstanceInfo:
        cls, args, kwargs, bus, index, actor_name, replace, code_id = self._args
        with self._start_lock:
            if self.svc is None:
                svc = cls(*args, **kwargs)
                svc._ensure_base()
                svc.service_id = f"{svc.service_name}#{index}-{uuid.uuid4().hex[:6]}"
                svc.start(bus, replace=replace, _replica_index=index, _actor_name=actor_name, _code_id=code_id)
                self.svc = svc
        return self.svc._runtime.info  # type: ignore[union-attr]

    def watch(self) -> bool:
        """Returns when the replica stops; the router keeps one call pending, and
        Ray fails it the moment this actor dies."""
        self._stopped.wait()
        return True

    def stop(self) -> bool:
        self._stopped.set()
        if self.svc is not None:
            self.svc.stop()
        # This process exists for the replica: release every ring its handlers
        # made while calling out (call_service, other clients) before Ray kills it.
        from .client import _Endpoint

        _Endpoint.close_all()
        return True

    def stats(self) -> dict:
        return self.svc.get_stats() if self.svc is not None else {"running": False}

    def handle(self, payload: bytes, kind: int) -> tuple | None:
        """A request frame sent over Ray straight to this replica (see _Runtime.handle_direct)."""
        rt = self.svc._runtime if self.svc is not None else None
        if rt is None:
            info = ErrorInfo(ERR_UNAVAILABLE, "", "replica is not running", "", None, None)
            return (decode_header(payload, kind)[0].cid, ST_ERROR, tuple(info))
        return rt.handle_direct(payload, kind)

    def pid(self) -> int:
        return os.getpid()


class ServiceHandle:
    """What :meth:`deploy` returns: the replicas of a deployed service.

    >>> handle = Calculator.deploy()       # doctest: +SKIP
    >>> handle.replicas, handle.instances[0].node_id   # doctest: +SKIP
    >>> handle.shutdown()                  # doctest: +SKIP
    """

    def __init__(self, name: str, bus: str, actors: list, infos: list[InstanceInfo], detached: bool = False) -> None:
        self.name = name
        self.bus = bus
        self.actors = actors
        self.instances = infos
        # lifetime="detached": the replicas outlive this process (and its job).
        self.detached = detached

    @property
    def replicas(self) -> int:
        return len(self.actors)

    def stats(self) -> list[dict]:
        import ray

        return ray.get([a.stats.remote() for a in self.actors], timeout=30)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops every replica (deregister, drain, cleanup, remove rings) and kills the actors."""
        _stop_actors(self.actors, self.instances, self.bus, timeout)
        self.actors = []
        lifecycle.unregister(self, "deployments")
        if _DEPLOYED.get((self.bus, self.name)) is self:
            del _DEPLOYED[(self.bus, self.name)]

    def _close_at_exit(self) -> None:
        # Replicas owned by this process die with it (Ray kills an owner's
        # actors); stopping them first runs cleanup() and removes their rings.
        # Detached ones live on, unless the whole Ray instance ends with us.
        if not self.detached or lifecycle.owns_ray():
            self.shutdown(timeout=10.0)

    def __repr__(self) -> str:
        return f"ServiceHandle({self.name!r}, bus={self.bus!r}, replicas={self.replicas})"


# Deployed services stay up while this process lives, whether or not the
# caller keeps the handle (Ray would otherwise collect actors nobody refers to).
_DEPLOYED: dict[tuple, ServiceHandle] = {}


def deployed(bus: str | None = None) -> list[ServiceHandle]:
    """Handles of the services this process deployed (on ``bus``, or on all buses)."""
    return [h for (b, _), h in list(_DEPLOYED.items()) if bus is None or b == bus]


def _stop_actors(actors: list, infos: list[InstanceInfo | None], bus: str, timeout: float) -> None:
    import ray

    refs = [a.stop.remote() for a in actors]
    try:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
    except Exception:
        pass
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            pass
    # Whatever did not stop cleanly (killed, hung): deregister and remove its ring here.
    router = None
    for info in infos:
        if info is None:
            continue
        if shm.unlink(shm.segment_name(bus_namespace(bus), info.request_queue)):
            try:
                router = router or get_router(bus, create=False)
                ray.get(router.deregister.remote(info.instance_id), timeout=10)
            except Exception:
                pass


def _deploy(
    cls: type, *args: Any, replicas: int | None = None, bus: str | None = None, replace: bool = False, **kwargs: Any
) -> ServiceHandle:
    import ray

    _ensure_ray()
    opts = dict(cls.__sage_options__)
    name = opts.pop("name", None) or cls.__name__
    n = int(replicas if replicas is not None else opts.pop("replicas", 1))
    opts.pop("replicas", None)
    bus = validate_bus_name(bus or opts.pop("bus", None) or "default")
    opts.pop("bus", None)
    for k in ("policy", "max_concurrency", "queue_bytes"):
        opts.pop(k, None)
    if n < 1:
        raise InvalidServiceDefinition(f"service '{name}' needs at least 1 replica, got {n}")
    # Actor threads: start, stop, stats, the router's pending watch() call, and
    # direct calls over Ray (when shared memory is short), one per handler thread.
    actor_opts = {
        "num_cpus": 0.1,
        **opts,
        "max_concurrency": 4 + int(cls.__sage_options__.get("max_concurrency") or DEFAULT_MAX_CONCURRENCY),
    }
    code = code_id_of(cls)
    router = get_router(bus)
    snap = ray.get(router.snapshot.remote(), timeout=30)
    old = snap["services"].get(name, {})
    if old:
        old_class = next(iter(old.values())).class_id
        if old_class != class_id_of(cls) and not replace:
            raise NameConflict(
                f"service name '{name}' on bus '{bus}' is taken by class {old_class} ({len(old)} replica(s)); "
                f"cannot deploy class {class_id_of(cls)} under it (stop it first, or deploy(replace=True))"
            )
        # Replicas running other code (a notebook re-ran a changed cell), or
        # beyond the new count, are replaced; identical ones are kept, so
        # deploying the same service from many processes at once is idempotent.
        stale = [i for i in old.values() if i.code_id != code or i.class_id != class_id_of(cls) or i.replica_index > n]
        _stop_actors([a for a in (_named(i.actor_name) for i in stale) if a is not None], stale, bus, 30)

    def make(i: int) -> Any:
        an = actor_name(bus, name, i)
        return (
            ray.remote(_ServiceActor)
            .options(name=an, namespace=ROUTER_NAMESPACE, get_if_exists=True, **actor_opts)
            .remote(cls, args, kwargs, bus, i, an, replace, code)
        )

    actors = [make(i) for i in range(1, n + 1)]
    infos: list[Any] = [None] * n
    try:
        for _ in range(5):
            todo = [k for k in range(n) if infos[k] is None or infos[k].code_id != code]
            if not todo:
                break
            results = []
            for k in todo:
                try:
                    results.append(ray.get(actors[k].start.remote(), timeout=120))
                except ray.exceptions.RayActorError:
                    results.append(None)  # another deployer was replacing it: make it again
            for k, info in zip(todo, results, strict=True):
                if info is not None and info.code_id != code:
                    _stop_actors([actors[k]], [info], bus, 10)  # an older version held the name
                    info = None
                if info is None:
                    actors[k] = make(k + 1)
                infos[k] = info
        if any(i is None or i.code_id != code for i in infos):
            raise ServiceUnavailable(f"could not start the {n} replica(s) of service '{name}' on bus '{bus}'")
    except Exception as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, SageCommError):
            _stop_actors(actors, [], bus, 10)
            raise cause from None
        raise
    from .client import _Endpoint

    _Endpoint.for_bus(bus).refresh()
    handle = _DEPLOYED[(bus, name)] = ServiceHandle(
        name, bus, actors, infos, detached=opts.get("lifetime") == "detached"
    )
    lifecycle.register(handle, "deployments", ServiceHandle._close_at_exit)
    lifecycle.note_bus(bus)
    return handle


def stop_registered_replicas(bus: str, snapshot: dict, timeout: float = 30.0) -> int:
    """Stops every replica actor registered on ``bus``, whoever deployed it
    (deregister, drain, cleanup, remove rings, kill); returns how many."""
    infos = [i for insts in snapshot["services"].values() for i in insts.values() if i.actor_name]
    actors = [(a, i) for a, i in ((_named(i.actor_name), i) for i in infos) if a is not None]
    if actors:
        _stop_actors([a for a, _ in actors], [i for _, i in actors], bus, timeout)
    return len(actors)


def _named(name: str | None) -> Any:
    import ray

    if not name:
        return None
    try:
        return ray.get_actor(name, namespace=ROUTER_NAMESPACE)
    except ValueError:
        return None


class _Deployer:
    """``Cls.deploy(*args, replicas=None, bus=None, replace=False, **kwargs)``: starts
    the replicas as Ray actors, waits until all are registered, returns a ServiceHandle."""

    def __get__(self, obj: Any, cls: type) -> Callable[..., ServiceHandle]:
        def deploy(*args: Any, **kwargs: Any) -> ServiceHandle:
            return _deploy(cls, *args, **kwargs)

        deploy.__doc__ = _Deployer.__doc__
        return deploy


BaseService.deploy = _Deployer()  # type: ignore[attr-defined]


def sage_service(
    name: str | None = None,
    *,
    replicas: int = 1,
    bus: str | None = None,
    policy: str = "least_outstanding",
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    queue_bytes: int = REQUEST_RING_BYTES,
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

    >>> @sage_service(name="calculator", replicas=2, num_cpus=0.1)
    ... class Calculator(BaseService):
    ...     @service_function
    ...     def calculate(self, data: int) -> dict:
    ...         return {"result": data * 2}
    """
    if policy not in ("least_outstanding", "round_robin"):
        raise InvalidServiceDefinition(f"policy must be 'least_outstanding' or 'round_robin', got {policy!r}")

    def wrap(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, BaseService)):
            # Plain classes get BaseService mixed in, as the seed allowed.
            cls = type(
                cls.__name__, (cls, BaseService), {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
            )
        cls.__sage_name__ = name or cls.__name__
        cls.__sage_options__ = {
            "name": name or cls.__name__,
            "replicas": replicas,
            "bus": bus,
            "policy": policy,
            "max_concurrency": max_concurrency,
            "queue_bytes": queue_bytes,
            **ray_actor_options,
        }
        return cls

    return wrap
