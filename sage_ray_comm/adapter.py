"""The legacy adapter: code written against same-named shared-memory queues
keeps running while it migrates to services.

Stage 1, adapter only: swap the constructor, keep the code::

    q = create_queue_adapter("old_queue_name")      # was SageQueue("old_queue_name")
    q.put(data); q.get(timeout=1); q.qsize(); q.empty(); q.close()

The name is now scoped by the bus (its shared-memory namespace) and recorded
with the bus's router, so two jobs on different buses that both say
"old_queue_name" never see each other's data, which was the bug this project
exists to fix. On one bus the name is one queue, shared by every process on
the node (multi-producer, multi-consumer).

Stage 2, mixed: ``LegacyQueueAdapter(name, service_name="stage2")`` sends each
``put`` to the service's ``process_data`` once that service is registered, and
to the queue until then; ``migrate_service(name, obj)`` turns an object with
``process``, ``handle`` or ``__call__`` into a registered service that also
drains the old queue; ``adapter.bridge_to(service, fn)`` and
``adapter.bridge_to_topic(topic)`` forward what old producers put.

Stage 3, migrated: call the service (``FunctionClient``, ``call_service``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from . import lifecycle, shm
from ._ray import ensure_ray
from .client import FunctionClient
from .endpoint import Endpoint
from .errors import InvalidQueueArgument, InvalidServiceDefinition, QueueClosed, QueueEmpty, SageCommError
from .queue import DEFAULT_MAXSIZE, SageQueue
from .router import bus_namespace, validate_bus_name
from .service import BaseService, service_function
from .topics import validate_topic

__all__ = ["LEGACY_PREFIX", "Bridge", "LegacyQueueAdapter", "create_queue_adapter", "migrate_service"]

log = logging.getLogger(__name__)

LEGACY_PREFIX = "legacy."


class Bridge:
    """A thread that drains a legacy queue into a service or a topic. ``stop()`` ends it."""

    def __init__(self, adapter: LegacyQueueAdapter, forward: Callable[[Any], Any], label: str) -> None:
        self.adapter = adapter
        self.label = label
        self.forwarded = 0
        self.errors = 0
        self._forward = forward
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sage-bridge-{label}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        q = self.adapter._queue
        while not self._stop.is_set():
            if not lifecycle.ray_alive():
                return  # ray.shutdown(): nothing to forward to any more
            try:
                item = q.get(timeout=0.2)  # a short wait, so stop() is seen promptly
            except QueueEmpty:
                continue
            except QueueClosed:
                return
            except SageCommError as e:
                self.errors += 1
                log.warning("bridge %s: dropped an undecodable item: %s", self.label, e)
                continue
            try:
                self._forward(item)
                self.forwarded += 1
            except Exception:  # keep draining; the error is counted and logged
                self.errors += 1
                log.exception("bridge %s could not forward an item", self.label)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


class LegacyQueueAdapter:
    """The old queue interface on a bus-scoped shared-memory queue.

    Args:
        queue_name: the legacy queue's name (unique per bus, not per machine).
        service_name: mixed mode: ``put`` goes to this service's
            ``process_function`` while it is registered, to the queue otherwise.
        bus: the bus whose namespace scopes the name (default ``"default"``).
        maxsize: ring bytes, if this call creates the queue.
        process_function: the function mixed-mode puts call.

    >>> q = create_queue_adapter("jobs", bus="etl")            # doctest: +SKIP
    >>> q.put({"id": 1}); q.get(timeout=1)
    {'id': 1}
    """

    def __init__(
        self,
        queue_name: str,
        service_name: str | None = None,
        *,
        bus: str = "default",
        maxsize: int = DEFAULT_MAXSIZE,
        process_function: str = "process_data",
    ) -> None:

        if not isinstance(queue_name, str) or not queue_name:
            raise InvalidQueueArgument(f"legacy queue name must be a non-empty string, got {queue_name!r}")
        ensure_ray()
        self.queue_name = queue_name
        self.service_name = service_name
        self.process_function = process_function
        self.bus = validate_bus_name(bus)
        self.namespace = bus_namespace(self.bus)
        self._queue = SageQueue(LEGACY_PREFIX + queue_name, maxsize, auto_cleanup=False, namespace=self.namespace)
        self._client = FunctionClient(client_id=f"legacy:{queue_name}:{os.getpid()}", bus=self.bus)
        ep = self._client.endpoint
        # Recorded with the router: `sage-comm status` shows it, bus shutdown removes it.
        ep.router.register_queue(
            queue_name,
            {"ring": self._queue.name, "node_id": ep.node_id, "host_id": ep.host_id, "pid": os.getpid()},
        )
        self._bridges: list[Bridge] = []
        self.stats = {"to_queue": 0, "to_service": 0, "got": 0}
        lifecycle.register(self, "bridges", LegacyQueueAdapter.close)
        lifecycle.note_bus(self.bus)

    # -- the old interface
    def _service_up(self) -> bool:
        # The cached registry: no router round trip per put.
        return bool(self.service_name) and self.service_name in self._client.endpoint.snapshot["services"]

    def put(self, data: Any, block: bool = True, timeout: float | None = None) -> None:
        """Puts ``data`` on the queue, or hands it to the service in mixed mode."""
        if self._service_up():
            self._client.send(self.service_name, self.process_function, data, timeout=timeout)  # type: ignore[arg-type]
            self.stats["to_service"] += 1
            return
        self._queue.put(data, block, timeout)
        self.stats["to_queue"] += 1

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Takes the next item (raises QueueEmpty, also ``queue.Empty``, on timeout)."""
        item = self._queue.get(block, timeout)
        self.stats["got"] += 1
        return item

    def put_nowait(self, data: Any) -> None:
        self.put(data, block=False)

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def qsize(self) -> int:
        return self._queue.qsize()

    def empty(self) -> bool:
        return self._queue.empty()

    def full(self) -> bool:
        return self._queue.full()

    def get_stats(self) -> dict[str, Any]:
        s = self._queue.get_stats()
        s.update(self.stats, queue_name=self.queue_name, bus=self.bus, bridges=len(self._bridges))
        return s

    # -- migration helpers
    def bridge_to(self, service: str, function: str = "process_data") -> Bridge:
        """Forwards every item put on the queue to ``service.function`` (no reply)."""
        b = Bridge(
            self, lambda item: self._client.send(service, function, item), f"{self.queue_name}->{service}.{function}"
        )
        self._bridges.append(b)
        return b

    def bridge_to_topic(self, topic: str) -> Bridge:
        """Publishes every item put on the queue on ``topic``."""
        validate_topic(topic)
        b = Bridge(self, lambda item: self._client.broadcast(topic, item), f"{self.queue_name}->{topic}")
        self._bridges.append(b)
        return b

    # -- lifecycle
    def close(self) -> None:
        """Stops this adapter's bridges and releases its handle; the queue stays for the others."""
        lifecycle.unregister(self, "bridges")
        for b in self._bridges:
            b.stop()
        self._bridges.clear()
        self._client.close()
        self._queue.release()

    def destroy(self) -> None:
        """Removes the queue for everyone on the bus (items still in it are lost)."""

        try:
            self._client.endpoint.router.unregister_queue(self.queue_name)
        except SageCommError:
            pass
        self._queue.close()
        self._queue.unlink()
        self.close()

    def __enter__(self) -> LegacyQueueAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = f", service_name={self.service_name!r}" if self.service_name else ""
        return f"LegacyQueueAdapter({self.queue_name!r}{mode}, bus={self.bus!r})"


