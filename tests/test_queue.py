"""SageQueue: behaviour against real processes and real shared memory."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as stdlib_queue
import signal
import stat
import threading
import time

import _workers
import numpy as np
import pytest

from sage_ray_comm import (
    DeserializationError,
    IncompatibleSegment,
    InvalidQueueArgument,
    MessageTooLarge,
    QueueClosed,
    QueueCorrupted,
    QueueEmpty,
    QueueFull,
    QueueNotFound,
    SageCommError,
    SageQueue,
    SerializationError,
    WrongNode,
    _core,
    shm,
)
from sage_ray_comm.queue import SageQueueRef

SPAWN = mp.get_context("spawn")
OFF = _core._HEADER_OFFSETS


def _join(p, timeout=60):
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"child {p.name} did not finish within {timeout}s")
    return p.exitcode


# ---------------------------------------------------------------- basics


def test_objects_round_trip_in_order(ns):
    with SageQueue("q", namespace=ns) as q:
        items = [None, 1, "two", {"three": [3]}, (4.0, b"5"), set(range(6))]
        for it in items:
            q.put(it)
        assert q.qsize() == len(items)
        assert [q.get(timeout=1) for _ in items] == items
        assert q.empty()


def test_put_plain_puts_only_what_has_no_out_of_band_buffers(ns):
    """The service layer's reply path: plain objects (and ones naming
    importable globals) go in one call; an object with a buffer anywhere in
    it is left to the caller, and nothing is put."""
    with SageQueue("q", namespace=ns) as q:
        assert q.put_plain({"label": "cat", "n": 3}) is True
        assert q.put_plain(SageQueueRef) is True  # a global: pickled by name
        assert q.put_plain([{"image": np.ones(4)}]) is False
        assert q.put_plain(pickle.PickleBuffer(bytearray(8))) is False
        assert q.qsize() == 2
        assert q.get(timeout=1) == {"label": "cat", "n": 3} and q.get(timeout=1) is SageQueueRef
        with pytest.raises(InvalidQueueArgument):
            q.put_plain(1, timeout=-1)


def test_bytes_and_objects_mix(ns):
    with SageQueue("q", namespace=ns) as q:
        q.put_bytes(b"raw\x00bytes")
        q.put_bytes(memoryview(b"view"))
        q.put({"k": "v"})
        assert q.get() == b"raw\x00bytes"  # a raw frame comes back as bytes from get()
        assert q.get_bytes() == b"view"
        assert pickle.loads(q.get_bytes()) == {"k": "v"}


def test_nowait_and_queue_module_exceptions(ns):
    with SageQueue("q", maxsize=4096, namespace=ns) as q:
        with pytest.raises(stdlib_queue.Empty):
            q.get_nowait()
        with pytest.raises(QueueEmpty):
            q.get(block=False)
        while True:
            try:
                q.put_bytes(b"", block=False)  # minimal frames: full() means not even one fits
            except QueueFull as e:
                assert isinstance(e, stdlib_queue.Full) and isinstance(e, SageCommError)
                assert "queue 'q'" in str(e) and ns in str(e)
                break
        assert q.full()
        q.get_nowait()
        assert not q.full()


def test_numpy_goes_out_of_band_aligned_and_writable(ns):
    with SageQueue("q", maxsize=16 << 20, namespace=ns) as q:
        a = np.arange(1 << 20, dtype=np.float64)  # 8 MiB... too big: half the ring is the limit
        with pytest.raises(MessageTooLarge):
            q.put(a)
        a = np.arange(1 << 19, dtype=np.float64).reshape(512, 1024)  # 4 MiB
        q.put({"frame": a, "meta": "m"})
        st = q.stats()
        # One frame whose size is the array plus a small header: not pickled twice.
        assert a.nbytes < st["bytes_in"] < a.nbytes + 1024
        out = q.get()
        assert out["meta"] == "m"
        b = out["frame"]
        assert b.shape == a.shape and b.dtype == a.dtype and np.array_equal(a, b)
        assert b.flags.writeable and b.ctypes.data % 16 == 0
        b[0, 0] = -1.0  # writable, and not aliasing the sender's array
        assert a[0, 0] == 0.0


def test_put_never_copies_an_array_in_band_first(ns):
    # put's one-call fast path pickles without out-of-band buffers; it must
    # stop at the first buffer, before pickle copies the array into bytes.
    import tracemalloc

    with SageQueue("q", maxsize=64 << 20, namespace=ns) as q:
        a = np.ones(2 << 20, dtype=np.float64)  # 16 MiB
        q.put(np.zeros(4))  # warm up (imports, first allocations)
        q.get()
        tracemalloc.start()
        try:
            q.put(a)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < a.nbytes // 8, f"put allocated {peak} bytes for a {a.nbytes}-byte array"
        assert np.array_equal(q.get(), a)


def test_non_contiguous_array_still_round_trips(ns):
    with SageQueue("q", maxsize=1 << 20, namespace=ns) as q:
        a = np.arange(10000, dtype=np.int32)[::3]
        q.put(a)
        assert np.array_equal(q.get(), a)


def test_get_bytes_returns_bytes_even_on_a_fresh_handle(ns):
    # A first small frame once came back as a bytearray (the "no writable
    # kind" value matched the handle's initial "last kind").
    with SageQueue("q", namespace=ns) as q:
        q.put_bytes(b"xy")
        got = q.get_bytes(timeout=1)
        assert got == b"xy" and type(got) is bytes
        q.put_frame([b"ab", b"cd"], 42)
        assert q.get_frame(timeout=1) == (b"abcd", 42)


def test_messages_over_64k_work(ns):
    # The original code failed silently above 64 KiB.
    with SageQueue("q", maxsize=8 << 20, namespace=ns) as q:
        for size in (64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 1 << 20, 3 << 20):
            blob = os.urandom(size)
            q.put_bytes(blob)
            got = q.get_bytes(timeout=1)
            assert got == blob and type(got) is bytes
            q.put(blob)
            assert q.get(timeout=1) == blob


def test_message_too_large_raises_at_once_naming_both_sizes(ns):
    with SageQueue("small", maxsize=64 * 1024, namespace=ns) as q:
        limit = q.max_message_size
        with pytest.raises(MessageTooLarge) as ei:
            q.put_bytes(b"x" * (limit + 1), timeout=None)  # must not block
        msg = str(ei.value)
        assert str(limit + 1) in msg and str(limit) in msg and "small" in msg
        q.put_bytes(b"x" * limit)  # exactly the limit fits
        assert len(q.get_bytes()) == limit


def test_full_ring_blocks_until_timeout_then_raises_full(ns):
    with SageQueue("q", maxsize=4096, namespace=ns) as q:
        q.put_bytes(b"a" * 1500)
        q.put_bytes(b"b" * 1500)
        t0 = time.monotonic()
        with pytest.raises(QueueFull):
            q.put_bytes(b"c" * 1500, timeout=0.3)
        waited = time.monotonic() - t0
        assert waited >= 0.3
        assert q.qsize() == 2  # nothing half-written


def test_full_ring_put_proceeds_when_a_consumer_frees_space(ns):
    with SageQueue("q", maxsize=4096, namespace=ns) as q:
        q.put_bytes(b"a" * 1500)
        q.put_bytes(b"b" * 1500)
        done = threading.Event()

        def producer():
            q.put_bytes(b"c" * 1500, timeout=30)
            done.set()

        t = threading.Thread(target=producer)
        t.start()
        assert q.get_bytes(timeout=5) == b"a" * 1500  # frees space, wakes the producer
        t.join(30)
        assert done.is_set()
        assert [q.get_bytes(timeout=1)[:1] for _ in range(2)] == [b"b", b"c"]


def test_get_timeout_raises_empty_after_waiting(ns):
    with SageQueue("q", namespace=ns) as q:
        t0 = time.monotonic()
        with pytest.raises(QueueEmpty) as ei:
            q.get(timeout=0.25)
        assert time.monotonic() - t0 >= 0.25
        assert "queue 'q'" in str(ei.value)


def test_gil_is_released_while_waiting(ns):
    # If get() held the GIL while blocked, the main thread could never put.
    with SageQueue("q", namespace=ns) as q:
        got = []
        t = threading.Thread(target=lambda: got.append(q.get(timeout=20)))
        t.start()
        q.put("wake")
        t.join(20)
        assert got == ["wake"]


def test_bad_arguments_raise_typed_errors(ns):
    with pytest.raises(InvalidQueueArgument):
        SageQueue("", namespace=ns)
    with pytest.raises(InvalidQueueArgument):
        SageQueue("q", maxsize=0, namespace=ns)
    with pytest.raises(InvalidQueueArgument):
        SageQueue("q", maxsize=1 << 50, namespace=ns)
    with SageQueue("q", namespace=ns) as q:
        with pytest.raises(InvalidQueueArgument):
            q.get(timeout=-1)
        with pytest.raises(InvalidQueueArgument):
            q.get_many(0)


def test_open_only_missing_queue_raises_not_found(ns):
    with pytest.raises(QueueNotFound) as ei:
        SageQueue("nope", namespace=ns, create=False)
    assert "nope" in str(ei.value) and ns in str(ei.value)


def test_unpicklable_object_raises_serialization_error(ns):
    with SageQueue("q", namespace=ns) as q:
        with pytest.raises(SerializationError) as ei:
            q.put(threading.Lock())
        assert "lock" in str(ei.value).lower()
        assert q.qsize() == 0


class _Boom:
    """Pickles fine, fails to unpickle."""

    def __reduce__(self):
        return (_explode, ("bad payload",))


_EXPLODE_CALLS = []


def _explode(msg):
    _EXPLODE_CALLS.append(msg)
    raise RuntimeError(msg)


def test_unpickle_failure_raises_and_queue_stays_usable(ns):
    # The original code dropped such messages silently.
    with SageQueue("q", namespace=ns) as q:
        q.put(_Boom())
        q.put("after")
        _EXPLODE_CALLS.clear()
        with pytest.raises(DeserializationError) as ei:
            q.get(timeout=1)
        assert _EXPLODE_CALLS == ["bad payload"]  # the payload's code ran once, not again for the error
        assert "bad payload" in str(ei.value) and "queue 'q'" in str(ei.value)
        assert isinstance(ei.value.__cause__, RuntimeError)
        assert q.get(timeout=1) == "after"


def test_batch_put_many_get_many(ns):
    with SageQueue("q", namespace=ns) as q:
        assert q.put_many(range(100)) == 100
        got = q.get_many(60)
        assert got == list(range(60))
        assert q.get_many(100) == list(range(60, 100))
        with pytest.raises(QueueEmpty):
            q.get_many(5, timeout=0.05)


def test_put_many_reports_partial_progress_on_full(ns):
    with SageQueue("q", maxsize=4096, namespace=ns) as q:
        with pytest.raises(QueueFull) as ei:
            q.put_many([b"y" * 1000] * 10, timeout=0.1)
        assert ei.value.put_count == q.qsize() > 0


def test_stats_count_messages_and_bytes(ns):
    with SageQueue("q", namespace=ns) as q:
        q.reset_stats()
        for i in range(10):
            q.put_bytes(b"x" * i)
        for _ in range(4):
            q.get_bytes()
        st = q.stats()
        assert (st["messages_in"], st["bytes_in"]) == (10, sum(range(10)))
        assert (st["messages_out"], st["bytes_out"]) == (4, sum(range(4)))
        assert st["qsize"] == 6 and st["queued_bytes"] == sum(range(4, 10))
        legacy = q.get_stats()
        assert legacy["total_bytes_written"] == sum(range(10))
        assert 0 < legacy["utilization"] < 1
        q.reset_stats()
        assert q.stats()["messages_in"] == 0


def test_context_manager_unlinks_what_it_created(ns):
    with SageQueue("q", namespace=ns) as q:
        path = shm.SHM_DIR + q.shm_name
        assert os.path.exists(path)
    assert not os.path.exists(path)


def test_auto_cleanup_false_keeps_segment_until_destroy(ns):
    q = SageQueue("q", namespace=ns, auto_cleanup=False)
    path = shm.SHM_DIR + q.shm_name
    q.release()
    assert os.path.exists(path)
    q2 = SageQueue("q", namespace=ns, create=False)
    q2.destroy()
    assert not os.path.exists(path)


def test_segment_is_mode_0600(ns):
    with SageQueue("q", namespace=ns) as q:
        mode = stat.S_IMODE(os.stat(shm.SHM_DIR + q.shm_name).st_mode)
        assert mode == 0o600


def test_namespaces_isolate_same_name(ns):
    with SageQueue("jobs", namespace=ns + "-a") as a, SageQueue("jobs", namespace=ns + "-b") as b:
        assert a.shm_name != b.shm_name
        a.put("for a")
        with pytest.raises(QueueEmpty):
            b.get(timeout=0.05)
        assert a.get() == "for a"
    # Sanitised names that collide still get distinct segments.
    assert shm.segment_name("x/y", "q") != shm.segment_name("x_y", "q")


def test_close_drains_then_raises_closed(ns):
    with SageQueue("q", namespace=ns) as q:
        q.put(1)
        q.close()
        assert q.closed
        with pytest.raises(QueueClosed):
            q.put(2)
        assert q.get(timeout=1) == 1
        with pytest.raises(QueueClosed):
            q.get(timeout=1)


def test_released_handle_raises_closed(ns):
    q = SageQueue("q", namespace=ns)
    q.release()
    with pytest.raises(QueueClosed):
        q.put(1)


# ------------------------------------------------------- across processes


def test_cross_process_spawn_by_reference(ns):
    with SageQueue("in", namespace=ns) as q, SageQueue("out", namespace=ns) as out:
        p = SPAWN.Process(target=_workers.echo_from_ref, args=(q.get_reference(), out.get_reference(), 50))
        p.start()
        for i in range(50):
            q.put({"i": i, "blob": os.urandom(i)})
        got = [out.get(timeout=30) for _ in range(50)]
        assert _join(p) == 0
        assert [g["i"] for g in got] == list(range(50))


def test_pickled_queue_reattaches_in_child(ns):
    with SageQueue("in", namespace=ns) as q, SageQueue("out", namespace=ns) as out:
        p = SPAWN.Process(target=_workers.echo_pickled_queue, args=(q, out, 3))
        p.start()
        for x in ("a", "b", "c"):
            q.put(x)
        assert [out.get(timeout=30) for _ in range(3)] == ["a", "b", "c"]
        assert _join(p) == 0
        # Pickling never creates: a removed queue cannot be revived by unpickling.
        blob = pickle.dumps(q)
    with pytest.raises(QueueNotFound):
        pickle.loads(blob)


def test_same_name_in_two_processes_is_one_queue(ns):
    # The original code derived names from the pid, so these two never met.
    with SageQueue("shared", namespace=ns) as q:
        p = SPAWN.Process(target=_workers.open_by_name_and_put, args=(ns, "shared", "hello from child"))
        p.start()
        assert q.get(timeout=30) == "hello from child"
        assert _join(p) == 0


def test_qsize_counts_all_processes(ns):
    # The original code's qsize counted only the calling process's own puts.
    with SageQueue("q", namespace=ns) as q:
        for i in range(5):
            q.put(i)
        parent, child = SPAWN.Pipe()
        p = SPAWN.Process(target=_workers.report_qsize, args=(ns, "q", child))
        p.start()
        assert parent.recv() == 5
        assert parent.recv() == 6
        assert _join(p) == 0
        assert q.qsize() == 6


def test_blocked_get_sleeps_instead_of_polling(ns):
    # The original code polled with 1 ms sleeps: ~1000 context switches per second of
    # waiting. A futex sleep wakes only at its (long) re-check slices.
    with SageQueue("q", namespace=ns):
        parent, child = SPAWN.Pipe()
        p = SPAWN.Process(target=_workers.blocked_get_context_switches, args=(ns, "q", 1.0, child))
        p.start()
        r = parent.recv()
        assert _join(p) == 0
    assert r["got"] == "empty"
    assert r["nvcsw"] < 50, r
    assert r["cpu"] < 0.2, r


@pytest.mark.parametrize("op", ["get", "put"])
def test_close_wakes_waiters_in_other_processes(ns, op):
    with SageQueue("q", maxsize=8192, namespace=ns) as q:
        if op == "put":
            q.put_bytes(b"f" * q.max_message_size)
            q.put_bytes(b"f" * q.max_message_size)
            assert q.full()  # the child's put blocks
        parent, child = SPAWN.Pipe()
        p = SPAWN.Process(target=_workers.wait_then_report, args=(ns, "q", op, child))
        p.start()
        assert parent.recv() == "waiting"
        q.close()
        assert parent.poll(30), "waiter was not woken by close()"
        assert parent.recv().startswith("closed")
        assert _join(p) == 0


def test_ray_actor_opens_reference(ns, ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0.1)
    class Echo:
        def run(self, ref, out_ref, n):
            q, out = ref.get_queue(), out_ref.get_queue()
            for _ in range(n):
                out.put(q.get(timeout=30) * 2)
            return os.getpid()

    with SageQueue("in", namespace=ns) as q, SageQueue("out", namespace=ns) as out:
        ref = q.get_reference()
        assert ref.node_id == ray.get_runtime_context().get_node_id()
        actor = Echo.remote()
        done = actor.run.remote(ref, out.get_reference(), 20)
        for i in range(20):
            q.put(i)
        assert [out.get(timeout=30) for _ in range(20)] == [2 * i for i in range(20)]
        assert ray.get(done, timeout=30) != os.getpid()
        ray.kill(actor)


def test_reference_from_another_machine_raises_wrong_node(ns):
    with SageQueue("q", namespace=ns) as q:
        ref = q.get_reference()
        foreign = SageQueueRef(ref.queue_name, ref.namespace, ref.maxsize, ref.creator_pid, "other-node", "other-boot")
        with pytest.raises(WrongNode) as ei:
            foreign.get_queue()
        assert "other-node" in str(ei.value)
        assert pickle.loads(pickle.dumps(ref)).get_queue().name == "q"


# ------------------------------------------------------------ MPMC stress


def _collect(fd):
    data = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return data
        data += chunk


def _records(blob):
    return [_workers.REC.unpack_from(blob, i) for i in range(0, len(blob), _workers.REC.size)]


@pytest.mark.slow
def test_mpmc_stress_no_loss_no_duplicates(ns):
    producers, consumers, per_producer = 3, 3, 4000
    with SageQueue("q", maxsize=64 * 1024, namespace=ns) as q:  # small ring: lots of wrap-around
        r, w = SPAWN.Pipe(duplex=False)
        procs = [
            SPAWN.Process(target=_workers.produce, args=(ns, "q", tag, per_producer, tag * 37 % 300))
            for tag in range(producers)
        ]
        procs += [SPAWN.Process(target=_workers.consume, args=(ns, "q", w)) for _ in range(consumers)]
        for p in procs:
            p.start()
        out = []
        reader = threading.Thread(target=lambda: out.append(_collect(r.fileno())))
        w.close()  # children hold their own copies; EOF once they all exit
        reader.start()
        for p in procs[:producers]:
            assert _join(p, 120) == 0
        q.close()  # consumers drain, then stop
        for p in procs[producers:]:
            assert _join(p, 120) == 0
        reader.join(60)
        recs = _records(out[0])
        assert len(recs) == len(set(recs)), "a message was delivered twice"
        assert set(recs) == {(t, i) for t in range(producers) for i in range(per_producer)}
        # Per producer, consumers as a group saw sequence numbers in FIFO order
        # of commit; each individual consumer sees each producer's records in order.
        assert q.stats()["frames_dropped"] == 0


# ------------------------------------------------------- faults: SIGKILL


def _stall_and_kill(ns, name, hook, size=256):
    r, w = SPAWN.Pipe(duplex=False)
    p = SPAWN.Process(target=_workers.stall_in_hook, args=(ns, name, hook, w, size))
    p.start()
    w.close()
    assert r.poll(60), "child never reached the hook"
    assert os.read(r.fileno(), 1) == b"x"
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    r.close()
    assert p.exitcode == -signal.SIGKILL


def test_producer_killed_between_claim_and_commit_is_skipped_and_counted(ns):
    with SageQueue("q", namespace=ns) as q:
        q.put("before")
        _stall_and_kill(ns, "q", hook=_core.HOOK_AFTER_CLAIM)
        q.put("after")
        assert q.get(timeout=5) == "before"
        assert q.get(timeout=5) == "after"  # the dead claim did not wedge the reader
        st = q.stats()
        assert st["frames_dropped"] == 1
        assert q.qsize() == 0


def test_unblock_skips_a_dead_claim_on_request(ns):
    with SageQueue("q", namespace=ns) as q:
        assert q.unblock() is False  # nothing to skip
        _stall_and_kill(ns, "q", hook=_core.HOOK_AFTER_CLAIM)
        assert q.stats()["tail"] > q.stats()["head"]  # the dead claim sits at head
        assert q.unblock() is True
        assert q.stats()["head"] == q.stats()["tail"] and q.stats()["frames_dropped"] == 1
        assert q.unblock() is False


def test_consumer_blocked_behind_claim_notices_producer_death(ns):
    with SageQueue("q", namespace=ns) as q:
        got = []
        t = threading.Thread(target=lambda: got.append(q.get(timeout=30)))
        t.start()
        _stall_and_kill(ns, "q", hook=_core.HOOK_AFTER_CLAIM)  # the waiting consumer now faces a dead claim
        q.put("next")
        t.join(30)
        assert got == ["next"]
        assert q.stats()["frames_dropped"] == 1


def test_producer_killed_holding_the_lock_does_not_wedge(ns):
    with SageQueue("q", namespace=ns) as q:
        _stall_and_kill(ns, "q", hook=_core.HOOK_IN_PRODUCER_LOCK)
        q.put("after", timeout=5)  # EOWNERDEAD recovered, nothing half-claimed
        assert q.get(timeout=5) == "after"
        st = q.stats()
        assert st["lock_recoveries"] == 1 and st["frames_dropped"] == 0


def test_consumer_killed_mid_copy_leaves_message_for_the_next(ns):
    with SageQueue("q", namespace=ns) as q:
        q.put_bytes(b"precious")
        _stall_and_kill(ns, "q", hook=_core.HOOK_IN_CONSUMER_LOCK)
        assert q.get_bytes(timeout=5) == b"precious"  # not lost, delivered once
        with pytest.raises(QueueEmpty):
            q.get_bytes(timeout=0.05)
        assert q.stats()["lock_recoveries"] == 1


@pytest.mark.slow
def test_random_sigkills_never_wedge_or_duplicate(ns):
    """Producers and consumers are SIGKILLed at random moments, many times.

    Acknowledged puts (put returned) must all arrive, except at most one per
    killed consumer: the message it had taken but not yet recorded when it
    died. Nothing arrives twice, and the queue keeps working throughout.
    """
    import random

    rng = random.Random(1234)
    rounds = 25
    with SageQueue("q", maxsize=32 * 1024, namespace=ns) as q:
        ack_r, ack_w = SPAWN.Pipe(duplex=False)
        got_r, got_w = SPAWN.Pipe(duplex=False)
        acks, got = [], []
        t1 = threading.Thread(target=lambda: acks.append(_collect(ack_r.fileno())))
        t2 = threading.Thread(target=lambda: got.append(_collect(got_r.fileno())))

        def start(role, tag):
            fd = ack_w if role == "producer" else got_w
            p = SPAWN.Process(target=_workers.random_worker, args=(ns, "q", role, tag, fd, rng.randint(0, 3000)))
            p.start()
            return p

        t1.start()
        t2.start()
        tag = 0
        prods = [start("producer", tag := tag + 1) for _ in range(2)]
        cons = [start("consumer", 0) for _ in range(2)]
        killed_consumers = killed_producers = 0
        for _ in range(rounds):
            # Let traffic flow, then kill one worker at a random instant.
            target = q.stats()["messages_out"] + rng.randint(20, 400)
            deadline = time.monotonic() + 30
            while q.stats()["messages_out"] < target and time.monotonic() < deadline:
                time.sleep(0.001)
            assert time.monotonic() < deadline, "traffic stopped: the queue is wedged"
            pool = prods if rng.random() < 0.5 else cons
            i = rng.randrange(len(pool))
            os.kill(pool[i].pid, signal.SIGKILL)
            pool[i].join(30)
            if pool is prods:
                killed_producers += 1
                pool[i] = start("producer", tag := tag + 1)
            else:
                killed_consumers += 1
                pool[i] = start("consumer", 0)
        for p in prods:
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
            killed_producers += 1
        # Drain what is left with the surviving consumers, then stop them.
        deadline = time.monotonic() + 60
        while q.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)
        q.close()
        for p in cons:
            assert _join(p, 60) == 0
        ack_w.close()
        got_w.close()
        t1.join(60)
        t2.join(60)
        acked = set(_records(acks[0]))
        received = _records(got[0])
        assert len(received) == len(set(received)), "a message was delivered twice"
        missing = acked - set(received)
        assert len(missing) <= killed_consumers, (len(missing), killed_consumers)
        st = q.stats()
        assert st["frames_dropped"] <= killed_producers
        assert len(acked) > rounds * 20
    # Killed workers may leave their own attach slots; the segment itself was
    # unlinked by its creator (this process) on exit from the with block.


def test_gc_removes_segments_of_dead_creators_only(ns):
    parent, child = SPAWN.Pipe()
    p = SPAWN.Process(target=_workers.create_and_linger, args=(ns, "orphan", child))
    p.start()
    assert parent.recv() == "created"
    with SageQueue("alive", namespace=ns):
        assert {s.shm_name for s in shm.gc(namespace=ns, dry_run=True)} == set()
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        stale = shm.gc(namespace=ns, dry_run=True)
        assert [s.shm_name for s in stale] == [shm.segment_name(ns, "orphan")]
        removed = shm.gc(namespace=ns)
        assert [s.shm_name for s in removed] == [shm.segment_name(ns, "orphan")]
        assert not os.path.exists(shm.SHM_DIR + shm.segment_name(ns, "orphan"))
        # The live one is untouched.
        assert os.path.exists(shm.SHM_DIR + shm.segment_name(ns, "alive"))


def test_creator_dying_before_layout_is_taken_over(ns):
    # A creator killed between shm_open and writing the header leaves an
    # empty segment; the next opener lays it out.
    name = shm.segment_name(ns, "half")
    fd = os.open(shm.SHM_DIR + name, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    with SageQueue("half", namespace=ns) as q:
        q.put("works")
        assert q.get() == "works"
        assert q.created  # we laid it out, so we unlink it on exit


# ------------------------------------------------- corrupt segments


def test_bad_magic_and_version_raise_incompatible(ns):
    q = SageQueue("q", namespace=ns, auto_cleanup=False)
    view = q._ring.raw_view()
    view[OFF["version"] : OFF["version"] + 4] = (99).to_bytes(4, "little")
    with pytest.raises(IncompatibleSegment) as ei:
        SageQueue("q", namespace=ns, create=False)
    assert "version" in str(ei.value)
    view[OFF["magic"] : OFF["magic"] + 8] = b"NOTARING"
    with pytest.raises(IncompatibleSegment) as ei:
        SageQueue("q", namespace=ns, create=False)
    assert "magic" in str(ei.value)
    # The open handle notices too, with a clear error instead of a crash.
    with pytest.raises(QueueCorrupted):
        q.put(1)
    del view
    q.destroy()


def test_corrupt_counters_and_frames_raise_corrupted(ns):
    with SageQueue("q", namespace=ns) as q:
        q.put("a")
        view = q._ring.raw_view()
        data = OFF["data"]
        saved = bytes(view[data : data + 16])
        view[data + 12 : data + 16] = b"\xde\xad\xbe\xef"  # the frame's tag
        with pytest.raises(QueueCorrupted) as ei:
            q.get(timeout=1)
        assert "position 0" in str(ei.value)
        view[data : data + 16] = saved
        assert q.get(timeout=1) == "a"  # repaired bytes: usable again
        head = OFF["head"]
        view[head : head + 8] = (1 << 62).to_bytes(8, "little")
        with pytest.raises(QueueCorrupted) as ei:
            q.get(timeout=1)
        assert "head/tail" in str(ei.value)
        # Producers read the consumers' head only when the ring looks full,
        # so a put notices a corrupt counter of its own side.
        tail = OFF["tail"]
        view[tail : tail + 8] = (1 << 61).to_bytes(8, "little")
        with pytest.raises(QueueCorrupted):
            q.put(1)
        del view


@pytest.mark.slow
def test_random_bytes_in_segment_never_crash(ns):
    outcomes = []
    for seed in range(3):
        with SageQueue(f"q{seed}", maxsize=8192, namespace=ns) as q:
            for i in range(20):
                q.put_bytes(bytes([i]) * (i * 40))
            parent, child = SPAWN.Pipe()
            p = SPAWN.Process(target=_workers.fuzz_segment, args=(ns, f"q{seed}", seed, 200, child))
            p.start()
            assert _join(p, 180) == 0  # a segfault would show as -11
            outcomes.append(parent.recv())
    assert sum(o["error"] for o in outcomes) > 0  # corruption was detected, not ignored
    assert sum(o["ok"] for o in outcomes) > 0


def test_get_shared_memory_info_describes_the_segment(ns):
    q = SageQueue("info", 64 * 1024, namespace=ns)
    try:
        info = q.get_shared_memory_info()
        assert info["original_name"] == "info" and info["namespace"] == ns
        assert "/" + info["namespaced_name"] == shm.segment_name(ns, "info")
        assert os.path.getsize(info["shm_path"]) == info["size_bytes"] == 64 * 1024 + _core.HEADER_SIZE
        assert info["capacity"] == 64 * 1024 and info["max_message_size"] == q.max_message_size
        assert info["creator_pid"] == os.getpid() and info["created_here"] is True and info["auto_cleanup"] is True
        other = SageQueue("info", namespace=ns, create=False)
        assert other.get_shared_memory_info()["created_here"] is False
        other.release()
    finally:
        q.destroy()
