"""Claim tables (claims.py): a caller's cancel() and the replica that takes
the request race for one word in shared memory, and exactly one wins, across
real processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import uuid

import pytest

from sage_ray_comm import shm
from sage_ray_comm.claims import CANCELLED, EXPIRED, PENDING, TAKEN, ClaimReader, ClaimTable

RACED = 20_000


def _ns() -> str:
    return f"claims-{uuid.uuid4().hex[:8]}"


def _take_all(name: str, ns: str, tickets: list[int], start, out) -> None:
    reader = ClaimReader(ns)
    reader.take(name, tickets[0] + (1 << 40))  # opens the table (a ticket of no call: taken by nobody)
    start.wait()
    taken = {t: reader.take(name, t) for t in reversed(tickets)}  # from the other end: they meet
    out.put([taken[t] for t in tickets])
    reader.close()


def test_the_caller_and_a_replica_in_another_process_never_both_win():
    ns = _ns()
    ctx = multiprocessing.get_context("spawn")
    table = ClaimTable("race", ns, slots=1 << 15)
    tickets = [table.arm() for _ in range(RACED)]
    start, out = ctx.Barrier(2), ctx.Queue()
    p = ctx.Process(target=_take_all, args=("race", ns, tickets, start, out))
    p.start()
    start.wait(timeout=30)
    cancelled = [table.cancel(t) for t in tickets]  # races the other process's takes
    taken = out.get(timeout=60)
    p.join(timeout=30)
    table.close()
    assert 0 < sum(cancelled) < RACED  # both sides won some: they did race
    both = [i for i in range(RACED) if cancelled[i] and taken[i] == TAKEN]
    neither = [i for i in range(RACED) if not cancelled[i] and taken[i] != TAKEN]
    assert both == [] and neither == []
    assert all(t == CANCELLED for t, c in zip(taken, cancelled, strict=True) if c)  # the loser saw why


def test_a_reused_slot_is_not_taken_by_its_old_request():
    ns = _ns()
    table = ClaimTable("reuse", ns, slots=512)
    reader = ClaimReader(ns)
    try:
        old = table.arm()
        assert table.cancel(old)
        table.release(old)
        table.release(old)  # a second release does nothing
        fresh = [table.arm() for _ in range(512)]  # every slot, the old one again among them
        assert table.arm() == 0 and table.full == 1  # none left: that call goes without a ticket
        assert old not in fresh
        assert reader.take("reuse", old) == 0  # its slot moved on: the old request is skipped
        assert all(table.state(t) == PENDING for t in fresh)
        assert reader.take("reuse", fresh[0]) == TAKEN
        assert table.cancel(fresh[1], EXPIRED) and reader.take("reuse", fresh[1]) == EXPIRED
        assert table.in_use() == 512
    finally:
        reader.close()
        table.close()


def test_a_missing_table_means_the_caller_is_gone():
    reader = ClaimReader(_ns())
    assert reader.take("clm.1.nobody", 513) == 0
    reader.close()


def _make_table_and_hang(ns: str, ready) -> None:
    table = ClaimTable(f"clm.{os.getpid()}.abc", ns, slots=512)
    ready.put(table.arm())
    signal.pause()


def test_a_killed_callers_table_is_let_go_and_collected():
    ns = _ns()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    p = ctx.Process(target=_make_table_and_hang, args=(ns, ready))
    p.start()
    ticket = ready.get(timeout=30)
    name = f"clm.{p.pid}.abc"
    reader = ClaimReader(ns)
    assert reader.take(name, ticket) == TAKEN  # the replica holds it open now
    os.kill(p.pid, signal.SIGKILL)
    p.join(timeout=30)
    assert [s for s in shm.gc(ns, dry_run=True) if name in s.shm_name] == []  # still mapped by the reader
    assert reader.prune(shm.process_alive) == [name]
    removed = shm.gc(ns)
    assert [s.shm_name for s in removed] == [shm.segment_name(ns, name)]
    reader.close()


@pytest.mark.parametrize("slots", [0, 3, 1000])
def test_a_table_size_must_be_a_power_of_two(slots):
    with pytest.raises(ValueError, match="power of two"):
        ClaimTable("bad", _ns(), slots=slots)
