"""A full pipeline: a source, a load-balanced stage, a stateful aggregator, pub/sub events.

python examples/data_pipeline.py

source (this script) --call_async--> clean (2 replicas) --call--> totals (stateful)
                                                                     \\--publish--> orders.large
"""

from __future__ import annotations

import queue
import sys

import ray

from sage_ray_comm import BaseService, FunctionClient, get_communication_bus, sage_service, service_function


@sage_service(name="clean", replicas=2, num_cpus=0.1)
class Clean(BaseService):
    @service_function
    def process(self, order: dict) -> dict:
        order = {
            "id": order["id"],
            "customer": order["customer"].strip().lower(),
            "amount": round(float(order["amount"]), 2),
        }
        self.call_service["totals"].add(order)  # a service calling a service
        return order


@sage_service(name="totals", num_cpus=0.1, max_concurrency=1)  # one thread: the totals are plain dicts
class Totals(BaseService):
    def initialize(self):
        self.by_customer: dict = {}

    @service_function
    def add(self, order: dict) -> None:
        c = order["customer"]
        self.by_customer[c] = round(self.by_customer.get(c, 0.0) + order["amount"], 2)
        if order["amount"] >= 900:
            self.broadcast("orders.large", order)

    @service_function
    def report(self) -> dict:
        return dict(sorted(self.by_customer.items()))


def main() -> int:
    ray.init(include_dashboard=False, log_to_driver=False)  # joins a running cluster, else starts one
    bus = get_communication_bus("example-pipeline").start()
    Clean.deploy(bus=bus.name)
    Totals.deploy(bus=bus.name)
    large = queue.Queue()
    bus.subscribe("orders.large", large.put)
    client = FunctionClient(bus=bus.name)

    orders = [{"id": i, "customer": f"  Customer{i % 5} ", "amount": (i * 37) % 1000} for i in range(1000)]
    futures = [client.call_async("clean", "process", o) for o in orders]
    cleaned = [f.result(timeout=60) for f in futures]

    report = client.call("totals", "report")
    expected = {}
    for o in orders:
        c = o["customer"].strip().lower()
        expected[c] = round(expected.get(c, 0.0) + o["amount"], 2)
    n_large = sum(1 for o in orders if o["amount"] >= 900)
    got_large = [large.get(timeout=30) for _ in range(n_large)]
    per_replica = {k: v for k, v in client.stats()["by_instance"].items() if k.startswith("clean#")}
    print(f"cleaned {len(cleaned)} orders; per replica: {per_replica}")
    print(f"totals: {report}")
    print(f"large orders announced: {len(got_large)}")
    ok = (
        report == expected and len(got_large) == n_large and len(per_replica) == 2 and sum(per_replica.values()) == 1000
    )
    print("OK" if ok else "MISMATCH")
    client.close()
    bus.shutdown()
    ray.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
