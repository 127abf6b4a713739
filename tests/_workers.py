"""Process targets for the queue tests (importable by spawned children)."""

from __future__ import annotations

import os
import resource
import struct

import _core_override  # noqa: F401  (must precede the package import)

from sage_ray_comm import QueueClosed, QueueEmpty, SageQueue, _core

REC = struct.Struct("<II")  # (producer id, sequence number)


def produce(ns, name, pid_tag, count, payload_size):
    """Puts `count` records."""
    q = SageQueue(name, namespace=ns, create=False)
    pad = b"p" * payload_size
    for i in range(count):
        q.put_bytes(REC.pack(pid_tag, i) + pad, timeout=60)


def consume(ns, name, out, stop_after=None):
    """Gets records until the queue is closed and drained; writes each record
    (8 bytes, one atomic pipe write) to the connection `out`."""
    out_fd = out.fileno()
    q = SageQueue(name, namespace=ns, create=False)
    n = 0
    while stop_after is None or n < stop_after:
        try:
            data = q.get_bytes(timeout=60)
        except QueueClosed:
            break
        os.write(out_fd, data[: REC.size])
        n += 1


def put_objects(ns, name, objs):
    q = SageQueue(name, namespace=ns, create=False)
    for o in objs:
        q.put(o, timeout=30)


def open_by_name_and_put(ns, name, obj):
    # Opens by name only, as unrelated processes of the original code did.
    q = SageQueue(name, namespace=ns)
    q.put(obj, timeout=30)
    # The parent owns the segment; do not unlink it on exit.
    q.auto_cleanup = False


def echo_from_ref(ref, out_ref, n):
    q = ref.get_queue()
    out = out_ref.get_queue()
    for _ in range(n):
        out.put(q.get(timeout=30), timeout=30)


def echo_pickled_queue(q, out, n):
    for _ in range(n):
        out.put(q.get(timeout=30), timeout=30)


def report_qsize(ns, name, conn):
    q = SageQueue(name, namespace=ns, create=False)
    conn.send(q.qsize())
    q.put("from-child", timeout=5)
    conn.send(q.qsize())


def blocked_get_context_switches(ns, name, wait_s, conn):
    """Blocks in get() for wait_s on an empty queue; reports context switches and CPU."""
    q = SageQueue(name, namespace=ns, create=False)
    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        q.get(timeout=wait_s)
        got = "item"
    except QueueEmpty:
        got = "empty"
    after = resource.getrusage(resource.RUSAGE_SELF)
    conn.send(
        {
            "got": got,
            "nvcsw": after.ru_nvcsw - before.ru_nvcsw,
            "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        }
    )


def wait_then_report(ns, name, op, conn):
    """Blocks in get() or put() with no timeout; reports what ended the wait."""
    q = SageQueue(name, namespace=ns, create=False)
    conn.send("waiting")
    try:
        if op == "get":
            q.get()
        else:
            q.put_bytes(b"x" * (q.max_message_size), timeout=None)
        conn.send("returned")
    except QueueClosed as e:
        conn.send(f"closed: {e}")


def stall_in_hook(ns, name, hook, notify, size):
    """Runs one put (or get) that stops at `hook`; the parent SIGKILLs us there."""
    q = SageQueue(name, namespace=ns, create=False)
    q._ring._set_test_hook(hook, notify.fileno())
    if hook == _core.HOOK_IN_CONSUMER_LOCK:
        q.get_bytes(timeout=30)
    else:
        q.put_bytes(b"s" * size, timeout=30)


def create_and_linger(ns, name, conn):
    """Creates a queue (auto_cleanup) and waits to be killed: its segment is left behind."""
    q = SageQueue(name, namespace=ns)
    conn.send("created")
    conn.recv()  # never answered: the parent kills us
    q.release()


def random_worker(ns, name, role, tag, out, payload_size):
    """For the random-kill test: produce forever, writing each acknowledged
    record to `out`, or consume forever, writing each received record."""
    ack_fd = out.fileno()
    q = SageQueue(name, namespace=ns, create=False)
    if role == "producer":
        pad = b"r" * payload_size
        i = 0
        while True:
            q.put_bytes(REC.pack(tag, i) + pad, timeout=60)
            os.write(ack_fd, REC.pack(tag, i))
            i += 1
    else:
        while True:
            try:
                data = q.get_bytes(timeout=60)
            except QueueClosed:
                return
            os.write(ack_fd, data[: REC.size])


def fuzz_segment(ns, name, seed, rounds, conn):
    """Writes random bytes into a live segment and drives the queue; any crash
    kills this process (the parent checks the exit code)."""
    import random

    from sage_ray_comm import SageCommError, _core

    rng = random.Random(seed)
    q = SageQueue(name, namespace=ns, create=False, spin_us=0)
    outcomes = {"ok": 0, "error": 0}
    view = q._ring.raw_view()
    # The two process-shared mutexes sit on lines 3 and 4 of the header
    # (see _HEADER_OFFSETS). Garbage there cannot crash a reader, only make it
    # wait for its timeout, which would slow this fuzz loop down to nothing.
    lock_lo = _core._HEADER_OFFSETS["prod_lock"]
    lock_hi = _core._HEADER_OFFSETS["locks_end"]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(rounds):
        for _ in range(rng.randint(1, 4)):
            off = rng.randrange(len(view))
            n = rng.randint(1, 64)
            if off < lock_hi and off + n > lock_lo:
                continue
            n = min(n, len(view) - off)
            view[off : off + n] = bytes(rng.getrandbits(8) for _ in range(n))
        for op in ("get", "put", "qsize"):
            try:
                if op == "get":
                    q.get_bytes(timeout=0.01)
                elif op == "put":
                    q.put_bytes(b"z" * rng.randint(0, 200), timeout=0.01)
                else:
                    q.qsize()
                outcomes["ok"] += 1
            except SageCommError:
                outcomes["error"] += 1
        # A fresh opener must fail cleanly or work, never crash.
        try:
            SageQueue(name, namespace=ns, create=False).release()
            outcomes["ok"] += 1
        except SageCommError:
            outcomes["error"] += 1
    conn.send(outcomes)
