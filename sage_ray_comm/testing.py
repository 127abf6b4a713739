"""Fakes for testing code that calls services, without Ray or shared memory,
as httpx ships ``MockTransport``.

- :class:`FakeTransport` stands in for the transports: it records each call,
  answers with a handler you give it, and can be told that replicas are dead
  or that subscribers are full.
- :class:`FakeRouter` stands in for a bus's router: a real in-memory
  :class:`~sage_ray_comm.router.Registry` (the same code the router actor
  runs), filled by the test.

>>> from sage_ray_comm import FunctionClient
>>> from sage_ray_comm.testing import FakeRouter, FakeTransport
>>> fake = FakeTransport(handler=lambda inst, req: f"{inst.instance_id}: {req.args[0]}")
>>> router = FakeRouter("b").add_replica("echo", "echo-1", functions=["say"])
>>> client = FunctionClient(bus="b", transport=lambda node: fake, router=router)
>>> client.call("echo", "say", "hi")
'echo-1: hi'
>>> [(iid, req.function) for iid, req, _ in fake.calls]
[('echo-1', 'say')]

The real transports are tested against real processes in the package's own
suite; a test of yours that needs them runs a real local Ray instead.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from . import shm
from ._wire import ST_OK, Reply, Request
from .errors import ServiceUnavailable
from .router import FunctionInfo, InstanceInfo, Registry, Subscription
from .transport import Finish, Transport, settle

__all__ = ["FakeRouter", "FakeTransport"]


def _echo(inst: InstanceInfo, req: Request) -> Any:
    return req.args[0] if isinstance(req.args, tuple) and len(req.args) == 1 else req.args


class FakeTransport(Transport):
    """A transport that answers calls in this process.

    ``handler(instance, request)`` gives a call's value (default: its one
    argument, or the tuple of them); an exception it raises is the call's.
    Replicas whose ids are in ``dead`` raise ServiceUnavailable; subscribers
    whose ids are in ``full`` refuse events.

    Recorded: ``calls`` (instance id, request, timeout) for calls and sends,
    ``delivered`` (subscription id, request) for events.
    """

    def __init__(self, name: str = "fake", handler: Callable[[InstanceInfo, Request], Any] | None = None) -> None:
        self.name = name
        self.handler = handler or _echo
        self.calls: list[tuple[str, Request, float]] = []
        self.delivered: list[tuple[str, Request]] = []
        self.dead: set[str] = set()
        self.full: set[str] = set()
        self._lock = threading.Lock()

    def call(self, inst: InstanceInfo, req: Request, timeout: float) -> Reply:
        with self._lock:
            self.calls.append((inst.instance_id, req, timeout))
        if inst.instance_id in self.dead:
            raise ServiceUnavailable(f"replica {inst.instance_id} of service '{inst.service}' is dead (FakeTransport)")
        return Reply(req.cid, ST_OK, self.handler(inst, req))

    def call_async(self, inst: InstanceInfo, req: Request, timeout: float, finish: Finish) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            rep, exc = self.call(inst, req, timeout), None
        except Exception as e:
            rep, exc = None, e
        settle(fut, finish, rep, exc)
        return fut

    def send(self, inst: InstanceInfo, req: Request, timeout: float) -> None:
        with self._lock:
            self.calls.append((inst.instance_id, req, timeout))
        if inst.instance_id in self.dead:
            raise ServiceUnavailable(f"replica {inst.instance_id} of service '{inst.service}' is dead (FakeTransport)")

    def deliver(self, sub: Subscription, req: Request) -> bool:
        if sub.sub_id in self.full:
            return False
        with self._lock:
            self.delivered.append((sub.sub_id, req))
        return True


class FakeRouter:
    """A bus registry in this process, with the methods the client uses of
    :class:`~sage_ray_comm._ray.RouterClient`. Replicas never expire."""

    def __init__(self, bus: str = "default") -> None:
        self.registry = Registry(bus)
        self._lock = threading.Lock()
        self._waiters: list[tuple[int, concurrent.futures.Future]] = []

    # -- filling it
    def add_replica(
        self,
        service: str,
        instance_id: str,
        functions: Iterable[str | FunctionInfo] = (),
        *,
        node_id: str | None = None,
        policy: str = "least_outstanding",
    ) -> FakeRouter:
        """Registers a replica (``functions``: names, or FunctionInfo for
        timeouts and idempotence); returns the router, for chaining."""
        infos = {}
        for f in functions:
            info = f if isinstance(f, FunctionInfo) else FunctionInfo(f, None)
            infos[info.name] = info
        pid = os.getpid()
        self.register(
            InstanceInfo(
                service=service,
                instance_id=instance_id,
                class_id=f"fake:{service}",
                node_id=node_id,
                host_id=shm.host_id(),
                pid=pid,
                pid_start=0,
                request_queue=f"fake.{instance_id}",
                functions=infos,
                policy=policy,
            )
        )
        return self

    def _changed(self) -> None:
        snap = self.registry.snapshot()
        with self._lock:
            ready = [f for v, f in self._waiters if snap["version"] != v]
            self._waiters = [(v, f) for v, f in self._waiters if snap["version"] == v]
        for f in ready:
            if not f.done():
                f.set_result(snap)

    # -- RouterClient's methods
    def register(self, inst: InstanceInfo, replace: bool = False, timeout: float | None = None) -> int:
        with self._lock:
            v = self.registry.register(inst, replace)
        self._changed()
        return v

    def deregister(self, instance_id: str, timeout: float | None = None) -> bool:
        with self._lock:
            ok = self.registry.deregister(instance_id)
        self._changed()
        return ok

    def heartbeat(self, instance_id: str, load: dict | None, timeout: float | None = None) -> bool:
        with self._lock:
            return self.registry.heartbeat(instance_id, load)

    def subscribe(self, sub: Subscription, timeout: float | None = None) -> int:
        with self._lock:
            v = self.registry.subscribe(sub)
        self._changed()
        return v

    def unsubscribe(self, sub_id: str, timeout: float | None = None) -> bool:
        with self._lock:
            ok = self.registry.unsubscribe(sub_id)
        self._changed()
        return ok

    def snapshot(self, timeout: float | None = None) -> dict:
        with self._lock:
            return self.registry.snapshot()

    def wait_for_change(self, version: int, poll_seconds: float) -> concurrent.futures.Future:
        """A future of the next snapshot whose version is not ``version``."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            snap = self.registry.snapshot()
            if snap["version"] != version:
                fut.set_result(snap)
            else:
                self._waiters.append((version, fut))
        return fut
