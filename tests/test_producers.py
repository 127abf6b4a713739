"""A replica's open streams (producers.py), as pure logic in this process:
what a fetch returns, who may read, and what the heartbeat's reap closes.
The same code serves real consumers in tests/test_streams.py."""

from __future__ import annotations

import subprocess
import sys
import time

from sage_ray_comm import shm
from sage_ray_comm._wire import END_CLOSED, END_CONSUMED, END_DONE, END_ERROR, END_MORE
from sage_ray_comm.producers import IDLE_SECONDS, Producers, consumer_token


def _gen(n: int, log: list):
    try:
        yield from range(n)
    finally:
        log.append("closed")


def test_a_fetch_makes_at_most_what_is_asked_and_says_how_it_ended():
    p, log = Producers("svc", "svc-1", shm.host_id()), []
    sid = p.open(_gen(5, log), False).stream_id
    b = p.next(sid, 2, "me")
    assert (b.items, b.end) == ([0, 1], END_MORE)
    b = p.next(sid, 10, "me")
    assert (b.items, b.end) == ([2, 3, 4], END_DONE) and log == ["closed"] and len(p) == 0
    assert p.next(sid, 1, "me").end == END_CLOSED


def test_one_consumer_at_a_time():
    p, log = Producers("svc", "svc-1", shm.host_id()), []
    sid = p.open(_gen(5, log), False).stream_id
    assert p.next(sid, 1, "first").items == [0]
    assert p.next(sid, 1, "second").end == END_CONSUMED
    assert not p.close(sid, "second") and log == []  # nor may it close it
    assert p.close(sid, "first") and log == ["closed"]


def test_a_generator_that_raises_ends_with_its_error():
    def fails():
        yield 1
        raise KeyError("gone")

    p = Producers("svc", "svc-1", shm.host_id())
    b = p.next(p.open(fails(), False).stream_id, 10, "me")
    assert b.items == [1] and b.end == END_ERROR and b.error[1] == "builtins.KeyError"


def test_reap_closes_streams_of_dead_consumers_and_idle_ones():
    p, log = Producers("svc", "svc-1", shm.host_id()), []
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    live, dead, idle = (p.open(_gen(10, log), False).stream_id for _ in range(3))
    p.next(live, 1, consumer_token(shm.host_id(), 1))  # pid 1 lives
    p.next(dead, 1, consumer_token(shm.host_id(), dead_pid))
    p.next(idle, 1, consumer_token("another-host", 1))
    assert p.reap(None) == 1 and log == ["closed"]  # the dead consumer's
    p._open[idle].last = time.monotonic() - IDLE_SECONDS - 1  # nobody fetched it for that long
    assert p.reap(None) == 1 and log == ["closed", "closed"]
    assert list(p._open) == [live]
