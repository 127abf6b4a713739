"""The ``sage-comm`` command.

::

    sage-comm demo          # a small service pipeline on an embedded local Ray
    sage-comm status [--bus NAME] [--address ADDR]   # the live registry of a bus
    sage-comm metrics [--bus NAME] [--address ADDR]  # current metric values
    sage-comm queue-demo    # a short SageQueue demo between two processes
    sage-comm gc [--dry-run] [--namespace NS]
    sage-comm segments      # list sage_ray_comm segments on this node
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import sys
import time
from collections.abc import Sequence

from . import _demo, shm
from .errors import QueueEmpty, RouterUnavailable
from .queue import SageQueue
from .router import ROUTER_NAMESPACE, router_client
from .views import replica_rows

__all__ = ["main"]


def _demo_consumer(ref, n: int, out_ref) -> None:
    q, out = ref.get_queue(), out_ref.get_queue()
    out.put_bytes(b"ready")
    total = 0
    for _ in range(n):
        total += q.get(timeout=30)["value"]
    out.put_bytes(str(total).encode())


def cmd_queue_demo(args: argparse.Namespace) -> int:
    n = args.messages
    ns = f"demo-{int(time.time() * 1000)}"
    ctx = mp.get_context("spawn")
    with SageQueue("records", maxsize=4 << 20, namespace=ns) as q, SageQueue("result", namespace=ns) as out:
        proc = ctx.Process(target=_demo_consumer, args=(q.get_reference(), n, out.get_reference()))
        proc.start()
        assert out.get_bytes(timeout=60) == b"ready"  # time the transfer, not the child's start-up
        t0 = time.perf_counter()
        for i in range(n):
            q.put({"value": i, "payload": "x" * 48})
        while True:
            try:
                total = int(out.get_bytes(timeout=0.5))
                break
            except QueueEmpty:
                if not proc.is_alive():  # do not wait for a result that cannot come
                    print(f"consumer process died (exit code {proc.exitcode})", file=sys.stderr)
                    return 1
        dt = time.perf_counter() - t0
        proc.join(10)
        expect = n * (n - 1) // 2
        print(
            f"sent {n} records to another process through shared memory in {dt * 1e3:.1f} ms ({n / dt:,.0f} records/s)"
        )
        print(f"consumer's sum {total} (expected {expect}): {'OK' if total == expect else 'MISMATCH'}")
        print(
            f"queue stats: {q.stats()['messages_in']} in, {q.stats()['messages_out']} out, "
            f"{q.stats()['frames_dropped']} dropped"
        )
        return 0 if total == expect and proc.exitcode == 0 else 1


def cmd_demo(args: argparse.Namespace) -> int:
    return _demo.run(records=args.records, window=args.window)


def _connect(address: str | None) -> None:
    import socket

    import ray

    if address and address != "auto" and "://" not in address:
        # Ray retries an unreachable GCS for a long time: probe it first.
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
        except (OSError, ValueError) as e:
            raise SystemExit(
                f"sage-comm: no running Ray cluster at {address} ({e}); pass --address host:port of a running cluster"
            ) from None
    try:
        ray.init(address=address or "auto", log_to_driver=False, configure_logging=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SystemExit(
            f"sage-comm: no running Ray cluster at {address or 'auto'} ({type(e).__name__}: {e}); "
            "pass --address host:port of a running cluster"
        ) from None


def _known_buses() -> list:
    import ray

    return sorted(
        a["name"].split(":")[1]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == ROUTER_NAMESPACE and a["name"].startswith("sage:") and a["name"].endswith(":router")
    )


def status_rows(snap: dict, now: float | None = None) -> list:
    """Rows of the status table: the registry's replica rows, formatted for a terminal."""

    return [
        {
            "service": r["service"],
            "replica": r["replica"],
            "node": (r["node"] or "?")[:8],
            "pid": r["pid"],
            "alive": "yes" if r["alive"] else "no",
            "in-flight": r["in_flight"],
            "streams": r["streams"],
            "calls": r["handled"],
            "errors": r["errors"],
            "functions": ", ".join(f for f in r["functions"] if not f.startswith("@")),
        }
        for r in replica_rows(snap, now)
    ]


