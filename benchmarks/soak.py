"""Soak: the pipeline under random SIGKILLs of replicas and of callers.

    python benchmarks/soak.py --minutes 2 [--json out.json]
    python benchmarks/soak.py --nodes 3 --minutes 2   # a three-raylet cluster on this machine

Caller processes (each its own Ray driver, connected to this cluster) stream
records through ``featurize`` (3 replicas, stateless, idempotent, restarted
by Ray) into the stateful ``aggregate``. Each record carries a 1 MiB numpy
frame, which travels through the caller's arena on one node (arena.py), so
the kills also cut holders of slots and owners of slabs. Every acknowledged
record is written to the caller's own file at once.

Phase 1 (about 3/4 of the time): a killer SIGKILLs, in turn, a random
featurize replica and a random caller process (a new caller takes its
place). Claims, each checked:

- **0 failed**: no call a live caller made raised (idempotent calls whose
  replica died are retried on another), and no reply was wrong (a reply
  that is not the record's id counts as a failure);
- **0 lost**: every record a caller had acknowledged reached the aggregator.

Phase 2 (the rest): the stateful ``aggregate`` itself is SIGKILLed (Ray
restarts it, empty). In-memory state dies with its process, so "0 lost" is
not the claim here; the claims are: every failure is a typed
``SageCommError``, no call outlives its timeout (no hang), and calls succeed
again after each restart.

With ``--nodes N`` (N >= 2) it runs on a ``ray.cluster_utils.Cluster`` of
N raylets: featurize has two replicas per worker node, the aggregate and the
callers stay on the head, so every record crosses nodes on the way in and on
the way to the aggregate; and halfway through phase 1 the last worker node is removed
(``cluster.remove_node``): its replicas die with it and Ray restarts them
on the nodes left. The phase-1 claims stay the same (0 failed, 0 lost).

Then the callers stop and the library's own collection gets its chance (the
node janitor's grace and two sweeps); only then, before anyone calls
``bus.shutdown()`` or ``gc()``, are leaks counted: segments of the bus whose
creator is dead and that no live process uses. The report says how many
segments the automatic collection removed.

Exit status 0 only when every claim holds. Writes its JSON with the run info.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
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

CALL_TIMEOUT = 5.0
# A call returning later than its timeout plus this is a hang.
HANG_SLACK = 5.0
CALLERS = 3
# Each call carries a numpy frame this large (the zero-copy path, arena.py).
FRAME_BYTES = 1 << 20


@sage_service(name="featurize", replicas=3, num_cpus=0.1, max_restarts=-1)
class Featurize(BaseService):
    @service_function(idempotent=True)
    def process(self, record: dict) -> int:
        # The record carries a frame of FRAME_BYTES: read in place from the
        # caller's arena on one node (so kills exercise slots and slabs too).
        frame = record.get("frame")
        if frame is not None and (frame.nbytes != FRAME_BYTES or int(frame[-1]) != record["id"] % 251):
            return -1
        self.call_service["aggregate"].add(record["id"])
        return record["id"]

    @service_function
    def pid(self) -> int:
        return os.getpid()


@sage_service(name="aggregate", num_cpus=0.1, max_restarts=-1)
class Aggregate(BaseService):
    def initialize(self) -> None:
        self.seen: set = set()

    @service_function(idempotent=True)
    def add(self, rid: int) -> None:
        self.seen.add(rid)

    @service_function
    def seen_ids(self) -> list:
        return sorted(self.seen)

    @service_function
    def pid(self) -> int:
        return os.getpid()


@sage_service(
    name="featurize",
    replicas=2,
    num_cpus=0.1,
    max_restarts=-1,
    scheduling_strategy="SPREAD",
    resources={"soak_worker": 0.01},
)
class SpreadFeaturize(Featurize):
    """featurize on a cluster: spread over the worker nodes only, so every
    call crosses nodes twice (caller -> featurize -> aggregate on the head)."""


@sage_service(name="aggregate", num_cpus=0.1, max_restarts=-1, resources={"soak_head": 0.01})
class HeadAggregate(Aggregate):
    """The stateful stage stays on the head node: removing a worker never takes it."""


# ------------------------------------------------------------------ callers
def caller_main(address: str, bus: str, base: int, folder: str) -> None:
    """One caller process: calls until killed or told to stop (a file)."""
    ray.init(address=address, log_to_driver=False, configure_logging=False, logging_level="ERROR")
    client = FunctionClient(bus=bus, timeout=CALL_TIMEOUT)
    acked = open(os.path.join(folder, f"acked-{base}"), "a", buffering=1)
    events = open(os.path.join(folder, f"events-{base}"), "a", buffering=1)
    stop = os.path.join(folder, "stop")
    i = 0
    while not os.path.exists(stop):
        rid = base + i
        i += 1
        t0 = time.monotonic()
        try:
            frame = np.full(FRAME_BYTES, rid % 251, dtype=np.uint8)
            r = client.call("featurize", "process", {"id": rid, "frame": frame})
            dt = time.monotonic() - t0
            if r == rid:
                acked.write(f"{rid}\n")  # acknowledged: the aggregator must have it
                events.write(json.dumps({"ok": 1, "t": time.time(), "dt": dt}) + "\n")
            else:
                events.write(json.dumps({"wrong": [rid, repr(r)], "t": time.time(), "dt": dt}) + "\n")
        except SageCommError as e:
            events.write(
                json.dumps(
                    {"typed": type(e).__name__, "msg": str(e)[:200], "t": time.time(), "dt": time.monotonic() - t0}
                )
                + "\n"
            )
        except BaseException as e:
            events.write(
                json.dumps({"untyped": f"{type(e).__name__}: {e}"[:300], "t": time.time(), "dt": time.monotonic() - t0})
                + "\n"
            )
    client.close()


class Callers:
    """The caller processes; killed ones are replaced by new ones (new id base)."""

    def __init__(self, address: str, bus: str, folder: str) -> None:
        self.address, self.bus, self.folder = address, bus, folder
        self.procs: dict = {}
        self.next_base = 1
        self.killed = 0

    def start_one(self) -> None:
        base = self.next_base * 1_000_000_000
        self.next_base += 1
        p = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--caller", self.address, self.bus, str(base), self.folder],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.folder, f"stderr-{base}"), "w"),
        )
        self.procs[base] = p

    def kill_one(self, rng: random.Random) -> None:
        live = [b for b, p in self.procs.items() if p.poll() is None]
        if not live:
            return
        b = rng.choice(live)
        self.procs[b].send_signal(signal.SIGKILL)
        self.procs[b].wait()
        self.killed += 1
        self.start_one()

    def stop(self, timeout: float = 60.0) -> None:
        open(os.path.join(self.folder, "stop"), "w").close()
        end = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def read_events(folder: str) -> list:
    out = []
    for path in glob.glob(os.path.join(folder, "events-*")):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # the half-written last line of a killed caller
    return out


def read_acked(folder: str) -> set:
    ids = set()
    for path in glob.glob(os.path.join(folder, "acked-*")):
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):  # a killed caller's partial line was never acknowledged to anyone
                    ids.add(int(line))
    return ids


# ------------------------------------------------------------------ phases
def replica_pids(client: FunctionClient, not_on: str | None = None) -> dict:
    """featurize replicas' pids by instance id (those not on node ``not_on``),
    and the node of each pid (for the report)."""
    out = {}
    for inst in client.endpoint.refresh()["services"].get("featurize", {}).values():
        if not_on is not None and inst.node_id == not_on:
            continue
        try:
            out[inst.instance_id] = client.call("featurize", "pid", instance=inst.instance_id, timeout=10)
            NODE_OF_PID[out[inst.instance_id]] = inst.node_id
        except SageCommError:
            pass
    return out


NODE_OF_PID: dict[int, str | None] = {}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--caller":
        caller_main(*sys.argv[2:4], int(sys.argv[4]), sys.argv[5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between kills")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--nodes", type=int, default=1, help="raylets (a local ray.cluster_utils.Cluster when > 1)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _runinfo import run_info

    from sage_ray_comm.ray_transport import JANITOR_GRACE, JANITOR_SECONDS, get_gateway

    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    cluster, workers = None, []
    if args.nodes > 1:
        from ray.cluster_utils import Cluster

        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 2, "include_dashboard": False, "resources": {"soak_head": 1}},
        )
        workers = [cluster.add_node(num_cpus=2, resources={"soak_worker": 1}) for _ in range(args.nodes - 1)]
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes()
        address = cluster.address
    else:
        ctx = ray.init(
            address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        address = ctx.address_info["gcs_address"]
    head = ray.get_runtime_context().get_node_id()
    bus_name = f"soak-{os.getpid()}"
    bus = get_communication_bus(bus_name).start()
    if cluster is None:
        Featurize.deploy(bus=bus_name)
        Aggregate.deploy(bus=bus_name)
    else:
        SpreadFeaturize.deploy(bus=bus_name, replicas=2 * (args.nodes - 1))
        HeadAggregate.deploy(bus=bus_name)
    client = FunctionClient(bus=bus_name)
    replica_pids(client)  # where each replica runs, for the report
    gateway = get_gateway(head)
    collected_before = ray.get(gateway.janitor_stats.remote(), timeout=60)["collected"]
    folder = tempfile.mkdtemp(prefix="sage-soak-")
    callers = Callers(address, bus_name, folder)
    for _ in range(CALLERS):
        callers.start_one()

    total = args.minutes * 60
    phase1_end = time.monotonic() + 0.75 * total
    replica_kills = 0
    kills_by_node: dict = {}
    removed: dict = {}
    remove_at = time.monotonic() + 0.375 * total  # halfway through phase 1
    t_start = time.time()
    # Phase 1: replicas of the stateless stage and callers, in turn (on a
    # cluster: replicas on other nodes, and one whole worker node removed).
    turn = 0
    while time.monotonic() < phase1_end:
        time.sleep(rng.expovariate(1.0 / args.kill_every))  # the killer's own pace: nothing to wait for
        if time.monotonic() >= phase1_end:
            break
        if workers and not removed and time.monotonic() >= remove_at:
            node = workers[-1]
            live = replica_pids(client)
            lost_replicas = sum(1 for pid in live.values() if NODE_OF_PID.get(pid) == node.node_id)
            t0 = time.monotonic()
            cluster.remove_node(node)  # type: ignore[union-attr]
            removed = {"node": node.node_id, "seconds": round(time.monotonic() - t0, 2), "replicas": lost_replicas}
            continue
        if turn % 2 == 0:
            pids = replica_pids(client, not_on=head if cluster is not None else None)
            if pids:
                pid = rng.choice(list(pids.values()))
                os.kill(pid, signal.SIGKILL)
                replica_kills += 1
                node = NODE_OF_PID.get(pid)
                kills_by_node[node] = kills_by_node.get(node, 0) + 1
        else:
            callers.kill_one(rng)
        turn += 1
    phase1_t = time.time()
    time.sleep(2 * CALL_TIMEOUT)  # let calls of the phase finish before counting
    acked = read_acked(folder)
    seen = set(client.call("aggregate", "seen_ids", timeout=60))
    lost = sorted(acked - seen)

    # Phase 2: the stateful stage.
    aggregate_kills = 0
    phase2_end = time.monotonic() + 0.25 * total
    recovered_after = []
    while time.monotonic() < phase2_end:
        # The first kill comes early, so a short phase always has one (an
        # exponential wait alone, mean 8 s, left a 30 s phase with none in about 1 run in 40).
        pause = rng.expovariate(1.0 / (2 * args.kill_every))
        time.sleep(min(pause, 2.0) if aggregate_kills == 0 else pause)
        if time.monotonic() >= phase2_end:
            break
        try:
            os.kill(client.call("aggregate", "pid", timeout=10), signal.SIGKILL)
            aggregate_kills += 1
            t_kill = time.monotonic()
            # Recovery: a call through the whole pipeline succeeds again, within 60 s.
            probe = -aggregate_kills
            while True:
                try:
                    if client.call("featurize", "process", {"id": probe}, timeout=CALL_TIMEOUT) == probe:
                        recovered_after.append(round(time.monotonic() - t_kill, 2))
                        break
                except SageCommError:
                    pass  # restarting: typed, as promised
                if time.monotonic() - t_kill > 60:
                    recovered_after.append(None)
                    break
                time.sleep(0.1)  # the restart happens in other processes
        except SageCommError:
            pass  # it was restarting: try again on the next turn
    callers.stop()
    t_end = time.time()

    # Leaks: the library's own collection first, nobody's gc by hand.
    time.sleep(JANITOR_GRACE + 2 * JANITOR_SECONDS)
    segs = shm.list_segments(bus_namespace(bus_name))
    stale = [s for s in segs if s.stale]
    leaked = [s.shm_name for s in stale]
    # Per node, by the creator's node where known (replicas; callers and the
    # aggregate run on the head). One machine: the nodes share /dev/shm.
    leaked_by_node: dict = {}
    for s in stale:
        node = NODE_OF_PID.get(s.creator_pid, "head or unknown")
        leaked_by_node[node] = leaked_by_node.get(node, 0) + 1
    collected = ray.get(gateway.janitor_stats.remote(), timeout=60)["collected"] - collected_before

    events = read_events(folder)
    p1 = [e for e in events if e["t"] <= phase1_t]
    p2 = [e for e in events if phase1_t < e["t"] <= t_end]
    report = {
        "run": run_info(),
        "seed": seed,
        "minutes": args.minutes,
        "phase1": {
            "calls_ok": sum(1 for e in p1 if e.get("ok")),
            "calls_failed": sum(1 for e in p1 if "typed" in e or "untyped" in e),
            "wrong_replies": sum(1 for e in p1 if "wrong" in e),
            "failures": [e for e in p1 if "typed" in e or "untyped" in e or "wrong" in e][:10],
            "acknowledged": len(acked),
            "lost": len(lost),
            "lost_ids": lost[:10],
            "replica_kills": replica_kills,
            "caller_kills": callers.killed,
        },
        "phase2": {
            "aggregate_kills": aggregate_kills,
            "calls_ok": sum(1 for e in p2 if e.get("ok")),
            "calls_failed_typed": sum(1 for e in p2 if "typed" in e),
            "failed_by_type": {
                t: sum(1 for e in p2 if e.get("typed") == t) for t in sorted({e["typed"] for e in p2 if "typed" in e})
            },
            "calls_failed_untyped": sum(1 for e in p2 if "untyped" in e),
            "wrong_replies": sum(1 for e in p2 if "wrong" in e),
            "recovered_after_s": recovered_after,
        },
        "slowest_call_s": max((e["dt"] for e in events), default=0.0),
        "hangs": sum(1 for e in events if e["dt"] > CALL_TIMEOUT + HANG_SLACK),
        "segments_collected_by_library": collected,
        "segments_leaked": len(leaked),
        "leaked": leaked[:10],
        "nodes": args.nodes,
        "replica_kills_by_node": kills_by_node,
        "node_removed": removed,
        "segments_leaked_by_node": leaked_by_node,
        "seconds": round(t_end - t_start, 1),
    }
    ok = (
        report["phase1"]["calls_failed"] == 0
        and report["phase1"]["wrong_replies"] == 0
        and report["phase1"]["lost"] == 0
        and report["phase2"]["calls_failed_untyped"] == 0
        and report["phase2"]["wrong_replies"] == 0
        and all(r is not None for r in recovered_after)
        and report["hangs"] == 0
        and report["segments_leaked"] == 0
        and report["phase1"]["calls_ok"] > 0
        and report["phase2"]["calls_ok"] > 0
        and (cluster is None or bool(removed))
    )
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    client.close()
    bus.shutdown()
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
