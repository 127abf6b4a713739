"""Replicas, a killed replica, and calls that go on.

    python examples/load_balanced_service.py

Three replicas share the work. One is SIGKILLed mid-stream: calls to an
idempotent function are retried on another replica, so the caller never sees
the death; the registry drops the dead replica by heartbeat.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import time

import ray

from sage_ray_comm import BaseService, FunctionClient, get_communication_bus, sage_service, service_function


@sage_service(name="square", replicas=3, num_cpus=0.1)
class Square(BaseService):
    @service_function(idempotent=True)
    def compute(self, x: int) -> tuple:
        time.sleep(0.002)  # a little work
        return x * x, os.getpid()


def main() -> int:
    ray.init(include_dashboard=False, log_to_driver=False)  # joins a running cluster, else starts one
    bus = get_communication_bus("example-lb").start()
    Square.deploy(bus=bus.name)
    client = FunctionClient(bus=bus.name)

    results, pids = [], collections.Counter()
    victim = None
    for i in range(600):
        value, pid = client.call("square", "compute", i, timeout=10)
        results.append(value)
        pids[pid] += 1
        if i == 200:
            victim = pid
            os.kill(victim, signal.SIGKILL)
            print(f"killed replica pid {victim} after {i + 1} calls")
    ok_values = results == [i * i for i in range(600)]
    after_kill = sum(n for p, n in pids.items() if p != victim)
    print(f"600 calls, all correct: {ok_values}; calls per replica pid: {dict(pids)}")
    print(f"retries after the kill: {client.stats()['retries']}")
    deadline = time.monotonic() + 15
    while len(bus.services()) != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"replicas in the registry now: {len(bus.services())}")
    ok = ok_values and len(pids) == 3 and after_kill >= 399 and len(bus.services()) == 2
    print("OK" if ok else "MISMATCH")
    client.close()
    bus.shutdown()
    ray.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
