"""Views of a registry snapshot for people and for the original API's
shapes: ``bus.services()``, ``sage-comm status`` and the client's
``list_services()``, ``list_functions()`` and ``function_signatures()``.
Pure functions of the snapshot the router returns.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import ServiceNotFound
from .router import HEARTBEAT_GRACE

__all__ = ["RegistryViews", "function_index", "function_signatures", "replica_rows", "service_list"]


def replica_rows(snap: dict, now: float | None = None) -> list[dict]:
    """One row per replica of a registry snapshot, for people: ``bus.services()``
    returns them and ``sage-comm status`` prints them. A replica is shown
    alive while its last heartbeat is within :data:`HEARTBEAT_GRACE`."""
    now = time.time() if now is None else now
    rows = []
    for name, insts in sorted(snap["services"].items()):
        for inst in sorted(insts.values(), key=lambda i: (i.replica_index, i.instance_id)):
            load = snap["load"].get(inst.instance_id, {})
            seen = snap["last_seen"].get(inst.instance_id)
            rows.append(
                {
                    "service": name,
                    "instance": inst.instance_id,
                    "actor": inst.actor_name,
                    "replica": (inst.actor_name or inst.instance_id).split(":")[-1],
                    "node": inst.node_id,
                    "pid": inst.pid,
                    "functions": sorted(inst.functions),
                    "alive": seen is not None and now - seen < HEARTBEAT_GRACE,
                    "last_seen_s": None if seen is None else round(now - seen, 3),
                    "in_flight": load.get("in_flight", 0),
                    "queued": load.get("queued", 0),
                    "streams": load.get("streams", 0),
                    "calls": load.get("calls", 0),
                    "handled": load.get("calls", 0) + load.get("sends", 0) + load.get("events", 0),
                    "errors": load.get("errors", 0),
                }
            )
    return rows


def service_list(snap: dict, bus: str) -> list[dict[str, Any]]:
    """One dict per service: ``{"service_id", "service_name", "functions", "metadata"}``."""
    out = []
    for name, insts in sorted(snap["services"].items()):
        reps = sorted(insts.values(), key=lambda i: i.instance_id)
        if not reps:
            continue
        first = reps[0]
        out.append(
            {
                "service_id": first.instance_id,
                "service_name": name,
                "functions": sorted(first.functions),
                "metadata": {
                    "replicas": len(reps),
                    "instances": [i.instance_id for i in reps],
                    "nodes": sorted({i.node_id for i in reps if i.node_id}),
                    "pids": [i.pid for i in reps],
                    "class": first.class_id,
                    "policy": first.policy,
                    "bus": bus,
                },
            }
        )
    return out


def function_index(snap: dict) -> dict[str, list[str]]:
    """``{function_name: [service_id, ...]}``: which replicas expose each function."""
    out: dict[str, list[str]] = {}
    for insts in snap["services"].values():
        for inst in sorted(insts.values(), key=lambda i: i.instance_id):
            for fn in inst.functions:
                out.setdefault(fn, []).append(inst.instance_id)
    return out


def function_signatures(snap: dict) -> dict[str, dict[str, str]]:
    """``{service: {function: signature}}``, read from one replica of each service."""
    return {
        name: {f.name: f.signature for inst in list(insts.values())[:1] for f in inst.functions.values()}
        for name, insts in snap["services"].items()
    }


class RegistryViews:
    """The registry views of a :class:`~sage_ray_comm.FunctionClient` (it
    inherits them): each re-reads the registry through ``self.endpoint``."""

    bus: str
    endpoint: Any

    def list_services(self) -> list[dict[str, Any]]:
        """The services on the bus, as the original API listed them: one dict
        per service, ``{"service_id", "service_name", "functions", "metadata"}``.

        ``service_id`` is the id of its first replica; ``metadata`` has every
        replica's id, node and pid, and the class.

        >>> client.list_services()                       # doctest: +SKIP
        [{'service_id': 'calc#1-1a2b3c', 'service_name': 'calc', 'functions': ['add'], 'metadata': {...}}]
        """
        return service_list(self.endpoint.refresh(), self.bus)

    def list_functions(self) -> dict[str, list[str]]:
        """``{function_name: [service_id, ...]}``: which replicas expose each
        function (the original API's shape)."""
        return function_index(self.endpoint.refresh())

    def service_names(self) -> list[str]:
        """Names of the services registered on the bus, sorted."""
        return sorted(self.endpoint.refresh()["services"])

    def function_signatures(self, service: str | None = None) -> dict[str, Any]:
        """``{service: {function: signature}}`` (or just one service's dict)."""
        out = function_signatures(self.endpoint.refresh())
        if service is None:
            return out
        if service not in out:
            raise ServiceNotFound(
                f"no service '{service}' on bus '{self.bus}'; known services: {', '.join(sorted(out)) or '(none)'}"
            )
        return out[service]

    def refresh(self) -> None:
        """Re-reads the registry from the router now."""
        self.endpoint.refresh()