def create_queue_adapter(
    queue_name: str, *, bus: str = "default", maxsize: int = DEFAULT_MAXSIZE
) -> LegacyQueueAdapter:
    """The drop-in replacement for ``SageQueue(queue_name)`` in old code."""
    return LegacyQueueAdapter(queue_name, bus=bus, maxsize=maxsize)


def _handler_of(obj: Any) -> Callable[[Any], Any]:
    for attr in ("process", "handle"):
        fn = getattr(obj, attr, None)
        if callable(fn):
            return fn
    if callable(obj):
        return obj
    raise InvalidServiceDefinition(
        f"migrate_service needs an object with process(), handle() or __call__(); {type(obj).__name__} has none"
    )


class _MigratedService(BaseService):
    """An old queue consumer as a service: ``process_data(item)`` runs its handler,
    and a bridge keeps draining the legacy queue into the same handler."""

    def __init__(self, name: str, handler: Callable[[Any], Any], queue_name: str, bus: str) -> None:
        super().__init__(name)
        self._handler = handler
        self._queue_name = queue_name
        self._bus = bus
        self.adapter: LegacyQueueAdapter | None = None
        self.bridge: Bridge | None = None

    def initialize(self) -> None:
        self.adapter = LegacyQueueAdapter(self._queue_name, bus=self._bus)
        self.bridge = Bridge(self.adapter, self._handler, f"{self._queue_name}->{self.service_name}")

    def cleanup(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
        if self.adapter is not None:
            self.adapter.close()

    @service_function
    def process_data(self, data: Any) -> Any:
        return self._handler(data)


def migrate_service(queue_name: str, obj: Any, *, service_name: str | None = None, bus: str = "default") -> BaseService:
    """Serves ``obj`` (its ``process``, ``handle`` or ``__call__``) as a service
    named ``service_name`` (default: the queue's name) from this process, and
    keeps draining the legacy queue into it. ``stop()`` the result to end both.

    >>> svc = migrate_service("orders", OrderConsumer(), service_name="orders")   # doctest: +SKIP
    """
    svc = _MigratedService(service_name or queue_name, _handler_of(obj), queue_name, validate_bus_name(bus))
    return svc.start(bus=bus)


def destroy_bus_queues(bus: str) -> int:
    """Removes the legacy queues recorded on ``bus`` that live on this host."""
    ep = Endpoint.existing(bus)
    snap = ep.refresh() if ep is not None else None
    if not snap:
        return 0
    n = 0
    for info in snap.get("queues", {}).values():
        if info.get("host_id") == shm.host_id():
            n += bool(shm.unlink(shm.segment_name(bus_namespace(bus), info["ring"])))
    return n
