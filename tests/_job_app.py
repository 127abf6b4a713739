"""Ray job entrypoints for tests/test_ray_jobs.py (`python _job_app.py WHAT BUS [ARGS]`).

Each is what a user's job would do. Every job starts with a bare
``ray.init()`` or none at all (the bus finds the cluster), and ends without
closing anything: the library must leave the job SUCCEEDED.
"""

from __future__ import annotations

import os
import sys
import time

import ray

from sage_ray_comm import (
    BaseService,
    FunctionClient,
    ServiceNotFound,
    get_communication_bus,
    sage_service,
    service_function,
)

what, bus = sys.argv[1], sys.argv[2]
args = sys.argv[3:]


@sage_service(name="keeper", num_cpus=0.1, lifetime="detached")
class Keeper(BaseService):
    """Outlives the job that deployed it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    @service_function
    def hello(self, who: str) -> str:
        self.seen.append(who)
        return f"hello {who}, I have met {len(self.seen)}"


@sage_service(name="worker", replicas=2, num_cpus=0.1)
class Worker(BaseService):
    """Owned by its job: it ends with it."""

    @service_function
    def square(self, x: int) -> int:
        return x * x


def barrier(folder: str, me: str, other: str, timeout: float = 120.0) -> None:
    """Two jobs at once: each says it is ready and waits for the other."""
    open(os.path.join(folder, f"ready-{me}"), "w").close()
    end = time.monotonic() + timeout
    while not os.path.exists(os.path.join(folder, f"ready-{other}")):
        assert time.monotonic() < end, f"job {other} never got ready"
        time.sleep(0.05)  # another job's progress: nothing in-process to block on


if what == "deploy-and-call":
    ray.init()
    Worker.deploy(bus=bus)
    c = FunctionClient(bus=bus)
    print("RESULT squares", [c.call("worker", "square", i) for i in range(5)], flush=True)
elif what == "deploy-detached":
    get_communication_bus(bus).start()  # no ray.init(): the bus attaches to the job's cluster
    Keeper.deploy(bus=bus)
    print("RESULT", FunctionClient(bus=bus).call("keeper", "hello", "job1"), flush=True)
elif what == "call-keeper":
    ray.init(address="auto")
    print("RESULT", FunctionClient(bus=bus).call("keeper", "hello", "job2"), flush=True)
elif what == "deploy-and-hang":
    ray.init()
    Worker.deploy(bus=bus)
    print("RESULT deployed", flush=True)
    time.sleep(600)  # stopped by the test (ray job stop): its services go with it
elif what == "expect-gone":
    ray.init()
    t0 = time.monotonic()
    try:
        FunctionClient(bus=bus, timeout=5).call("worker", "square", 3)
        print("RESULT still there", flush=True)
    except ServiceNotFound as e:
        print(f"RESULT ServiceNotFound after {time.monotonic() - t0:.2f} s: {e}", flush=True)
elif what == "twin":  # twin BUS NAME OTHER FOLDER: two jobs at once
    name, other, folder = args
    ray.init()

    @sage_service(name="same", num_cpus=0.1)
    class Same(BaseService):
        @service_function
        def who(self) -> str:
            return name

    Same.deploy(bus=bus)
    barrier(folder, name, other)
    c = FunctionClient(bus=bus)
    print("RESULT", name, "sees", c.call("same", "who"), [s["service_name"] for s in c.list_services()], flush=True)
    barrier(folder, name + "-done", other + "-done")  # keep serving until the twin has called
elif what == "shutdown":
    ray.init(address="auto")
    get_communication_bus(bus).shutdown()
    print("RESULT bus shut down", flush=True)
else:
    raise SystemExit(f"unknown job {what}")
