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
from typing import Any, Callable, Dict, List, Optional

from .client import FunctionClient, _Endpoint
from .router import validate_bus_name

__all__ = ["CommunicationBus", "get_communication_bus"]


class CommunicationBus:
    """A bus as seen from this process. Get one with :func:`get_communication_bus`."""

    def __init__(self, name: str = "default") -> None:
        self.name = validate_bus_name(name)
        self._client: Optional[FunctionClient] = None
        self._lock = threading.Lock()

    # -- lifecycle
    def start(self) -> "CommunicationBus":
        """Finds or creates the bus's router (starting a local Ray if needed). Idempotent."""
        with self._lock:
            if self._client is None or self._client._closed:
                self._client = FunctionClient(client_id=f"bus:{self.name}", bus=self.name)
                self._client.endpoint  # noqa: B018  (connects now, so errors surface here)
        return self

    @property
    def client(self) -> FunctionClient:
        """The bus's own FunctionClient (started on first use)."""
        if self._client is None or self._client._closed:
            self.start()
        return self._client  # type: ignore[return-value]

    def stop(self) -> None:
        """Drops this process's subscriptions and rings on the bus. Services keep running."""
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            c.close()

    def shutdown(self) -> None:
        """Ends the bus: stops the services this process deployed on it, drops
        this process's rings, and kills the router (its registry goes with it)."""
        import ray

        from .router import ROUTER_NAMESPACE, router_name
        from .service import deployed

        for h in deployed(self.name):
            h.shutdown()
        self.stop()
        ep = _Endpoint._by_bus.get(self.name)
        if ep is not None:
            ep.close()
        if ray.is_initialized():
            from .router import bus_namespace
            from .transport import forget_bus_on_gateways

            forget_bus_on_gateways(bus_namespace(self.name))
            try:
                ray.kill(ray.get_actor(router_name(self.name), namespace=ROUTER_NAMESPACE), no_restart=True)
            except ValueError:
                pass  # no router: nothing to end

    @property
    def is_running(self) -> bool:
        return self._client is not None and not self._client._closed

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

    # -- registry view
    def services(self) -> List[Dict[str, Any]]:
        """One row per replica: service, instance, node, functions, liveness, load."""
        snap = self.client.endpoint.refresh()
        now = time.time()
        rows = []
        for name, insts in sorted(snap["services"].items()):
            for inst in sorted(insts.values(), key=lambda i: i.instance_id):
                load = snap["load"].get(inst.instance_id, {})
                seen = snap["last_seen"].get(inst.instance_id)
                rows.append(
                    {
                        "service": name,
                        "instance": inst.instance_id,
                        "actor": inst.actor_name,
                        "node": inst.node_id,
                        "pid": inst.pid,
                        "functions": sorted(inst.functions),
                        "alive": seen is not None and now - seen < 3.0,
                        "last_seen_s": None if seen is None else round(now - seen, 3),
                        "in_flight": load.get("in_flight", 0),
                        "queued": load.get("queued", 0),
                        "calls": load.get("calls", 0),
                        "errors": load.get("errors", 0),
                    }
                )
        return rows

    def subscriptions(self) -> List[Dict[str, Any]]:
        snap = self.client.endpoint.refresh()
        return [
            {"pattern": s.pattern, "group": s.group, "node": s.node_id, "pid": s.pid, "sub_id": s.sub_id}
            for s in snap["subscriptions"]
        ]

    def __repr__(self) -> str:
        return f"CommunicationBus({self.name!r}, running={self.is_running})"


_buses: Dict[str, CommunicationBus] = {}
_buses_lock = threading.Lock()


def get_communication_bus(name: str = "default") -> CommunicationBus:
    """The bus called ``name`` (one object per name in this process).

    Unlike the seed, the name is honoured: ``get_communication_bus("a")`` and
    ``get_communication_bus("b")`` are different, isolated buses.
    """
    validate_bus_name(name)
    with _buses_lock:
        bus = _buses.get(name)
        if bus is None:
            bus = _buses[name] = CommunicationBus(name)
        return bus
