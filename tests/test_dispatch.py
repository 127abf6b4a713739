"""The dispatcher threads of a ring (dispatch.py), with a queue.Queue as the
ring: pure thread logic, no Ray. The real path (a replica's ring) is
exercised by every service test, and its concurrency by test_ray_transport's
and test_faults' max_concurrency tests."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from sage_ray_comm.dispatch import QUIET_LOOKS, STOP, Dispatchers

WAIT = 10.0  # the most any step below may take (it takes milliseconds)


def wait_for(cond: threading.Condition, pred, what: str) -> None:
    with cond:
        assert cond.wait_for(pred, WAIT), what


@pytest.fixture
def ring():
    """(queue, serve): serve(run, max_threads, relief_seconds, items) starts
    dispatchers on the queue and puts ``items`` in it; all stop at the end."""
    q: queue.Queue = queue.Queue()
    made: list[Dispatchers] = []

    def serve(run, max_threads: int, relief_seconds: float = 0.001, items=()) -> Dispatchers:
        d = Dispatchers("t", q.get, run, max_threads=max_threads, relief_seconds=relief_seconds)
        made.append(d)
        d.start()
        for i in items:
            q.put(i)
        return d

    yield q, serve
    for d in made:
        d.stop()
        q.put(STOP)
        d.join(WAIT)
        assert not any(t.is_alive() for t in d.threads)


def test_short_requests_all_run_on_the_thread_that_took_them(ring):
    _q, serve = ring
    seen: list[int] = []
    done = threading.Event()

    def run(i):
        seen.append(threading.get_ident())
        if i == 1999:
            done.set()

    # A relief that looks every 5 s cannot take over from a handler of microseconds.
    d = serve(run, 4, relief_seconds=5.0, items=range(2000))
    assert done.wait(WAIT)
    # The plain scheme hands the ring to the other thread on every request.
    assert len(set(seen)) == 1
    assert d.reliefs == 0


def test_a_blocked_request_is_relieved_and_the_rest_run_meanwhile(ring):
    _q, serve = ring
    release = threading.Event()
    cond = threading.Condition()
    ran: dict = {}

    def run(i):
        if i == "block":
            release.wait(WAIT)
        with cond:
            ran[i] = threading.get_ident()
            cond.notify_all()

    d = serve(run, 2, items=["block", *range(20)])
    wait_for(cond, lambda: len(ran) == 20, f"requests behind a blocked one did not run: {sorted(ran)}")
    assert "block" not in ran and d.reliefs == 1
    release.set()
    wait_for(cond, lambda: "block" in ran, "the blocked request never finished")
    assert ran["block"] != ran[0]


def test_a_relief_that_stopped_looking_is_woken_by_the_next_request(ring):
    q, serve = ring
    release = threading.Event()
    cond = threading.Condition()
    ran: list = []

    def run(i):
        if i == "block":
            release.wait(WAIT)
        with cond:
            ran.append(i)
            cond.notify_all()

    d = serve(run, 2, items=["first"])
    wait_for(cond, lambda: ran == ["first"], "the first request did not run")
    # An idle replica stops looking after QUIET_LOOKS looks...
    deadline = time.monotonic() + WAIT
    while not d.relief_asleep:  # nothing signals it: look every millisecond
        assert time.monotonic() < deadline, f"still looking after {d.looks} looks"
        threading.Event().wait(0.001)
    looks = d.looks
    assert looks >= QUIET_LOOKS
    threading.Event().wait(0.05)  # 50 ms: an awake relief would look about 50 times
    assert d.looks == looks
    # ...and looks again once a request runs: a blocked one is still relieved.
    q.put("block")
    q.put("after")
    wait_for(cond, lambda: "after" in ran, "a request behind a blocked one waited for it")
    assert "block" not in ran
    release.set()


def test_never_more_threads_than_max_threads(ring):
    q, serve = ring
    release = threading.Event()
    cond = threading.Condition()
    running = [0, 0]  # now, most at once

    def run(i):
        with cond:
            running[0] += 1
            running[1] = max(running[1], running[0])
            cond.notify_all()
        release.wait(WAIT)
        with cond:
            running[0] -= 1
            cond.notify_all()

    d = serve(run, 3, items=range(6))
    wait_for(cond, lambda: running[0] == 3, "three blocked requests did not run at once")
    # Every thread there may be is running one: nobody is left to take the rest.
    assert len(d.threads) == 3 and q.qsize() == 3
    release.set()
    wait_for(cond, lambda: q.qsize() == 0 and running[0] == 0, "the rest did not run")
    assert running[1] == 3 and len(d.threads) == 3


def test_a_run_that_raises_keeps_its_thread(ring):
    _q, serve = ring
    done = threading.Event()

    def run(i):
        if i == 0:
            raise RuntimeError("boom")
        done.set()

    d = serve(run, 1, items=[0, 1])
    assert done.wait(WAIT)
    assert len(d.threads) == 1


def test_a_take_that_raises_does_not_leave_the_ring_to_nobody():
    q: queue.Queue = queue.Queue()
    calls = [0]

    def take():
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a bad frame")
        return q.get()

    done = threading.Event()
    d = Dispatchers("t", take, lambda i: done.set(), max_threads=2)
    d.start()
    q.put("after")
    assert done.wait(WAIT)
    q.put(STOP)
    d.join(WAIT)
    assert not any(t.is_alive() for t in d.threads)


def test_stop_from_the_ring_ends_every_thread():
    q: queue.Queue = queue.Queue()
    release = threading.Event()
    cond = threading.Condition()
    started = []

    def run(i):
        with cond:
            started.append(i)
            cond.notify_all()
        release.wait(WAIT)

    d = Dispatchers("t", q.get, run, max_threads=4, relief_seconds=0.001)
    d.start()
    for i in range(3):
        q.put(i)
    wait_for(cond, lambda: len(started) == 3, "three requests did not run at once")
    release.set()
    q.put(STOP)  # what take() returns once the ring closed
    d.join(WAIT)
    assert len(d.threads) == 4  # three running, one relief
    assert not any(t.is_alive() for t in d.threads)