def format_table(rows: list) -> str:
    if not rows:
        return "(no services)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:

    _connect(args.address)
    try:
        router = router_client(args.bus, create=False)
        snap = router.snapshot()
    except RouterUnavailable:
        buses = _known_buses()
        print(f"sage-comm: no bus '{args.bus}' on this cluster; buses: {', '.join(buses) or '(none)'}", file=sys.stderr)
        return 1
    print(f"bus '{args.bus}' (registry version {snap['version']})")
    print(format_table(status_rows(snap)))
    if snap["subscriptions"]:
        print("\nsubscriptions")
        print(
            format_table(
                [
                    {"pattern": s.pattern, "group": s.group or "-", "node": (s.node_id or "?")[:8], "pid": s.pid}
                    for s in snap["subscriptions"]
                ]
            )
        )
    if snap.get("queues"):
        print("\nlegacy queues")
        print(
            format_table(
                [
                    {"queue": q, "node": (i.get("node_id") or "?")[:8], "created by pid": i.get("pid")}
                    for q, i in sorted(snap["queues"].items())
                ]
            )
        )
    return 0


def scrape_metrics(bus: str | None = None, timeout: float = 5.0) -> list:
    """The ``ray_sage_*`` samples exported by every node's metrics agent."""
    import urllib.request

    import ray

    lines = []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=timeout).read().decode()
        except OSError as e:
            print(f"sage-comm: cannot read {url}: {e}", file=sys.stderr)
            continue
        for line in text.splitlines():
            if line.startswith("ray_sage_") and (bus is None or f'bus="{bus}"' in line):
                lines.append(line)
    return lines


def cmd_metrics(args: argparse.Namespace) -> int:
    _connect(args.address)
    lines = scrape_metrics(args.bus)
    if not lines:
        print("no sage_ray_comm metrics exported yet (they appear a few seconds after the first calls)")
        return 0
    for line in sorted(lines):
        print(line)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    removed = shm.gc(namespace=args.namespace, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for seg in removed:
        print(f"{verb} {seg.shm_name} ({seg.size} bytes, creator pid {seg.creator_pid})")
    print(f"{verb} {len(removed)} stale segment(s)")
    return 0


def cmd_segments(args: argparse.Namespace) -> int:
    segs = shm.list_segments(args.namespace)
    print(f"{'segment':<64} {'bytes':>10} {'creator':>8} {'alive':>5} {'users':>5} {'stale':>5}")
    for s in segs:
        print(
            f"{s.shm_name:<64} {s.size:>10} {s.creator_pid:>8} {s.creator_alive!s:>5} "
            f"{s.live_attached:>5} {s.stale!s:>5}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sage-comm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="a service pipeline on an embedded local Ray, with a report")
    d.add_argument("--records", type=int, default=3000)
    d.add_argument("--window", type=int, default=16, help="calls kept in flight")
    d.set_defaults(func=cmd_demo)
    st = sub.add_parser("status", help="the live registry of a running bus")
    st.add_argument("--bus", default="default")
    st.add_argument("--address", default=None, help="Ray cluster address (default: auto)")
    st.set_defaults(func=cmd_status)
    m = sub.add_parser("metrics", help="current sage_ray_comm metric values from the nodes' Prometheus endpoints")
    m.add_argument("--bus", default=None, help="only this bus")
    m.add_argument("--address", default=None, help="Ray cluster address (default: auto)")
    m.set_defaults(func=cmd_metrics)
    q = sub.add_parser("queue-demo", help="SageQueue between two processes")
    q.add_argument("--messages", type=int, default=20000)
    q.set_defaults(func=cmd_queue_demo)
    g = sub.add_parser("gc", help="remove shared-memory segments left by dead processes")
    g.add_argument("--namespace", default=None)
    g.add_argument("--dry-run", action="store_true")
    g.set_defaults(func=cmd_gc)
    s = sub.add_parser("segments", help="list sage_ray_comm segments on this node")
    s.add_argument("--namespace", default=None)
    s.set_defaults(func=cmd_segments)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
