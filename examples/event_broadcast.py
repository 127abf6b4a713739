"""Publish-subscribe with NATS-style wildcards.

    python examples/event_broadcast.py

``*`` matches one token, a final ``>`` one or more. Callback subscribers each
get every matching event; the replicas of a subscribing service share them.
"""

from __future__ import annotations

import collections
import queue
import sys
import time

import ray

from sage_ray_comm import BaseService, FunctionClient, get_communication_bus, sage_service, service_function, subscribe


@sage_service(name="thermostat", replicas=2, num_cpus=0.1, max_concurrency=1)
class Thermostat(BaseService):
    def initialize(self):
        self.readings = []

    @subscribe("sensor.*.temperature")
    def on_temperature(self, celsius, message=None):
        self.readings.append((message.topic, celsius))

    @service_function
    def seen(self):
        return list(self.readings)


def main() -> int:
    ray.init(include_dashboard=False, log_to_driver=False)  # joins a running cluster, else starts one
    bus = get_communication_bus("example-events").start()
    h = Thermostat.deploy(bus=bus.name)
    everything, kitchen = queue.Queue(), queue.Queue()
    bus.subscribe("sensor.>", lambda value, message=None: everything.put((message.topic, value)))
    bus.subscribe("sensor.kitchen.*", lambda value: kitchen.put(value))

    events = [
        ("sensor.kitchen.temperature", 21.5),
        ("sensor.kitchen.humidity", 40),
        ("sensor.garage.temperature", 12.0),
        ("sensor.garage.door", "open"),
        ("motor.pump.rpm", 1500),  # nobody listens
        ("sensor.attic.temperature", 30.1),
    ]
    for topic, value in events:
        n = bus.publish(topic, value)
        print(f"published {topic:<28} -> {n} subscriber(s)")

    got_all = [everything.get(timeout=10) for _ in range(5)]
    got_kitchen = [kitchen.get(timeout=10) for _ in range(2)]
    client = FunctionClient(bus=bus.name)
    deadline = time.monotonic() + 10
    while True:  # each replica handles its share in ring order; wait for the last
        seen = [client.call("thermostat", "seen", instance=i.instance_id) for i in h.instances]
        if sum(map(len, seen)) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    print(f"'sensor.>' got {len(got_all)}, 'sensor.kitchen.*' got {got_kitchen}")
    print("thermostat replicas shared the temperatures:", [len(s) for s in seen])
    temps = sorted(t for s in seen for t, _ in s)
    ok = (
        sorted(t for t, _ in got_all) == sorted(t for t, _ in events if t.startswith("sensor."))
        and got_kitchen == [21.5, 40]
        and temps == ["sensor.attic.temperature", "sensor.garage.temperature", "sensor.kitchen.temperature"]
        and collections.Counter(map(len, seen)) in ({1: 1, 2: 1}, {3: 1, 0: 1})
    )
    print("OK" if ok else "MISMATCH")
    client.close()
    bus.shutdown()
    ray.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
