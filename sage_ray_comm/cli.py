"""The ``sage-comm`` command.

::

    sage-comm demo          # a short SageQueue demo between two processes
    sage-comm gc [--dry-run] [--namespace NS]
    sage-comm segments      # list sage_ray_comm segments on this node
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from typing import Optional, Sequence

from . import shm
from .errors import QueueEmpty
from .queue import SageQueue

__all__ = ["main"]


def _demo_consumer(ref, n: int, out_ref) -> None:
    q, out = ref.get_queue(), out_ref.get_queue()
    out.put_bytes(b"ready")
    total = 0
    for _ in range(n):
        total += q.get(timeout=30)["value"]
    out.put_bytes(str(total).encode())


def cmd_demo(args: argparse.Namespace) -> int:
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
        print(f"sent {n} records to another process through shared memory in {dt * 1e3:.1f} ms "
              f"({n / dt:,.0f} records/s)")
        print(f"consumer's sum {total} (expected {expect}): {'OK' if total == expect else 'MISMATCH'}")
        print(f"queue stats: {q.stats()['messages_in']} in, {q.stats()['messages_out']} out, "
              f"{q.stats()['frames_dropped']} dropped")
        return 0 if total == expect and proc.exitcode == 0 else 1


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
        print(f"{s.shm_name:<64} {s.size:>10} {s.creator_pid:>8} {str(s.creator_alive):>5} "
              f"{s.live_attached:>5} {str(s.stale):>5}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sage-comm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the demo")
    d.add_argument("--messages", type=int, default=20000)
    d.set_defaults(func=cmd_demo)
    g = sub.add_parser("gc", help="remove shared-memory segments left by dead processes")
    g.add_argument("--namespace", default=None)
    g.add_argument("--dry-run", action="store_true")
    g.set_defaults(func=cmd_gc)
    s = sub.add_parser("segments", help="list sage_ray_comm segments on this node")
    s.add_argument("--namespace", default=None)
    s.set_defaults(func=cmd_segments)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
