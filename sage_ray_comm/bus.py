"""CommunicationBus: one named bus (a router actor plus its registry) seen from this process.

>>> bus = get_communication_bus("production_bus")       # doctest: +SKIP
>>> bus.start()                                          # idempotent; starts a local Ray if none runs
>>> bus.subscribe("sensor.>", lambda payload: print(payload))
>>> bus.publish("sensor.kitchen.temp", 21.5)
>>> bus.services()                                       # the registry as rows
>>> bus.stop()

Several buses are isolated: each has its own router, registry and
shared-memory namespace, so equal service or queue names never meet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pydantic

from . import lifecycle, shm
from .adapter import destroy_bus_queues
from .client import FunctionClient
from .deploy import ServiceHandle, deployed, stop_registered_replicas
from .endpoint import Endpoint
from .errors import CallTimeout, InvalidCallArgument, InvalidServiceDefinition, ServiceNotFound, ValidationError
from .message import CommunicationPattern, Message
from .ray_transport import forget_bus_on_gateways
from .router import ROUTER_NAMESPACE, bus_namespace, router_name, validate_bus_name
from .router import bus_namespace as _ns
from .service import BaseService
from .views import replica_rows

__all__ = ["CommunicationBus", "DeliveryReceipt", "ServiceManager", "get_communication_bus", "get_service_manager"]


class DeliveryReceipt(pydantic.BaseModel):
    """What :meth:`CommunicationBus.route_message` returns for patterns without a reply."""

    message_id: str
    pattern: CommunicationPattern
    delivered: int  # replicas or subscribers that took it
    instances: list[str] = []  # replica ids (point-to-point, load-balanced)
    topic: str | None = None


class CommunicationBus:
    """A bus as seen from this process. Get one with :func:`get_communication_bus`."""

    def __init__(self, name: str = "default") -> None:
        self.name = validate_bus_name(name)
        self._client: FunctionClient | None = None
        self._lock = threading.Lock()

    # -- lifecycle
    def start(self) -> CommunicationBus:
        """Finds or creates the bus's router (starting a local Ray if needed). Idempotent."""
        with self._lock:
            if self._client is None or self._client.closed:
                self._client = FunctionClient(client_id=f"bus:{self.name}", bus=self.name)
                self._client.endpoint  # noqa: B018  (connects now, so errors surface here)
        return self

    @property
    def client(self) -> FunctionClient:
        """The bus's own FunctionClient (started on first use)."""
        if self._client is None or self._client.closed:
            self.start()
        return self._client  # type: ignore[return-value]

    def stop(self) -> None:
        """Drops this process's subscriptions and rings on the bus. Services keep running."""
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            c.close()

    def shutdown(self, collect: bool = True) -> None:
        """Ends the bus: stops the services this process serves or deployed on it, removes
        its legacy queues and this process's rings, kills the router (its
        registry goes with it), and removes rings left by killed processes."""
        import ray

        m = _managers.get(self.name)
        if m is not None:
            m.stop_all()
        # Services served from this process on this bus, however they were started.
        for svc in lifecycle.closers.objects("services"):
            if svc.bus_name == self.name:
                svc.stop()
        for h in deployed(self.name):
            h.shutdown()
        if ray.is_initialized():
            # Replicas deployed by other processes (a detached service of an
            # earlier job): the bus ends with all of its services.

            self.start()
            stop_registered_replicas(self.name, self.client.endpoint.refresh())
        if ray.is_initialized():
            self.start()  # the registry lists the bus's legacy queues
            destroy_bus_queues(self.name)
        self.stop()
        ep = Endpoint.existing(self.name)
        if ep is not None:
            ep.close()
        if ray.is_initialized():
            forget_bus_on_gateways(bus_namespace(self.name))
            try:
                ray.kill(ray.get_actor(router_name(self.name), namespace=ROUTER_NAMESPACE), no_restart=True)
            except ValueError:
                pass  # no router: nothing to end
        # Rings of processes that were killed without closing (callers, actors).
        # (collect=False leaves them, for a test to look at first.)
        if collect:
            shm.gc(_ns(self.name), keep_legacy=False)

    @property
    def is_running(self) -> bool:
        return self._client is not None and not self._client.closed

    # -- patterns
    def call(self, service: str, function: str, *args: Any, **kwargs: Any) -> Any:
        """Request-response (see :meth:`FunctionClient.call`)."""
        return self.client.call(service, function, *args, **kwargs)

    def publish(self, topic: str, payload: Any, **kwargs: Any) -> int:
        """Publishes ``payload`` on ``topic``; returns how many subscribers took it."""
        return self.client.broadcast(topic, payload, **kwargs)

    def subscribe(self, pattern: str, callback: Callable) -> str:
        """Calls ``callback(payload)`` for each event matching ``pattern`` (``*``, ``>``)."""
        return self.client.subscribe(pattern, callback)

    def unsubscribe(self, sub_id: str) -> bool:
        return self.client.unsubscribe(sub_id)

    def wait_for_subscribers(self, topic: str, count: int = 1, timeout: float = 10.0) -> int:
        return self.client.wait_for_subscribers(topic, count, timeout)

    def route_message(self, message: Message | dict, pattern: Any = CommunicationPattern.REQUEST_RESPONSE) -> Any:
        """Routes a :class:`Message` by ``pattern``.

        - ``REQUEST_RESPONSE``: calls ``receiver.function(payload)`` and returns the result.
        - ``LOAD_BALANCED``: delivers it to one replica of ``receiver`` chosen by the
          service's policy; no reply.
        - ``POINT_TO_POINT``: delivers it to the replica named by the header
          ``instance`` (any replica if absent); no reply.
        - ``PUBLISH_SUBSCRIBE``: publishes ``payload`` on ``topic`` (or ``receiver``).
        - ``STREAM``: calls the generator function ``receiver.function(payload)``
          and returns its :class:`~sage_ray_comm.streams.Stream`.

        The last three return a :class:`DeliveryReceipt`. The timeout is what is
        left of the message's ``ttl``/``deadline``. A payload of ``None`` calls
        the function with no argument. Raises the same typed errors as
        :class:`FunctionClient`; a dict that is not a valid Message raises
        ValidationError naming the field.

        >>> bus.route_message(Message(receiver="calculator", function="add", payload=2))   # doctest: +SKIP
        """
        msg = _as_message(message)
        try:
            pat = CommunicationPattern(pattern)
        except ValueError:
            raise InvalidCallArgument(
                f"unknown communication pattern {pattern!r}; use one of {[p.value for p in CommunicationPattern]}"
            ) from None
        c = self.client
        timeout = None
        if msg.expires_at is not None:
            timeout = msg.expires_at - time.time()
            if timeout <= 0:
                raise CallTimeout(f"message {msg.id} to {msg.receiver}.{msg.function} expired before it was routed")
        args = () if msg.payload is None else (msg.payload,)
        headers = dict(msg.headers, message_id=msg.id)
        if pat is CommunicationPattern.PUBLISH_SUBSCRIBE:
            topic = msg.topic or msg.receiver
            if not topic:
                raise InvalidCallArgument(f"message {msg.id}: publish-subscribe needs a topic (or receiver)")
            n = c.broadcast(topic, msg.payload, headers=headers)
            return DeliveryReceipt(message_id=msg.id, pattern=pat, delivered=n, topic=topic)
        if not msg.receiver or not msg.function:
            raise InvalidCallArgument(
                f"message {msg.id}: {pat.value} needs a receiver (service) and a function, "
                f"got receiver={msg.receiver!r} function={msg.function!r}"
            )
        if pat is CommunicationPattern.REQUEST_RESPONSE:
            return c.call(msg.receiver, msg.function, *args, timeout=timeout, headers=headers)
        if pat is CommunicationPattern.STREAM:
            return c.stream(msg.receiver, msg.function, *args, timeout=timeout, headers=headers)
        instance = msg.headers.get("instance") if pat is CommunicationPattern.POINT_TO_POINT else None
        iid = c.send(msg.receiver, msg.function, *args, instance=instance, timeout=timeout, headers=headers)
        return DeliveryReceipt(message_id=msg.id, pattern=pat, delivered=1, instances=[iid])

    # -- registry view
    def services(self) -> list[dict[str, Any]]:
        """One row per replica: service, instance, node, functions, liveness, load."""
        return replica_rows(self.client.endpoint.refresh())

    def subscriptions(self) -> list[dict[str, Any]]:
        snap = self.client.endpoint.refresh()
        return [
            {"pattern": s.pattern, "group": s.group, "node": s.node_id, "pid": s.pid, "sub_id": s.sub_id}
            for s in snap["subscriptions"]
        ]

    def __repr__(self) -> str:
        return f"CommunicationBus({self.name!r}, running={self.is_running})"


