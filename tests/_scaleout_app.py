"""Run by tests/test_multinode.py in its own process: a three-raylet cluster
on this machine with a replica and a caller on every node, and a skewed load.
Prints one JSON line of observations; the test asserts on it."""

from __future__ import annotations

import collections
import json
import os
import sys
import time

import ray
from ray.cluster_utils import Cluster

from sage_ray_comm import BaseService, FunctionClient, get_communication_bus, sage_service, service_function

WORK_SECONDS = 0.02  # each call's work: enough for calls to queue at a replica
HEAVY_IN_FLIGHT = 24  # the busy caller keeps this many calls in flight
HEAVY_ROUNDS = 8
LIGHT_CALLS = 30  # the other callers, one call at a time


@sage_service(name="loc", replicas=3, num_cpus=0.1, max_concurrency=2, scheduling_strategy="SPREAD")
class Loc(BaseService):
    @service_function
    def work(self) -> str:
        time.sleep(WORK_SECONDS)  # the work itself
        return ray.get_runtime_context().get_node_id()


def heavy(bus: str) -> dict:
    """Many calls in flight at once: the local replica's queue grows, and the
    overflow must spill to the other nodes."""
    with FunctionClient(bus=bus) as c:
        got: collections.Counter = collections.Counter()
        for _ in range(HEAVY_ROUNDS):
            futs = [c.call_async("loc", "work") for _ in range(HEAVY_IN_FLIGHT)]
            got.update(f.result(timeout=60) for f in futs)
        return {"node": ray.get_runtime_context().get_node_id(), "got": dict(got)}


def light(bus: str) -> dict:
    with FunctionClient(bus=bus) as c:
        got = collections.Counter(c.call("loc", "work") for _ in range(LIGHT_CALLS))
        return {"node": ray.get_runtime_context().get_node_id(), "got": dict(got)}


def main() -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2, resources={f"node{i}": 1}) for i in (1, 2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    bus_name = f"scaleout-{os.getpid()}"
    bus = get_communication_bus(bus_name).start()
    handle = Loc.deploy(bus=bus_name)
    out: dict = {
        "head": ray.get_runtime_context().get_node_id(),
        "workers": [n.node_id for n in nodes],
        "replica_nodes": sorted(i.node_id for i in handle.instances),
    }
    # The busy caller on the head (this driver); light callers on each worker.
    light_remote = ray.remote(num_cpus=0.1)(light)
    refs = [light_remote.options(resources={f"node{i}": 0.01}).remote(bus_name) for i in (1, 2)]
    out["heavy"] = heavy(bus_name)
    out["light"] = ray.get(refs, timeout=120)
    handle.shutdown()
    bus.shutdown()
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
