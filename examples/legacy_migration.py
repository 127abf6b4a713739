"""Migrating queue-style code in three stages, with the pipeline working at each.

    python examples/legacy_migration.py

1. adapter only: the old code swaps SageQueue("orders") for create_queue_adapter("orders").
2. mixed: the consumer becomes a service (migrate_service) that still drains the queue,
   and new producers call it directly.
3. migrated: everyone calls the service.
"""

from __future__ import annotations

import sys
import threading
import time

import ray

from sage_ray_comm import FunctionClient, QueueEmpty, create_queue_adapter, get_communication_bus, migrate_service


class OrderConsumer:
    """The legacy consumer: unchanged through all three stages."""

    def __init__(self):
        self.total = 0
        self.count = 0
        self.lock = threading.Lock()

    def process(self, order):
        with self.lock:
            self.total += order["amount"]
            self.count += 1
        return self.count


def main() -> int:
    ray.init(include_dashboard=False, log_to_driver=False)  # joins a running cluster, else starts one
    bus = get_communication_bus("example-legacy").start()
    consumer = OrderConsumer()

    # Stage 1: adapter only. Producer and consumer loop are the old code.
    q = create_queue_adapter("orders", bus=bus.name)
    for i in range(100):
        q.put({"id": i, "amount": 1})
    while True:
        try:
            consumer.process(q.get(timeout=0.5))
        except QueueEmpty:
            break
    print(f"stage 1 (adapter only): consumed {consumer.count}")

    # Stage 2: mixed. The consumer is a service that also drains the legacy queue.
    svc = migrate_service("orders", consumer, service_name="orders", bus=bus.name)
    client = FunctionClient(bus=bus.name)
    for i in range(100):
        q.put({"id": 100 + i, "amount": 2})  # old producer, unchanged
        client.call("orders", "process_data", {"id": 200 + i, "amount": 3})  # new producer
    deadline = time.monotonic() + 30
    while consumer.count < 300 and time.monotonic() < deadline:  # the service's bridge drains the queue
        time.sleep(0.01)
    print(f"stage 2 (mixed): consumed {consumer.count}")

    # Stage 3: migrated. Only service calls.
    for i in range(100):
        client.call("orders", "process_data", {"id": 300 + i, "amount": 4})
    print(f"stage 3 (migrated): consumed {consumer.count}, total {consumer.total}")
    ok = consumer.count == 400 and consumer.total == 100 * (1 + 2 + 3 + 4)
    print("OK" if ok else "MISMATCH")
    svc.stop()
    q.close()
    client.close()
    bus.shutdown()
    ray.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
