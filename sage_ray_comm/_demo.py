"""The services of ``sage-comm demo``: a small sensor pipeline.

    source (driver) --call_async--> featurize (3 replicas, load-balanced)
                                        |--call--> aggregate (1 replica, stateful)
                                                      |--publish--> pipeline.alert.<sensor>
    monitor (service, @subscribe) and the driver (bus.subscribe) receive the alerts.

Defined in the package so that Ray workers import them by name.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Any

from .bus import get_communication_bus
from .client import FunctionClient
from .lifecycle import owns_ray
from .service import BaseService, sage_service, service_function, subscribe

SENSORS = ("kitchen", "garage", "attic", "cellar")


@sage_service(name="featurize", replicas=3, num_cpus=0.1)
class Featurize(BaseService):
    """Turns a raw reading into features, then hands it to the aggregator."""

    @service_function(idempotent=True)
    def process(self, record: dict[str, Any]) -> dict[str, Any]:
        v = float(record["value"])
        features = {"id": record["id"], "sensor": record["sensor"], "value": v, "log": math.log1p(abs(v))}
        # A service calling a service from its handler.
        features["zscore"] = self.call_service["aggregate"].add(features)
        return features

    @service_function
    def transport_stats(self) -> dict[str, int]:
        s = self.client.stats()
        return {"shm": s["shm"], "ray": s["ray"]}


@sage_service(name="aggregate", num_cpus=0.1)
class Aggregate(BaseService):
    """Running mean and variance per sensor; publishes an alert for outliers."""

    def initialize(self) -> None:
        self.n: dict[str, int] = {}
        self.mean: dict[str, float] = {}
        self.m2: dict[str, float] = {}
        self.alerts = 0

    @service_function
    def add(self, features: dict[str, Any]) -> float:
        s, v = features["sensor"], features["value"]
        n = self.n.get(s, 0) + 1
        mean = self.mean.get(s, 0.0)
        delta = v - mean
        mean += delta / n
        m2 = self.m2.get(s, 0.0) + delta * (v - mean)
        self.n[s], self.mean[s], self.m2[s] = n, mean, m2
        std = math.sqrt(m2 / (n - 1)) if n > 1 else 0.0
        z = (v - mean) / std if std > 0 else 0.0
        if n > 20 and abs(z) > 3.0:
            self.alerts += 1
            self.broadcast(f"pipeline.alert.{s}", {"id": features["id"], "sensor": s, "value": v, "z": round(z, 2)})
        return z

    @service_function
    def summary(self) -> dict[str, Any]:
        return {
            s: {
                "n": self.n[s],
                "mean": round(self.mean[s], 3),
                "std": round(math.sqrt(self.m2[s] / max(1, self.n[s] - 1)), 3),
            }
            for s in sorted(self.n)
        } | {"alerts": self.alerts}


@sage_service(name="monitor", num_cpus=0.1, max_concurrency=1)  # FIFO: a call sees every earlier event
class Monitor(BaseService):
    """Counts alerts per sensor (a subscriber service)."""

    def initialize(self) -> None:
        self.counts: dict[str, int] = {}

    @subscribe("pipeline.alert.*")
    def on_alert(self, alert: dict[str, Any]) -> None:
        self.counts[alert["sensor"]] = self.counts.get(alert["sensor"], 0) + 1

    @service_function
    def counts_by_sensor(self) -> dict[str, int]:
        return dict(self.counts)


def _record_latency(lat: list, sent: float, _fut: object) -> None:
    lat.append(time.perf_counter() - sent)


def make_records(n: int, seed: int = 7) -> list[dict[str, Any]]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = SENSORS[i % len(SENSORS)]
        v = rng.gauss(20.0 + 5 * SENSORS.index(s), 1.0)
        if rng.random() < 0.01:
            v += rng.choice((-1, 1)) * 12.0  # an outlier
        out.append({"id": i, "sensor": s, "value": v})
    return out


class Progress:
    """A one-line progress bar on stderr (plain text when not a terminal)."""

    def __init__(self, total: int, label: str, width: int = 30) -> None:
        self.total, self.label, self.width = total, label, width
        self.tty = sys.stderr.isatty()
        self.last = -1

    def update(self, done: int) -> None:
        pct = done * 100 // self.total
        if pct == self.last or (not self.tty and pct % 25 and done != self.total):
            return
        self.last = pct
        filled = self.width * done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        end = "\r" if self.tty and done < self.total else "\n"
        print(f"{self.label} [{bar}] {done}/{self.total}", end=end, file=sys.stderr, flush=True)


def run(records: int = 3000, window: int = 16) -> int:
    """Runs the demo; returns the process exit code."""
    import ray

    t_start = time.perf_counter()
    if not ray.is_initialized():
        # As a plain `ray.init()`: join the cluster this machine points at
        # (RAY_ADDRESS, `ray start`'s current-cluster file), else start a local
        # Ray. No num_cpus: Ray refuses resource options when it joins, and the
        # services ask for 0.1 CPU each.
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    gcs = ray.get_runtime_context().gcs_address
    on = "a local Ray started for the demo" if owns_ray() else f"the running cluster at {gcs}"
    # Unique on a shared cluster: two demos at once must not share a bus.
    bus_name = f"demo-{os.getpid()}-{int(time.time())}"
    bus = get_communication_bus(bus_name).start()
    try:
        handles = [Featurize.deploy(bus=bus_name), Aggregate.deploy(bus=bus_name), Monitor.deploy(bus=bus_name)]
        alerts_seen: list[dict[str, Any]] = []
        bus.subscribe("pipeline.alert.*", alerts_seen.append)
        client = FunctionClient(bus=bus_name, client_id="demo-source")
        client.wait_for_subscribers("pipeline.alert.x", 2)
        data = make_records(records)
        bar = Progress(records, "streaming")
        lat: list[float] = []
        pending: list = []
        t0 = time.perf_counter()
        done = 0
        for rec in data:
            sent = time.perf_counter()
            fut = client.call_async("featurize", "process", rec)
            fut.add_done_callback(functools.partial(_record_latency, lat, sent))
            pending.append(fut)
            if len(pending) >= window:  # bounded pipelining
                pending.pop(0).result(timeout=60)
                done += 1
                bar.update(done)
        for fut in pending:
            fut.result(timeout=60)
            done += 1
            bar.update(done)
        elapsed = time.perf_counter() - t0

        summary = client.call("aggregate", "summary")
        monitor_counts = client.call("monitor", "counts_by_sensor")
        fe = handles[0]
        per_replica = {
            (i.actor_name or i.instance_id).split(":")[-1]: st.get("calls", 0)
            for i, st in zip(fe.instances, fe.stats(), strict=True)
        }
        nested = [client.call("featurize", "transport_stats", instance=i.instance_id) for i in fe.instances]
        cs = client.stats()
        lat.sort()

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6

        shm_calls = cs["shm"] + sum(n["shm"] for n in nested)
        ray_calls = cs["ray"] + sum(n["ray"] for n in nested)
        print()
        print(f"sage_ray_comm demo: {records} records through featurize (3 replicas) -> aggregate -> alerts")
        print(f"  throughput        {records / elapsed:,.0f} records/s ({elapsed:.2f} s, {window} calls in flight)")
        print(
            f"  call latency      p50 {pct(0.5):,.0f} us   p99 {pct(0.99):,.0f} us   (source -> featurize -> aggregate -> back, under load)"
        )
        print(f"  ray               {on}, bus {bus_name}")
        print(f"  transports        {shm_calls} calls over shared memory, {ray_calls} over Ray")
        print("  per-replica load  " + "   ".join(f"{k}: {v}" for k, v in sorted(per_replica.items())))
        print(
            "  aggregate         "
            + "   ".join(f"{s}: n={v['n']} mean={v['mean']}" for s, v in summary.items() if s != "alerts")
        )
        # The driver's callback runs in a background thread: give the last alerts a moment to land.
        deadline = time.monotonic() + 5
        while len(alerts_seen) < summary["alerts"] and time.monotonic() < deadline:
            time.sleep(0.01)
        print(
            f"  alerts (pub/sub)  {summary['alerts']} published; driver got {len(alerts_seen)}, "
            f"monitor service got {sum(monitor_counts.values())} {dict(sorted(monitor_counts.items()))}"
        )
        ok = (
            sum(per_replica.values()) == records
            and sum(v["n"] for s, v in summary.items() if s != "alerts") == records
            and len(alerts_seen) == summary["alerts"]
            and sum(monitor_counts.values()) == summary["alerts"]
        )
        print(f"  check             {'OK' if ok else 'MISMATCH'}: every record processed once, every alert delivered")
        print(f"  total time        {time.perf_counter() - t_start:.1f} s including Ray start-up")
        client.close()
        return 0 if ok else 1
    finally:
        bus.shutdown()
