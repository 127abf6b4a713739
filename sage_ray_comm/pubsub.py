"""Publish-subscribe: the client's side (:class:`PubSubCalls`) and a
process's inbox for events to its ``subscribe`` callbacks (:class:`Inbox`).

Publishers write one request frame (op ``OP_EVENT``) per subscriber into the
subscriber's event ring; the inbox's reader thread decodes each with the
same consume step as a replica's dispatcher (``transport.take_request``) and
calls the callback.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import shm, tracing
from ._ray import ROUTER_READ_SECONDS
from ._wire import OP_EVENT, Request
from .errors import CallTimeout, InvalidSubscription, SageCommError
from .intake import request_args, take_request
from .message import envelope
from .metrics import recorder
from .names import event_ring_name
from .queue import SageQueue
from .router import Subscription
from .routing import publish_targets
from .topics import topic_matches, validate_pattern, validate_topic
from .transport import EVENT_RING_BYTES

if TYPE_CHECKING:
    from .endpoint import Endpoint

__all__ = ["Inbox", "PubSubCalls"]

log = logging.getLogger(__name__)


class PubSubCalls:
    """``broadcast``/``publish``, ``subscribe``, ``unsubscribe`` and
    ``wait_for_subscribers`` of :class:`~sage_ray_comm.FunctionClient` (it inherits them).

    >>> client.subscribe("sensors.*", lambda reading: print(reading))  # doctest: +SKIP
    >>> client.broadcast("sensors.temp", 21.5)                          # doctest: +SKIP
    1
    """

    bus: str
    client_id: str
    _subs: list[str]

    if TYPE_CHECKING:

        @property
        def endpoint(self) -> Endpoint: ...

    def broadcast(self, topic: str, payload: Any, *, headers: dict | None = None) -> int:
        """Publishes ``payload`` on ``topic`` to every matching subscriber (one
        per service group); returns how many took it. A subscriber whose buffer
        is full misses it (counted in ``stats()['dropped']``): at-most-once,
        and a slow subscriber never blocks the publisher."""
        validate_topic(topic)
        ep = self.endpoint
        hdrs = {"topic": topic, **(headers or {})}
        targets = publish_targets(ep.snapshot["subscriptions"], topic, ep.rr, ep.node_id)
        span, trace = tracing.start_publish(topic, self.bus, self.client_id) if tracing.ENABLED else tracing.UNTRACED
        try:
            delivered = self._deliver(ep, targets, payload, hdrs, trace)
        except BaseException as e:
            tracing.finish(span, e)
            raise
        tracing.finish(span, delivered=delivered)
        ep.stats["published"] += 1
        ep.stats["delivered"] += delivered
        recorder.count("sage_messages_published_total", (self.bus,))
        return delivered

    def _deliver(self, ep: Endpoint, targets: list[Subscription], payload: Any, hdrs: dict, trace: str | None) -> int:
        delivered = 0
        fanout = getattr(ep.shm, "fanout", None)
        if fanout is not None and sum(1 for s in targets if s.queue) > 1:
            payload = fanout(payload)  # large buffers written once, for every subscriber on this node
        event = Request(OP_EVENT, 0, "", (payload,), None, None, None, self.client_id, hdrs, "", trace)
        far: dict[str, list[Subscription]] = {}  # other nodes' subscribers: one frame per node
        for sub in targets:
            tr = ep.transport(sub.node_id)
            if sub.queue and tr is ep.ray:
                far.setdefault(sub.node_id or "", []).append(sub)
                continue
            req = event._replace(function=sub.function or "", service=sub.group or "")
            if not sub.queue and ep.deliver_direct(sub, req):
                delivered += 1
                recorder.count("sage_messages_delivered_total", (self.bus, "ray"))
            elif sub.queue and tr.deliver(sub, req):
                delivered += 1
                recorder.count("sage_messages_delivered_total", (self.bus, tr.name))
            else:
                ep.stats["dropped"] += 1
                recorder.count("sage_frames_dropped_total", (self.bus, "subscriber_buffer"))
        for subs in far.values():
            n = ep.ray.deliver_many(subs, event)  # type: ignore[union-attr]  # far is empty without ep.ray
            delivered += n
            recorder.count("sage_messages_delivered_total", (self.bus, "ray"), n)
        return delivered

    publish = broadcast

    def subscribe(self, pattern: str, callback: Callable, *, buffer_bytes: int | None = None) -> str:
        """Runs ``callback(payload)`` (or ``callback(payload, message=...)``) in a
        background thread for each event matching ``pattern``. Returns the
        subscription id for :meth:`unsubscribe`.

        Events wait in this process's bounded buffer (``buffer_bytes``, 4 MiB by
        default, sized by the process's first subscription on the bus). When
        it is full, publishers drop the event for this process and count it:
        delivery is at-most-once, and a slow callback never blocks a publisher.
        Callbacks of one process run one at a time, in order."""
        validate_pattern(pattern)
        if not callable(callback):
            raise InvalidSubscription(f"subscribe({pattern!r}): callback must be callable, got {callback!r}")
        ep = self.endpoint
        inbox = ep.inbox(buffer_bytes)
        sub_id = f"{ep.host_id}:{os.getpid()}/{uuid.uuid4().hex[:10]}"
        try:
            inbox.wants_message[sub_id] = "message" in inspect.signature(callback).parameters
        except (TypeError, ValueError):
            inbox.wants_message[sub_id] = False
        inbox.callbacks[sub_id] = callback
        pid = os.getpid()
        sub = Subscription(
            sub_id, pattern, inbox.name, ep.node_id, ep.host_id, pid, shm.process_start_time(pid), None, sub_id
        )
        ep.ensure_version(ep.router.subscribe(sub, timeout=ROUTER_READ_SECONDS))
        ep.my_subs[sub_id] = sub
        self._subs.append(sub_id)
        return sub_id

    def unsubscribe(self, sub_id: str) -> bool:
        """Ends a subscription made by :meth:`subscribe`; False if it was unknown."""
        ep = self.endpoint
        ok = ep.router.unsubscribe(sub_id, timeout=ROUTER_READ_SECONDS)
        ep.forget_subscription(sub_id)
        if sub_id in self._subs:
            self._subs.remove(sub_id)
        ep.refresh()
        return ok

    def wait_for_subscribers(self, topic: str, count: int = 1, timeout: float = 10.0) -> int:
        """Waits until this process's registry shows ``count`` subscribers for
        ``topic`` (subscriptions made elsewhere reach it asynchronously)."""
        validate_topic(topic)
        ep = self.endpoint
        end = time.monotonic() + timeout
        while True:
            n = sum(1 for s in ep.snapshot["subscriptions"] if topic_matches(s.pattern, topic))
            if n >= count:
                return n
            if time.monotonic() >= end:
                raise CallTimeout(
                    f"topic '{topic}' on bus '{self.bus}' has {n} subscriber(s), not {count}, after {timeout} s"
                )
            ep.refresh()
            time.sleep(0.02)  # polling the router's version; a change usually lands within one poll


class Inbox:
    """A process's ring for events to ``bus.subscribe`` callbacks, and its reader thread."""

    def __init__(self, bus: str, namespace: str, buffer_bytes: int = EVENT_RING_BYTES) -> None:
        self.name = event_ring_name(os.getpid(), uuid.uuid4().hex[:10])
        self.queue = SageQueue(self.name, buffer_bytes, auto_cleanup=True, namespace=namespace)
        self.callbacks: dict[str, Callable] = {}
        self.wants_message: dict[str, bool] = {}
        self.stats = {"received": 0, "errors": 0}
        self._thread = threading.Thread(target=self._run, name=f"sage-events-{bus}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                req, nbytes = take_request(self.queue)
            except SageCommError as e:
                if self.queue.closed:
                    return
                log.warning("dropped an undecodable event: %s", e)
                continue
            if not isinstance(req, Request):
                if req is not None:
                    log.warning("dropped an event whose payload did not unpickle: %s", req)
                continue
            cb = self.callbacks.get(req.function)
            if cb is None:
                continue  # unsubscribed meanwhile
            self.stats["received"] += 1
            span = None
            if tracing.ENABLED and tracing.recording():
                span = tracing.start_handling(
                    False,
                    req.service,
                    req.function,
                    req.trace,
                    replica=req.function,  # the subscription id
                    transport="shm",
                    nbytes=nbytes,
                    topic=(req.headers or {}).get("topic"),
                )
            error: Exception | None = None
            try:
                args, _ = request_args(req)
                if self.wants_message[req.function]:
                    cb(*args, message=envelope(req))
                else:
                    cb(*args)
            except Exception as e:
                error = e
                self.stats["errors"] += 1
                log.exception("subscriber callback %r raised", cb)
            finally:
                if span is not None:
                    span.detach()
                    span.close(error)

    def close(self) -> None:
        self.queue.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.queue.release()
