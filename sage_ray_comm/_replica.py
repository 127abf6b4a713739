"""The replica runtime: serves one service instance from this process.

:class:`Runtime` owns the replica's request ring and its dispatcher threads
(dispatch.py: the one that took a request keeps the ring; another takes it
over while a handler runs long, up to the service's ``max_concurrency``
running at once), an asyncio loop for ``async def`` handlers,
the reply path, registration with the router and heartbeats; its open
streams (producers.py) and the calls it may cancel (cancels.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pydantic

from . import context, lifecycle, shm, tracing
from ._future import CallFuture
from ._ray import ROUTER_CALL_SECONDS, ROUTER_READ_SECONDS, RouterClient
from ._wire import (
    ERR_CANCELLED,
    ERR_FUNCTION,
    ERR_REMOTE,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    ERR_VALIDATION,
    OP_CALL,
    OP_EVENT,
    ST_ERROR,
    BadRequest,
    Request,
    bad_request_reply,
    cancel_ticket,
    decode_request,
    encode_error,
    error_reply,
    frame_kind,
)
from .arena import READERS
from .callers import RemoteCallers
from .cancels import CallRegistry, LoopTask, Running
from .claims import ClaimReader
from .dispatch import STOP, Dispatchers
from .errors import (
    QueueClosed,
    SageCommError,
    ServiceUnavailable,
    ValidationError,
)
from .handlers import Handler, collect_handlers, validation_message
from .intake import CANCELLED_FIRST, EXPIRED_FIRST, request_args, take_request
from .loans import keep_slots
from .message import envelope
from .metrics import recorder
from .names import cancellable, claims_reply_ring
from .producers import Producers
from .queue import SageQueue
from .replies import ReplyWriter, Sink, future_sink
from .router import (
    HEARTBEAT_INTERVAL,
    InstanceInfo,
    Subscription,
    bus_namespace,
    class_id_of,
    validate_pattern,
)
from .routing import DEFAULT_POLICY
from .spinning import SpinTuner
from .transport import REQUEST_SPIN_MAX_US, REQUEST_SPIN_US

if TYPE_CHECKING:
    from .service import BaseService

log = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENCY = 16  # handler threads per replica


class Runtime:
    """Serves one service instance from this process: request ring,
    dispatcher threads, async loop, registration and heartbeats.

    It is given its router, its request ring and how to tell that Ray is up,
    so its dispatch and reply paths run in a unit test without Ray."""

    def __init__(
        self,
        svc: BaseService,
        bus: str,
        router: RouterClient,
        queue: SageQueue | None,
        *,
        node_id: str | None,
        reconnect: Callable[[], RouterClient] | None = None,
        alive: Callable[[], bool] = lifecycle.ray_alive,
        replica_index: int = 0,
        actor_name: str | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        policy: str = DEFAULT_POLICY,
        replace: bool = False,
        code_id: str = "",
    ) -> None:
        """``queue`` None: this replica serves over Ray only (no room in
        /dev/shm). ``reconnect`` finds the router again after a failed
        heartbeat (never creating one); ``alive`` says whether Ray still runs."""
        self.svc = svc
        self.bus = bus
        self.namespace = bus_namespace(bus)
        self.instance_id = svc.service_id
        self.max_concurrency = max(1, int(max_concurrency))
        self.functions, self.events = collect_handlers(svc)
        self.producers = Producers(svc.service_name, self.instance_id, shm.host_id())
        self.calls = CallRegistry()  # started, finished and cancelled calls (cancels.py)
        self.claims = ClaimReader(self.namespace)  # callers' claim tables: who runs a queued call
        self.remote_callers = RemoteCallers()  # whether callers on other hosts live (callers.py)
        if any(h.stream for h in self.functions.values()):  # the functions its consumers fetch with
            for name, fn in self.producers.handlers().items():
                self.functions[name] = Handler(svc.service_name, name, fn, None)
        self.router = router
        self._reconnect = reconnect
        self._alive = alive
        self.queue = queue
        self._direct: set[concurrent.futures.Future] = set()  # calls over Ray waiting for an async handler
        # Ring frames dropped, stream items and cancelled calls counted so far.
        self._frames_dropped_seen = self._items_seen = self._skipped_seen = 0
        self.stats = {"calls": 0, "errors": 0, "expired": 0, "replies_dropped": 0, "events": 0, "sends": 0}
        self.reply = ReplyWriter(self.namespace, self.stats, svc.service_name)
        self.in_flight = 0
        self._lock = threading.Lock()
        self._spin = SpinTuner(queue, REQUEST_SPIN_US, REQUEST_SPIN_MAX_US) if queue is not None else None
        self._dispatchers = Dispatchers(
            f"sage-dispatch-{self.instance_id}", self._take_one, self._run_one, self.max_concurrency
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._hb_thread: threading.Thread | None = None
        pid = os.getpid()
        self.info = InstanceInfo(
            service=svc.service_name,
            instance_id=self.instance_id,
            class_id=class_id_of(type(svc)),
            node_id=node_id,
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

    # -- lifecycle
    def start(self) -> None:
        try:
            self.svc.initialize()
            if self.queue is not None:
                self._dispatchers.start()

            self.version = self.router.register(self.info, self._replace)
            for key, pats in self.events.items():
                for p in pats:
                    self.version = self.router.subscribe(self._subscription(key, p), timeout=ROUTER_READ_SECONDS)
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

        validate_pattern(pattern)
        key = f"@cb:{uuid.uuid4().hex[:8]}"
        self.functions[key] = Handler(self.info.service, getattr(callback, "__name__", key), callback, None)
        sub = self._subscription(key, pattern, group)
        self.version = self.router.subscribe(sub, timeout=ROUTER_READ_SECONDS)
        return sub.sub_id

    def _heartbeat(self) -> None:

        while not self._stopping.wait(HEARTBEAT_INTERVAL):
            if not self._alive():
                # ray.shutdown() under a running service: it cannot be reached
                # any more, so it stops (cleanup() runs) and drops its Ray handles.
                threading.Thread(target=self.svc.stop, name=f"sage-stop-{self.instance_id}", daemon=True).start()
                return
            try:
                self.reply.sweep_blobs()
                self.producers.reap(self._loop, self.remote_callers.alive_at)
                self.calls.prune()
                # The calls of callers that died: cancelled.
                self.calls.orphans(lambda n: self.remote_callers.alive(n) and self.reply.caller_lives(n))
                for table in self.claims.prune(shm.process_alive):  # its queued calls are skipped
                    self.reply.caller_lives(claims_reply_ring(table))
                READERS.prune()  # slabs of senders that died: let go of, for gc
                load = {"in_flight": self.in_flight, "queued": self.queued(), "streams": len(self.producers)}
                load.update(self.stats, cancelled=self.calls.skipped)
                self._record_gauges()
                known = self.router.heartbeat(self.instance_id, load)
                if not known and not self._stopping.is_set():
                    # The router restarted and forgot us: register again.
                    if self._reconnect is not None:
                        self.router = self._reconnect()
                    self.router.register(self.info, False, timeout=ROUTER_CALL_SECONDS)
                    for key, pats in self.events.items():
                        for p in pats:
                            self.router.subscribe(self._subscription(key, p))
            except Exception as e:  # router restarting or Ray shutting down: try again next beat
                if self._stopping.is_set():
                    return
                log.debug("heartbeat of %s failed: %s", self.instance_id, e)
                try:
                    # Ray restarts a crashed router; one ended by bus.shutdown()
                    # must stay ended, so a heartbeat never creates one. After
                    # ray.shutdown() no Ray call at all: it would start a new Ray.
                    if self._reconnect is not None and self._alive():
                        self.router = self._reconnect()
                except Exception:
                    pass

    def _record_gauges(self) -> None:
        """Replica gauges for the dashboard, every heartbeat (off the call path)."""
        tags = (self.bus, self.info.service, (self.info.actor_name or self.instance_id).split(":")[-1])
        recorder.gauge("sage_replica_in_flight", tags, self.in_flight)
        recorder.gauge("sage_streams_active", tags, len(self.producers))
        recorder.count("sage_stream_items_total", tags, self.producers.items - self._items_seen)
        recorder.count("sage_calls_cancelled_total", tags, self.calls.skipped - self._skipped_seen)
        self._items_seen, self._skipped_seen = self.producers.items, self.calls.skipped
        if self.reply.arena is not None:
            recorder.gauge("sage_arena_fill_ratio", tags, self.reply.arena.fill())
        if self.queue is None:
            return
        st = self.queue.stats()
        recorder.gauge("sage_ring_fill_ratio", tags, (st["tail"] - st["head"]) / max(1, st["capacity"]))
        dropped = st["frames_dropped"]
        recorder.count("sage_frames_dropped_total", (self.bus, "ring"), dropped - self._frames_dropped_seen)
        self._frames_dropped_seen = dropped

    def stop(self) -> None:
        self._shutdown(deregister=True)

    def _shutdown(self, deregister: bool) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if deregister and self._alive():  # after ray.shutdown() there is no router to tell
            try:
                self.router.deregister(self.instance_id)
            except Exception as e:  # the router is gone: nothing to deregister from
                log.debug("deregistering %s failed: %s", self.instance_id, e)
        if self.queue is not None:
            self.queue.close()  # wakes the dispatcher on the ring; callers now get ServiceUnavailable
        self._dispatchers.stop()
        self._dispatchers.join(timeout=10)
        self.producers.close_all(self._loop)  # each generator's finally runs
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=5)
        if self._hb_thread is not None and self._hb_thread is not threading.current_thread():
            self._hb_thread.join(timeout=5)
        try:
            self.svc.cleanup()
        finally:
            self.reply.close()
            self.claims.close()
            self.remote_callers.close()
            if self.queue is not None:
                self.queue.destroy()
            for fut in list(self._direct):
                if not fut.done():
                    fut.set_exception(
                        ServiceUnavailable(f"replica {self.instance_id} of '{self.info.service}' stopped")
                    )

    # -- dispatch
    @property
    def thread_count(self) -> int:
        """Dispatcher threads started so far."""
        return len(self._dispatchers.threads)

    def queued(self) -> int:
        """Requests waiting in the ring (0 without one)."""
        return self.queue.qsize() if self.queue is not None else 0

    def handle_direct(self, frames: list) -> list:
        """Serves the requests of one Ray actor call (a batch), each a frame or
        ``(frame, args, kwargs)`` (``_wire.direct_payload``): the ring path's
        checks and handlers, in order. Returns the replies (None for sends)."""
        out: list = [None] * len(frames)
        waiting: list = []  # (index, future, request) of calls an async handler still runs
        try:
            for i, item in enumerate(frames):
                payload, beside = (item[0], item[1:]) if type(item) is tuple else (item, None)
                kind = frame_kind(payload)
                # call_async calls carry a cancel key in the header: one cancelled first is skipped unread.
                ticket, caller = cancel_ticket(payload, kind)
                key = (caller, ticket) if ticket and caller else None
                dead = self.reply.known_dead(caller or "") or self.remote_callers.known_dead(caller or "")
                call = self.calls.admit(key, not dead) if key is not None else None
                if key is not None and call is None:  # cancelled first, or its caller died (its reply: by position)
                    out[i] = error_reply(0, ERR_CANCELLED, "cancelled before it started; not run")
                    continue
                try:
                    req = decode_request(payload, kind, beside)
                    if self._stopping.is_set():
                        msg = f"replica {self.instance_id} of '{self.info.service}' is stopping"
                        out[i] = error_reply(req.cid, ERR_UNAVAILABLE, msg)
                        continue
                except BadRequest as e:
                    self.stats["errors"] += 1
                    out[i] = bad_request_reply(e, self.info.service, f"replica {self.instance_id}")
                    continue
                finally:
                    if key is not None and out[i] is not None:  # not run: over
                        self.calls.finish(key)
                if req.op != OP_CALL:
                    self._handle(req, "ray", len(payload))
                    continue
                h = self.functions.get(req.function)
                if h is None or not h.is_async:  # replies in this thread, before _handle returns
                    box: list = []
                    self._handle(req, "ray", len(payload), box.append, call)
                    if key is not None:
                        self.calls.finish(key)
                    out[i] = box[0] if box else error_reply(req.cid, ERR_REMOTE, f"{req.function} gave no reply")
                    continue
                fut: concurrent.futures.Future = CallFuture()
                self._direct.add(fut)  # stop() fails it if the replica stops first
                if not self._handle(req, "ray", len(payload), future_sink(fut), call) and key is not None:
                    self.calls.finish(key)
                waiting.append((i, fut, req))
            for i, fut, req in waiting:  # async handlers reply from their loop
                left = None if req.deadline is None else max(0.0, req.deadline - time.time()) + 1.0
                try:
                    out[i] = fut.result(timeout=left)
                except concurrent.futures.TimeoutError:
                    out[i] = error_reply(
                        req.cid, ERR_TIMEOUT, f"call to {req.service}.{req.function} got no reply before its deadline"
                    )
        finally:
            for _i, fut, _req in waiting:
                self._direct.discard(fut)
        return out

    def _take_one(self) -> Any:
        """The leader's ``take`` (dispatch.py): the next request of the ring to
        run, as (request, its frame's size); None when what came needs no
        handler; STOP once the ring closed or the replica stops."""
        queue, spin = self.queue, self._spin
        if queue is None or spin is None or self._stopping.is_set():
            return STOP
        keep_slots()  # large bytes the request brings stay in their slots while it runs (sent on: no copy)
        t0 = time.monotonic()
        try:
            req, nbytes = take_request(queue, self.claims)
            spin.waited(time.monotonic() - t0)
        except QueueClosed:
            return STOP
        except SageCommError as e:  # a corrupted frame: consumed, keep serving
            log.warning("service %s dropped a frame: %s", self.info.service, e)
            self.stats["errors"] += 1
            return None
        if req is CANCELLED_FIRST:  # its caller's cancel() won the claim: not even unpickled
            self.calls.count_skipped()
            return None
        if req is EXPIRED_FIRST:  # its caller timed out first: as a request past its deadline
            self.stats["expired"] += 1
            return None
        if not isinstance(req, Request):  # not a request, or one that cannot be run
            self.stats["errors"] += 1
            if isinstance(req, BadRequest):
                self.reply.bad_request(req, f"replica {self.instance_id}")
            return None
        return req, nbytes

    def _run_one(self, got: tuple[Request, int]) -> None:
        req, nbytes = got
        # Every call is tracked in self.calls: its caller may cancel it, or die.
        key = (req.reply_to, req.cid) if req.reply_to else None
        call = None
        if key is not None:
            call = self.calls.admit(key, not self.reply.known_dead(key[0]), cancellable(key[0]))
        try:
            if key is not None and call is None:
                pass  # cancelled first (asked through the actor), or its caller died while it waited
            elif not self._handle(req, "shm", nbytes, call=call) and key:
                self.calls.finish(key)  # over (an async handler finishes its own call)
        except Exception:  # never lose the dispatcher thread
            log.exception("service %s failed handling a request", self.info.service)
        finally:
            keep_slots()  # the slots its bytes came in go now

    def _handle(
        self, req: Request, transport: str, nbytes: int, sink: Sink | None = None, call: Running | None = None
    ) -> bool:
        """Runs a request's handler, in this thread (sync) or on the loop
        (async), and replies: to the caller's ring, or to ``sink`` (over Ray).
        ``transport``, ``nbytes``: for its span; ``call``: its ``self.calls``
        entry. True when an async handler took it over (and finishes it)."""
        op = req.op
        if req.deadline is not None and time.time() > req.deadline:
            self.stats["expired"] += 1
            if op == OP_CALL:
                self.reply.error(
                    req,
                    ERR_TIMEOUT,
                    f"deadline of the call to {req.service}.{req.function} passed "
                    "before a replica could start it; not run",
                    sink=sink,
                )
            return False
        h = self.functions.get(req.function)
        if h is None:
            if op == OP_CALL:
                known = sorted(n for n in self.functions if not n.startswith("@"))
                self.reply.error(
                    req,
                    ERR_FUNCTION,
                    f"service '{req.service}' has no function '{req.function}'; it has: {', '.join(known) or '(none)'}",
                    sink=sink,
                )
            self.stats["errors"] += 1
            return False
        args, kwargs = request_args(req)  # read out of their segment if they came in one
        if not args and kwargs and "payload" in kwargs and not h.takes_payload:
            kwargs = dict(kwargs)
            args = (kwargs.pop("payload"),)
        if h.wants_message:
            kwargs = dict(kwargs or {})
            kwargs["message"] = envelope(req)
        self.stats["calls" if op == OP_CALL else ("events" if op == OP_EVENT else "sends")] += 1
        self.in_flight += 1
        span = self._span(req, transport, nbytes) if tracing.ENABLED and tracing.recording() else None
        # The handler's own calls inherit its deadline and trace (context.py);
        # an async handler's task copies the context when it is scheduled below.
        token = context.enter(context.Handling(req.service, req.function, req.deadline, req.trace, call))
        try:
            result = h.validated(*args, **(kwargs or {}))
            if h.stream:  # a generator: kept as a stream, nothing of it runs yet
                result = self.producers.open(result, h.stream == "async")
            if h.is_async:
                task = LoopTask(self._async_loop())
                fut = asyncio.run_coroutine_threadsafe(task.run(result), task.loop)
                if call is not None:
                    call.future = task  # cancelling the call cancels its task (its reply: once it ended)
                    if call.cancelled:
                        task.cancel()
                fut.add_done_callback(functools.partial(self._async_done, req, span, sink, call))
                return True
        except pydantic.ValidationError as e:
            self.in_flight -= 1
            msg, errs = validation_message(req.service, h.name, e, h.params)
            self.stats["errors"] += 1
            if op == OP_CALL:
                self.reply.error(req, ERR_VALIDATION, msg, errs, sink)
            else:
                log.warning("%s", msg)
            if span is not None:
                span.close(ValidationError(msg))
            return False
        except Exception as e:
            self.in_flight -= 1
            self._failed(req, e, span, sink)
            return False
        finally:
            context.leave(token)
            if span is not None:
                span.detach()  # leaves this thread's context; the span ends with the handler
        self.in_flight -= 1
        if op == OP_CALL:
            self.reply.result(req, result, sink)
        if span is not None:
            span.close()
        return False

    def _span(self, req: Request, transport: str, nbytes: int) -> Any:
        """The SERVER or CONSUMER span of a request about to be handled (tracing.py)."""
        event = req.op == OP_EVENT
        return tracing.start_handling(
            req.op == OP_CALL,
            self.info.service,
            req.function,
            req.trace,
            replica=self.instance_id,
            transport=transport,
            nbytes=nbytes,
            topic=(req.headers or {}).get("topic") if event else None,
            group=req.service if event else None,
        )

    def _async_done(self, req: Request, span: Any, sink: Sink | None, call: Running | None, fut: Any) -> None:
        self.in_flight -= 1
        if call is not None:
            self.calls.finish(call.key)
        try:
            result = fut.result()
        except BaseException as e:
            self._failed(req, e, span, sink)
            return
        if req.op == OP_CALL:
            self.reply.result(req, result, sink)
        if span is not None:
            span.close()

    def _failed(self, req: Request, e: BaseException, span: Any = None, sink: Sink | None = None) -> None:
        if span is not None:
            span.close(e)
        self.stats["errors"] += 1
        if req.op == OP_CALL:
            self.reply.put(req, (req.cid, ST_ERROR, encode_error(ERR_REMOTE, e)), sink=sink)
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