def _as_message(message: Any) -> Message:
    if isinstance(message, Message):
        return message
    if isinstance(message, dict):
        try:
            return Message(**message)
        except pydantic.ValidationError as e:
            fields = ", ".join(".".join(map(str, d["loc"])) + ": " + d["msg"] for d in e.errors(include_url=False))
            raise ValidationError(
                f"invalid message: {fields}", [dict(d) for d in e.errors(include_url=False)]
            ) from None
    raise InvalidCallArgument(f"route_message takes a Message or a dict, got {type(message).__name__}")


_buses: dict[str, CommunicationBus] = {}
_buses_lock = threading.Lock()


def get_communication_bus(name: str = "default") -> CommunicationBus:
    """The bus called ``name`` (one object per name in this process).

    Unlike the original code, the name is honoured: ``get_communication_bus("a")`` and
    ``get_communication_bus("b")`` are different, isolated buses.
    """
    validate_bus_name(name)
    with _buses_lock:
        bus = _buses.get(name)
        if bus is None:
            bus = _buses[name] = CommunicationBus(name)
        return bus


class ServiceManager:
    """The services this process runs or deployed on one bus (the original code's manager).

    >>> mgr = get_service_manager()                              # doctest: +SKIP
    >>> mgr.register_service(MyService())       # starts it in this process
    >>> mgr.register_service(Calculator)        # deploys its replicas as actors
    >>> mgr.list_services(); mgr.stop_all()
    """

    def __init__(self, bus: str = "default") -> None:
        self.bus = validate_bus_name(bus)
        self._services: dict[str, Any] = {}  # name -> BaseService (in process) or ServiceHandle
        self._lock = threading.Lock()

    def register_service(self, service: Any, **deploy_options: Any) -> Any:
        """Starts a BaseService instance here and returns its service id (as the
        original API did), or deploys a service class and returns its
        :class:`~sage_ray_comm.ServiceHandle`."""

        held: BaseService | ServiceHandle
        if isinstance(service, BaseService):
            service.start(bus=self.bus)
            name, held = service.service_name, service
            with self._lock:
                self._services[name] = held
            return service.service_id
        elif isinstance(service, type) and issubclass(service, BaseService):
            handle = service.deploy(bus=self.bus, **deploy_options)
            name, held = handle.name, handle
        else:
            raise InvalidServiceDefinition(
                f"register_service takes a BaseService instance or class, got {type(service).__name__}"
            )
        with self._lock:
            self._services[name] = held
        return held

    def unregister_service(self, name: str) -> bool:
        """Stops (or shuts down) the named service; False if this manager does not hold it."""
        with self._lock:
            held = self._services.pop(name, None)
        if held is None:
            return False
        (held.stop if hasattr(held, "stop") else held.shutdown)()
        return True

    def get_service(self, name: str) -> Any:
        held = self._services.get(name)
        if held is None:
            raise ServiceNotFound(
                f"this process's service manager on bus '{self.bus}' holds no service '{name}'; "
                f"it holds: {', '.join(sorted(self._services)) or '(none)'}"
            )
        return held

    def list_services(self) -> list[str]:
        return sorted(self._services)

    def stop_all(self) -> None:
        for name in list(self._services):
            self.unregister_service(name)

    def get_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, held in list(self._services.items()):
            out[name] = held.get_stats() if hasattr(held, "get_stats") else held.stats()
        return out


_managers: dict[str, ServiceManager] = {}


def get_service_manager(bus: str = "default") -> ServiceManager:
    """This process's :class:`ServiceManager` for ``bus``."""
    validate_bus_name(bus)
    with _buses_lock:
        m = _managers.get(bus)
        if m is None:
            m = _managers[bus] = ServiceManager(bus)
        return m
