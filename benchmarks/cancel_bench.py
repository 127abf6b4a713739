"""What cancel() costs, and how fast a running handler hears of it.

Rows, all in one run on one node:

- ``cancel()`` of 1,000 queued ``call_async`` calls (a one-thread replica
  held by another call): microseconds per cancel() and how many said True.
  This is one compare-and-swap in the caller's claim table (claims.py).
- The baseline, the same run: asking the replica's actor to cancel one
  call (``ServiceActor.cancel``), which is what a call without a ticket, and
  a call already sent over Ray, pays.
- A running sync handler polling ``self.cancelled()``: how long from
  ``cancel()`` until it sees the flag (the replica is told through its
  actor, without the caller waiting); once for a handler whose work lets go
  of the GIL in slices, once for one spinning in pure Python (then the
  actor's thread that tells it waits for the GIL: Python's switch interval).

    python benchmarks/cancel_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import ray

from sage_ray_comm import BaseService, FunctionClient, SageQueue, get_communication_bus, sage_service, service_function
from sage_ray_comm._ray import cancel_on_replica
from sage_ray_comm.router import ROUTER_NAMESPACE, bus_namespace

QUEUED = 1000


@sage_service(name="held", max_concurrency=1, num_cpus=0.1)
class Held(BaseService):
    def initialize(self):
        self.ran = 0

    @service_function
    def hold(self, gate: str, release: str, ns: str) -> str:
        SageQueue(gate, namespace=ns, create=False).put("holding")
        SageQueue(release, namespace=ns, create=False).get(timeout=60)
        return "released"

    @service_function
    def work(self, i: int) -> int:
        self.ran += 1
        return i

    @service_function
    def runs(self) -> int:
        return self.ran

    @service_function
    def until_cancelled(self, gate: str, ns: str, spin: bool) -> float:
        SageQueue(gate, namespace=ns, create=False).put("started")
        t0 = time.monotonic()
        while not self.cancelled() and time.monotonic() - t0 < 30:
            if not spin:
                time.sleep(0.0005)  # work that lets go of the GIL (I/O, numpy) in slices
        return time.time()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    rounds = 3 if args.quick else 10
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    bus_name = f"cbench-{os.getpid()}"
    bus = get_communication_bus(bus_name)
    Held.deploy(bus=bus_name)
    ns = bus_namespace(bus_name)
    gate = SageQueue("cbench-gate", 4096, namespace=ns)
    release = SageQueue("cbench-release", 4096, namespace=ns)
    client = FunctionClient(bus=bus_name)
    actor = client.endpoint.instances("held")[0].actor_name
    per_cancel, said_true, asked, told, told_spin = [], [], [], [], []
    for _ in range(rounds):
        held = client.call_async("held", "hold", gate.name, release.name, ns, timeout=60)
        assert gate.get(timeout=30) == "holding"
        futs = [client.call_async("held", "work", i, timeout=60) for i in range(QUEUED)]
        t0 = time.perf_counter()
        said = [f.cancel() for f in futs]
        per_cancel.append((time.perf_counter() - t0) / QUEUED * 1e6)
        said_true.append(sum(said))
        # The baseline: asking the actor, one call at a time (keys no call has: the same work for it).
        t0 = time.perf_counter()
        for k in range(50):
            cancel_on_replica(actor, ROUTER_NAMESPACE, [("rep.0.c-none", k)], 1.0)
        asked.append((time.perf_counter() - t0) / 50 * 1e6)
        release.put("go")
        held.result(timeout=60)
        ran = [f.result(timeout=60) for f, s in zip(futs, said, strict=True) if not s]
        assert len(ran) == QUEUED - sum(said)
        for spin in (False, True):
            fut = client.call_async("held", "until_cancelled", gate.name, ns, spin, timeout=60)
            assert gate.get(timeout=30) == "started"
            t_cancel = time.time()
            assert not fut.cancel()
            (told_spin if spin else told).append((fut.result(timeout=60) - t_cancel) * 1e6)
    runs = client.call("held", "runs")
    results = {
        "queued": QUEUED,
        "rounds": rounds,
        "cancel_us_p50": statistics.median(per_cancel),
        "said_true_min": min(said_true),
        "ran_that_said_true": runs - sum(QUEUED - s for s in said_true),
        "ask_actor_us_p50": statistics.median(asked),
        "running_told_us_p50": statistics.median(told),
        "running_told_us_max": max(told),
        "running_spinning_told_us_p50": statistics.median(told_spin),
    }
    print(f"cancel() of {QUEUED} queued calls: {results['cancel_us_p50']:.2f} us each (p50 of {rounds} rounds), ")
    print(
        f"  said True: at least {results['said_true_min']} of {QUEUED}; calls that said True and ran: "
        f"{results['ran_that_said_true']}"
    )
    print(
        f"asking the replica's actor instead: {results['ask_actor_us_p50']:.0f} us per call "
        f"({results['ask_actor_us_p50'] / results['cancel_us_p50']:.0f}x)"
    )
    print(
        f"a running sync handler sees cancelled(): p50 {results['running_told_us_p50']:.0f} us after cancel() "
        f"(max {results['running_told_us_max']:.0f} us); one spinning in pure Python (holding the GIL): "
        f"p50 {results['running_spinning_told_us_p50']:.0f} us"
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cancel_bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
    client.close()
    gate.destroy()
    release.destroy()
    bus.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
