"""Soak: the demo pipeline under random replica kills.

    python benchmarks/soak.py --minutes 2 [--json out.json]

Four caller threads stream records through `featurize` (3 replicas, restarted
by Ray after each kill) into the stateful `aggregate` service, while a killer
SIGKILLs a random featurize replica every few seconds. At the end it reports:

- calls made, and calls failed with a typed error (ServiceUnavailable, CallTimeout);
- messages lost: records whose call returned success but that the aggregator
  never saw (must be 0);
- segments leaked: shared-memory segments of the bus left after shutdown (must be 0).

Exit status 0 only when nothing acknowledged was lost and nothing leaked.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time

import ray

from sage_ray_comm import (
    BaseService,
    FunctionClient,
    SageCommError,
    get_communication_bus,
    sage_service,
    service_function,
    shm,
)
from sage_ray_comm.router import bus_namespace


@sage_service(name="featurize", replicas=3, num_cpus=0.1, max_restarts=-1)
class Featurize(BaseService):
    @service_function(idempotent=True)
    def process(self, record: dict) -> int:
        self.call_service["aggregate"].add(record["id"])
        return record["id"]

    @service_function
    def pid(self) -> int:
        return os.getpid()


@sage_service(name="aggregate", num_cpus=0.1)
class Aggregate(BaseService):
    def initialize(self) -> None:
        self.seen: set = set()

    @service_function
    def add(self, rid: int) -> None:
        self.seen.add(rid)

    @service_function
    def seen_ids(self) -> list:
        return sorted(self.seen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between kills")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    bus_name = f"soak-{os.getpid()}"
    bus = get_communication_bus(bus_name).start()
    Featurize.deploy(bus=bus_name)
    Aggregate.deploy(bus=bus_name)
    client = FunctionClient(bus=bus_name)
    stop = threading.Event()
    lock = threading.Lock()
    acked: list = []
    counts = {"calls": 0, "failed_typed": 0, "failed_untyped": 0, "kills": 0}
    ids = iter(range(10**9))
    errors: dict = {}

    def caller() -> None:
        while not stop.is_set():
            with lock:
                rid = next(ids)
            try:
                r = client.call("featurize", "process", {"id": rid}, timeout=10)
                with lock:
                    counts["calls"] += 1
                    if r == rid:
                        acked.append(rid)
            except SageCommError as e:
                with lock:
                    counts["calls"] += 1
                    counts["failed_typed"] += 1
                    key = f"{type(e).__name__}: {str(e)[:300]}"
                    errors[key] = errors.get(key, 0) + 1
            except Exception:  # anything untyped is a bug: reported, and fails the run
                with lock:
                    counts["calls"] += 1
                    counts["failed_untyped"] += 1

    def killer() -> None:
        rng = random.Random(1)
        while not stop.wait(rng.uniform(0.5, 1.5) * args.kill_every):
            try:
                insts = list(client.endpoint.refresh()["services"].get("featurize", {}).values())
                if not insts:
                    continue
                victim = rng.choice(insts)
                os.kill(victim.pid, signal.SIGKILL)
                counts["kills"] += 1
            except (ProcessLookupError, SageCommError):
                pass

    threads = [threading.Thread(target=caller) for _ in range(4)] + [threading.Thread(target=killer)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    last = t0
    while time.monotonic() - t0 < args.minutes * 60:
        time.sleep(1.0)
        if time.monotonic() - last >= 15:
            last = time.monotonic()
            print(f"  {time.monotonic() - t0:5.0f} s: {counts['calls']} calls, {counts['failed_typed']} failed (typed), "
                  f"{counts['kills']} kills", file=sys.stderr, flush=True)
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0

    seen = set(client.call("aggregate", "seen_ids", timeout=60))
    lost = sorted(set(acked) - seen)
    client.close()
    bus.shutdown()
    leaked = [s.shm_name for s in shm.list_segments(bus_namespace(bus_name))]
    report = {
        "minutes": round(elapsed / 60, 2),
        "calls": counts["calls"],
        "calls_ok": len(acked),
        "calls_failed_typed": counts["failed_typed"],
        "calls_failed_untyped": counts["failed_untyped"],
        "replica_kills": counts["kills"],
        "messages_lost": len(lost),
        "segments_leaked": len(leaked),
        "calls_per_s": round(counts["calls"] / elapsed, 1),
        "failures_by_kind": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:8]),
    }
    print("soak report")
    for k, v in report.items():
        print(f"  {k:<22} {v}")
    if lost:
        print(f"  lost ids (first 10): {lost[:10]}")
    if leaked:
        print(f"  leaked: {leaked[:5]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    ray.shutdown()
    ok = not lost and not leaked and counts["failed_untyped"] == 0 and counts["kills"] > 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
