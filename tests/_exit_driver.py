"""A driver that leaves one kind of library object alive and just ends.

    python _exit_driver.py KIND BUS [--explicit-shutdown]

It starts its own local Ray, uses the object for real (and prints OK), then
ends without closing anything, optionally after calling ``ray.shutdown()``
itself. tests/test_lifecycle.py runs it with output redirected and checks the
exit status, the output and what is left in /dev/shm.
"""

from __future__ import annotations

import sys
import threading
import time

import ray

from sage_ray_comm import (
    BaseService,
    FunctionClient,
    LegacyQueueAdapter,
    create_queue_adapter,
    get_communication_bus,
    sage_service,
    service_function,
)

kind, bus = sys.argv[1], sys.argv[2]
explicit = "--explicit-shutdown" in sys.argv[3:]

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


@sage_service(name="echo", replicas=2, num_cpus=0.1)
class Echo(BaseService):
    @service_function
    def echo(self, x):
        return x

    @service_function
    def count(self, n: int):
        yield from range(n)

    @service_function
    def slow(self, seconds: float):
        time.sleep(seconds)  # a call still running when the driver ends
        return seconds


class Local(BaseService):
    @service_function
    def twice(self, x: int) -> int:
        return 2 * x


keep = []
if kind == "adapter":
    q = create_queue_adapter("jobs", bus=bus)
    q.put({"id": 1})
    assert q.get(timeout=10) == {"id": 1}
    keep.append(q)
elif kind == "bridge":
    Echo.deploy(bus=bus)
    q = LegacyQueueAdapter("old", bus=bus)
    got, arrived = [], threading.Event()
    keep.append(q.bridge_to_topic("old.items"))
    bus_obj = get_communication_bus(bus)
    bus_obj.subscribe("old.>", lambda p: (got.append(p), arrived.set()))
    bus_obj.wait_for_subscribers("old.items")
    q.put("item")
    assert arrived.wait(20) and got == ["item"], got
    keep.append(q)
elif kind == "subscription":
    b = get_communication_bus(bus).start()
    got, arrived = [], threading.Event()
    b.subscribe("t.>", lambda p: (got.append(p), arrived.set()))
    assert b.publish("t.x", 1) == 1
    assert arrived.wait(20) and got == [1], got
elif kind == "inproc":
    svc = Local("local").start(bus=bus)
    assert FunctionClient(bus=bus).call("local", "twice", 21) == 42
    keep.append(svc)
elif kind == "deployed":
    Echo.deploy(bus=bus)
    assert FunctionClient(bus=bus).call("echo", "echo", "hi") == "hi"
elif kind == "pending":
    Echo.deploy(bus=bus)
    c = FunctionClient(bus=bus)
    assert c.call("echo", "echo", 1) == 1
    keep.append(c.call_async("echo", "slow", 1.0))  # still running at exit
elif kind == "client":
    Echo.deploy(bus=bus)
    keep.append(FunctionClient(bus=bus))
    assert keep[-1].call("echo", "echo", 2) == 2
elif kind == "stream":
    # A stream left open: its handle is dropped only when the interpreter ends.
    Echo.deploy(bus=bus)
    keep.append(FunctionClient(bus=bus).stream("echo", "count", 1_000_000))
    assert next(keep[-1]) == 0
elif kind == "private":
    # A client with a transport of its own keeps a registry watcher of its
    # own; its bus then ends, so the watcher is retrying when Ray goes.
    from sage_ray_comm.testing import FakeTransport

    Echo.deploy(bus=bus)
    fake = FakeTransport()
    keep.append(FunctionClient(bus=bus, transport=lambda node: fake))
    assert keep[-1].call("echo", "echo", 3) == 3 and fake.calls
    get_communication_bus(bus).shutdown()
else:
    raise SystemExit(f"unknown kind {kind}")

print(f"OK {kind}", flush=True)
if explicit:
    ray.shutdown()
    print("ray.shutdown() returned", flush=True)
    # The library's threads that hold Ray objects end on their own; one that
    # touched Ray after the shutdown would start a new Ray (auto-init), and
    # Ray would then end this process with status 1.
    held = [t for t in threading.enumerate() if t.name.startswith(("sage-registry", "sage-hb", "sage-metrics"))]
    for t in held:
        t.join(timeout=10)
    print("threads left:", sorted(t.name for t in held if t.is_alive()), flush=True)
    # Dropping what it kept must not touch Ray again (that would start a new one).
    import gc

    keep.clear()
    gc.collect()
    print("ray after dropping them:", ray.is_initialized(), flush=True)
