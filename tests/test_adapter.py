"""The legacy adapter: old queue-style code on bus-scoped queues, and the migration stages."""

from __future__ import annotations

import queue
import time

import pytest
import ray

from sage_ray_comm import (
    BaseService,
    FunctionClient,
    InvalidServiceDefinition,
    LegacyQueueAdapter,
    QueueEmpty,
    create_queue_adapter,
    get_communication_bus,
    migrate_service,
    sage_service,
    service_function,
)


def test_old_interface_works_unchanged(bus):
    q = create_queue_adapter("old_queue_name", bus=bus)
    q.put({"n": 1})
    q.put(b"raw")
    assert q.qsize() == 2 and not q.empty()
    assert q.get(timeout=1) == {"n": 1} and q.get(timeout=1) == b"raw"
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    with pytest.raises(QueueEmpty):
        q.get_nowait()
    q.close()


def test_same_legacy_name_on_two_buses_never_mixes(bus):
    # The bug this project exists to fix: two jobs, one queue name, mixed data.
    other = bus + "-job2"
    a = create_queue_adapter("results", bus=bus)
    b = create_queue_adapter("results", bus=other)
    try:
        for i in range(50):
            a.put(("job1", i))
            b.put(("job2", i))
        assert [a.get(timeout=1) for _ in range(50)] == [("job1", i) for i in range(50)]
        assert [b.get(timeout=1) for _ in range(50)] == [("job2", i) for i in range(50)]
        assert a.empty() and b.empty()
    finally:
        a.close()
        b.close()
        get_communication_bus(other).shutdown()


def test_same_name_on_one_bus_is_one_mpmc_queue_across_actors(bus):
    q = create_queue_adapter("work", bus=bus)

    @ray.remote(num_cpus=0.1)
    class Worker:
        def drain(self, bus, n):
            from sage_ray_comm import QueueEmpty, create_queue_adapter

            w = create_queue_adapter("work", bus=bus)
            got = []
            while len(got) < n:
                try:
                    got.append(w.get(timeout=10))
                except QueueEmpty:
                    break
            w.close()
            return got

    for i in range(300):
        q.put(i)
    workers = [Worker.remote() for _ in range(3)]
    parts = ray.get([w.drain.remote(bus, 100) for w in workers], timeout=120)
    assert sorted(x for p in parts for x in p) == list(range(300))
    assert all(len(p) == 100 for p in parts)
    for w in workers:
        ray.kill(w)
    q.close()


@sage_service(name="stage2")
class Stage2(BaseService):
    def initialize(self):
        self.items = []

    @service_function
    def process_data(self, data):
        self.items.append(data)

    @service_function
    def items_seen(self):
        return list(self.items)


def test_mixed_mode_puts_reach_the_service_once_it_is_registered(bus):
    q = LegacyQueueAdapter("handoff", service_name="stage2", bus=bus)
    q.put("before")
    assert q.qsize() == 1, "no service yet: the item waits in the queue"
    h = Stage2.deploy(bus=bus)
    q._client.refresh()
    q.put("after")
    assert q.qsize() == 1 and q.stats["to_service"] == 1
    c = FunctionClient(bus=bus)
    assert c.call("stage2", "items_seen") == ["after"]
    bridge = q.bridge_to("stage2")  # drain what old producers left in the queue
    deadline = time.monotonic() + 30
    while c.call("stage2", "items_seen") != ["after", "before"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert bridge.forwarded == 1
    c.close()
    q.close()
    assert not bridge.running
    h.shutdown()


def test_bridge_to_topic(bus):
    b = get_communication_bus(bus).start()
    got = queue.Queue()
    b.subscribe("legacy.items", got.put)
    q = create_queue_adapter("events", bus=bus)
    q.bridge_to_topic("legacy.items")
    for i in range(5):
        q.put(i)
    assert [got.get(timeout=10) for _ in range(5)] == [0, 1, 2, 3, 4]
    q.close()


class OldConsumer:
    """An old-style consumer: the code to migrate."""

    def __init__(self):
        self.seen = []

    def process(self, item):
        self.seen.append(item)
        return item * 10


def test_migrate_service_serves_calls_and_keeps_draining_the_queue(bus):
    old = OldConsumer()
    svc = migrate_service("orders", old, bus=bus)
    producer = create_queue_adapter("orders", bus=bus)
    producer.put(1)  # an old producer, unchanged
    c = FunctionClient(bus=bus)
    assert c.call("orders", "process_data", 2) == 20  # a new caller
    deadline = time.monotonic() + 30
    while sorted(old.seen) != [1, 2]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    svc.stop()
    c.close()
    producer.close()


def test_migrate_needs_a_handler(bus):
    with pytest.raises(InvalidServiceDefinition, match="process\\(\\), handle\\(\\) or __call__"):
        migrate_service("x", object(), bus=bus)


@sage_service(name="enrich")
class Enrich(BaseService):
    @service_function
    def process(self, item):
        return {"id": item["id"], "value": item["value"] * 2}


def test_a_pipeline_half_legacy(bus):
    """legacy producer -> queue 'raw' -> migrated legacy stage -> new service
    'enrich' -> legacy queue 'out' -> legacy consumer."""
    h = Enrich.deploy(bus=bus)

    class OldStage:
        def __init__(self, bus):
            self.out = create_queue_adapter("out", bus=bus)
            self.client = FunctionClient(bus=bus)

        def handle(self, item):
            self.out.put(self.client.call("enrich", "process", item))

    stage = OldStage(bus)
    svc = migrate_service("raw", stage, service_name="old_stage", bus=bus)
    raw = create_queue_adapter("raw", bus=bus)
    out = create_queue_adapter("out", bus=bus)
    for i in range(100):
        raw.put({"id": i, "value": i})
    got = sorted((out.get(timeout=30) for _ in range(100)), key=lambda r: r["id"])
    assert got == [{"id": i, "value": 2 * i} for i in range(100)]
    svc.stop()
    stage.out.close()
    stage.client.close()
    raw.close()
    out.close()
    h.shutdown()
