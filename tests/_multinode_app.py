"""Run by tests/test_multinode.py in its own process: a two-raylet cluster on
this machine, services on both nodes, calls and events across them. Prints
one JSON line of observations; the test asserts on it."""

from __future__ import annotations

import json
import os
import queue
import sys

import numpy as np
import ray
from _wait import wait_for
from ray.cluster_utils import Cluster

from sage_ray_comm import (
    BaseService,
    FunctionClient,
    FunctionNotFound,
    get_communication_bus,
    sage_service,
    service_function,
    shm,
)
from sage_ray_comm.router import bus_namespace
from sage_ray_comm.service import subscribe


@sage_service(name="far", num_cpus=0.1, resources={"worker_node": 0.01})
class Far(BaseService):
    @service_function
    def where(self):
        return ray.get_runtime_context().get_node_id()

    @service_function
    def echo(self, x):
        return x

    @service_function
    def div(self, a, b):
        return a / b

    @service_function
    def count(self, n: int):
        yield from range(n)


@sage_service(name="spread", replicas=2, num_cpus=0.1, scheduling_strategy="SPREAD")
class Spread(BaseService):
    """One replica per node: callers must prefer the one on their own node."""

    @service_function
    def where(self):
        return ray.get_runtime_context().get_node_id()


class _Fan(BaseService):
    def initialize(self):
        self.got = 0

    @service_function
    def got_so_far(self) -> int:
        return self.got


@sage_service(name="fan1", num_cpus=0.1, resources={"worker_node": 0.01})
class Fan1(_Fan):
    @subscribe("fan.>")
    def on_fan(self, payload):
        self.got += 1


@sage_service(name="fan2", num_cpus=0.1, resources={"worker_node": 0.01})
class Fan2(_Fan):
    @subscribe("fan.>")
    def on_fan(self, payload):
        self.got += 1


class Near(BaseService):
    @service_function
    def where(self):
        return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0.1, resources={"worker_node": 0.01})
def caller_on_worker(bus: str) -> dict:
    from sage_ray_comm import FunctionClient

    with FunctionClient(bus=bus) as c:
        far = c.call("far", "where")
        near = c.call("near", "where")
        delivered = c.broadcast("events.from_worker", {"node": ray.get_runtime_context().get_node_id()})
        s = c.stats()
        spread = sorted({c.call("spread", "where") for _ in range(20)})
    return {
        "far": far,
        "near": near,
        "shm": s["shm"],
        "ray": s["ray"],
        "delivered": delivered,
        "node": ray.get_runtime_context().get_node_id(),
        "spread": spread,
    }


def main() -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, resources={"worker_node": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    head_id = ray.get_runtime_context().get_node_id()
    bus_name = f"multinode-{os.getpid()}"
    out: dict = {"head": head_id, "worker": worker.node_id}
    bus = get_communication_bus(bus_name).start()
    got = queue.Queue()
    bus.subscribe("events.>", lambda payload: got.put(payload))
    Far.deploy(bus=bus_name)
    spread = Spread.deploy(bus=bus_name)
    out["spread_nodes"] = sorted(i.node_id for i in spread.instances)
    near = Near("near").start(bus=bus_name)
    client = FunctionClient(bus=bus_name)

    out["far_node"] = client.call("far", "where")
    out["after_far"] = dict(client.stats())
    out["near_node"] = client.call("near", "where")
    out["after_near"] = dict(client.stats())
    # the asynchronous forms across nodes (Ray's future of the gateway call)
    import asyncio

    out["far_async"] = client.call_async("far", "echo", "async").result(timeout=60)
    out["far_acall"] = asyncio.run(client.acall("far", "echo", "acall"))
    # A stream across nodes: its fetches go over Ray, straight to the replica.
    before = client.stats()["ray"]
    out["stream_ok"] = list(client.stream("far", "count", 5000, window=64)) == list(range(5000))
    out["stream_ray_calls"] = client.stats()["ray"] - before
    # Pipelined across nodes: beyond the replica's handler threads, calls go in batches.
    futs = [client.call_async("far", "echo", i) for i in range(600)]
    out["pipelined_ok"] = [f.result(timeout=120) for f in futs] == list(range(600))
    out["pipelined_counts"] = dict(client.endpoint.direct.counts)
    big = np.arange(3 << 20, dtype=np.float64)  # 24 MiB: Ray's object store carries it
    out["big_ok"] = bool(np.array_equal(client.call("far", "echo", big), big))
    try:
        client.call("far", "div", 1, 0)
    except ZeroDivisionError as e:
        out["remote_error"] = type(e).__mro__[1].__name__ + ":" + e.remote_type
    try:
        client.call("far", "nope")
    except FunctionNotFound as e:
        out["function_not_found"] = str(e)
    out["spread_from_head"] = sorted({client.call("spread", "where") for _ in range(20)})
    out["worker_caller"] = ray.get(caller_on_worker.remote(bus_name), timeout=120)
    out["event"] = got.get(timeout=60)
    # Each node got its janitor from the library (looked up, never created here).
    from sage_ray_comm.names import gateway_name
    from sage_ray_comm.ray_transport import GATEWAY_NAMESPACE

    out["janitors"] = {}
    for node in (head_id, worker.node_id):
        try:
            gw = ray.get_actor(gateway_name(node), namespace=GATEWAY_NAMESPACE)
            out["janitors"][node] = ray.get(gw.janitor_stats.remote(), timeout=60)["interval"]
        except ValueError:
            out["janitors"][node] = None
    from sage_ray_comm.router import ROUTER_NAMESPACE, router_name

    router = ray.get_actor(router_name(bus_name), namespace=ROUTER_NAMESPACE)
    out["router_node"] = ray.get(router.ping.remote(), timeout=60)["node_id"]
    worker_gw = ray.get_actor(gateway_name(worker.node_id), namespace=GATEWAY_NAMESPACE)
    head_gw = ray.get_actor(gateway_name(head_id), namespace=GATEWAY_NAMESPACE)
    # One hop: every call to "far" (a deployed replica) went straight to its
    # actor; the head's gateway served the worker's call to "near" (in-process).
    out["worker_gateway_calls"] = ray.get(worker_gw.stats.remote(), timeout=60)["calls"]
    out["head_gateway_calls"] = ray.get(head_gw.stats.remote(), timeout=60)["calls"]
    # Pub/sub across nodes: one frame per node, fanned out there.
    Fan1.deploy(bus=bus_name)
    Fan2.deploy(bus=bus_name)
    client.wait_for_subscribers("fan.x", 2)
    before = ray.get(worker_gw.stats.remote(), timeout=60)
    out["fan_published"] = [client.publish("fan.x", i) for i in range(5)]
    out["fan_got"] = wait_for(
        lambda: [client.call(s, "got_so_far") for s in ("fan1", "fan2")] == [5, 5] and [5, 5], 60, "fan-out"
    )
    after = ray.get(worker_gw.stats.remote(), timeout=60)
    out["fan_frames"] = after["event_frames"] - before["event_frames"]
    out["fan_delivered"] = after["events_delivered"] - before["events_delivered"]
    near.stop()
    client.close()
    bus.shutdown()
    out["leaked"] = [s.shm_name for s in shm.list_segments(bus_namespace(bus_name))]
    print("RESULT " + json.dumps(out, default=str), flush=True)
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
