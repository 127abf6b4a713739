"""``cancel()`` on a call's future never lies, and mostly succeeds. On one
node the caller and the replica race for a queued call with one
compare-and-swap in shared memory (claims.py): a call cancel() reports
cancelled never runs, and is skipped without its arguments being unpickled.
Over Ray, cancel() of a sent call asks the replica. A call already running
is told (an ``async def`` handler gets ``CancelledError``, a sync one sees
``self.cancelled()``), and so are the calls it made. A caller that dies
cancels its calls: the running one is told, the queued ones are skipped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import numpy as np
import pytest
import ray
from _wait import wait_for

from sage_ray_comm import BaseService, FunctionClient, SageQueue, sage_service, service_function
from sage_ray_comm.ray_transport import DirectTransport
from sage_ray_comm.router import bus_namespace

QUEUED = 1000


@sage_service(name="one_at_a_time", replicas=1, max_concurrency=1, num_cpus=0.1)
class OneAtATime(BaseService):
    def initialize(self):
        self.ran: list[int] = []

    @service_function
    def hold(self, gate: str, release: str, ns: str) -> str:
        """Says it started, then runs until the test releases it (a real blocking wait)."""
        SageQueue(gate, namespace=ns, create=False).put("holding")
        SageQueue(release, namespace=ns, create=False).get(timeout=60)
        return "released"

    @service_function
    def work(self, i: int) -> int:
        self.ran.append(i)
        return i

    @service_function
    def ran_so_far(self) -> list:
        return list(self.ran)

    @service_function
    def stats(self) -> dict:
        return self.get_stats()

    @service_function
    def until_cancelled(self, gate: str, ns: str) -> str:
        SageQueue(gate, namespace=ns, create=False).put("started")
        t0 = time.monotonic()
        while not self.cancelled():
            if time.monotonic() - t0 > 30:
                return "never told"
            time.sleep(0.001)  # the work, in slices
        self.ran.append(-2)  # it was told
        return "stopped early"

    @service_function
    async def await_forever(self, gate: str, ns: str) -> str:
        SageQueue(gate, namespace=ns, create=False).put("started")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.ran.append(-1)  # it was told
            raise
        return "never told"


def test_cancel_never_reports_a_call_that_then_runs(bus):
    """The issue's case: one call running on a one-thread replica, 1,000
    more queued behind it with call_async, then cancel() on all of them."""
    OneAtATime.deploy(bus=bus)
    ns = bus_namespace(bus)
    gate = SageQueue("cancel-gate", 4096, namespace=ns)
    release = SageQueue("cancel-release", 4096, namespace=ns)
    with FunctionClient(bus=bus) as c:
        held = c.call_async("one_at_a_time", "hold", gate.name, release.name, ns, timeout=60)
        assert gate.get(timeout=30) == "holding"  # the one thread is busy: the rest queue up
        futs = [c.call_async("one_at_a_time", "work", i, timeout=60) for i in range(QUEUED)]
        said = [f.cancel() for f in futs]
        release.put("go")
        assert held.result(timeout=60) == "released"
        results = {
            i: f.result(timeout=60) for i, (f, cancelled) in enumerate(zip(futs, said, strict=True)) if not cancelled
        }
        # Calls run in ring order on the one thread: this one runs after them all.
        ran = set(c.call("one_at_a_time", "ran_so_far"))
    gate.destroy()
    release.destroy()
    lied = [i for i in range(QUEUED) if said[i] and i in ran]
    assert not lied, f"cancel() returned True for {len(lied)} calls that then ran, e.g. {lied[:5]}"
    assert results == {i: i for i in range(QUEUED) if not said[i]}
    assert ran == {i for i in range(QUEUED) if not said[i]}  # every call not cancelled ran, once
    assert sum(said) >= 0.99 * QUEUED, f"only {sum(said)} of {QUEUED} queued calls could be cancelled"
    assert all(f.cancelled() == s for f, s in zip(futs, said, strict=True))


@pytest.mark.parametrize("fn", ["until_cancelled", "await_forever"])
def test_a_running_call_is_told_it_was_cancelled(bus, fn):
    OneAtATime.deploy(bus=bus)
    ns = bus_namespace(bus)
    gate = SageQueue(f"gate-{fn}", 4096, namespace=ns)
    with FunctionClient(bus=bus) as c:
        fut = c.call_async("one_at_a_time", fn, gate.name, ns, timeout=60)
        assert gate.get(timeout=30) == "started"
        assert not fut.cancel()  # it runs: no, but it is told
        if fn == "until_cancelled":
            assert fut.result(timeout=10) == "stopped early"
        else:
            with pytest.raises(Exception, match="Cancelled"):
                fut.result(timeout=10)
            assert c.call("one_at_a_time", "ran_so_far") == [-1]
    gate.destroy()


@sage_service(name="outer", replicas=1, num_cpus=0.1)
class Outer(BaseService):
    @service_function
    def run(self, gate: str, ns: str) -> str:
        return self.client.call_async("middle", "run", gate, ns, timeout=60).result(timeout=60)


@sage_service(name="middle", replicas=1, num_cpus=0.1)
class Middle(BaseService):
    @service_function
    def run(self, gate: str, ns: str) -> str:
        return self.client.call_async("one_at_a_time", "until_cancelled", gate, ns, timeout=60).result(timeout=60)


def test_cancelling_a_call_cancels_the_calls_it_made(bus):
    """driver -> outer -> middle -> until_cancelled: cancelling the driver's
    call reaches the innermost handler through two levels of nested calls."""
    for svc in (OneAtATime, Middle, Outer):
        svc.deploy(bus=bus)
    ns = bus_namespace(bus)
    gate = SageQueue("gate-nested", 4096, namespace=ns)
    with FunctionClient(bus=bus) as c:
        fut = c.call_async("outer", "run", gate.name, ns, timeout=60)
        assert gate.get(timeout=30) == "started"  # the innermost handler runs
        assert not fut.cancel()
        assert fut.result(timeout=10) == "stopped early"  # it was told, and its answer came back up
    gate.destroy()


class Tattle:
    """An argument whose unpickling leaves a mark: a directory made by
    ``os.mkdir`` while the replica reads the request."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@sage_service(name="takes_anything", replicas=1, max_concurrency=1, num_cpus=0.1)
class TakesAnything(BaseService):
    @service_function
    def hold(self, gate: str, release: str, ns: str) -> str:
        SageQueue(gate, namespace=ns, create=False).put("holding")
        SageQueue(release, namespace=ns, create=False).get(timeout=60)
        return "released"

    @service_function
    def take(self, x=None) -> str:
        return "taken"

    @service_function
    def stats(self) -> dict:
        return self.get_stats()


@contextlib.contextmanager
def _held_takes_anything(bus: str, tag: str):
    """A client of TakesAnything whose one thread is held by a ``hold`` call:
    calls made inside queue behind it. Yields (client, let_go); let_go()
    releases the hold and waits for it to finish."""
    TakesAnything.deploy(bus=bus)
    ns = bus_namespace(bus)
    gate = SageQueue(f"{tag}-gate", 4096, namespace=ns)
    release = SageQueue(f"{tag}-release", 4096, namespace=ns)
    try:
        with FunctionClient(bus=bus) as c:
            held = c.call_async("takes_anything", "hold", gate.name, release.name, ns, timeout=60)
            assert gate.get(timeout=30) == "holding"

            def let_go() -> None:
                release.put("go")
                assert held.result(timeout=60) == "released"

            yield c, let_go
    finally:
        gate.destroy()
        release.destroy()


def test_a_cancelled_request_is_skipped_without_unpickling_it(bus, tmp_path):
    """The claim is decided from the header: the arguments of a call
    cancelled while queued are never unpickled (no mark), while those of a
    call that runs are (its mark is there)."""
    with _held_takes_anything(bus, "unread") as (c, let_go):
        futs = [c.call_async("takes_anything", "take", Tattle(str(tmp_path / f"c{i}")), timeout=60) for i in range(20)]
        kept = c.call_async("takes_anything", "take", Tattle(str(tmp_path / "kept")), timeout=60)
        assert all(f.cancel() for f in futs)
        let_go()
        assert kept.result(timeout=60) == "taken"  # ran after the cancelled ones, in ring order
        assert sorted(os.listdir(tmp_path)) == ["kept"]
        assert c.call("takes_anything", "stats")["cancelled"] >= 20


def test_a_large_call_cancelled_while_queued_gives_its_arena_slot_back(bus):
    """Skipped unread, but not leaked: the replica lets go of the arena slots
    a cancelled request names (the caller's arena has them all back)."""
    with _held_takes_anything(bus, "slots") as (c, let_go):
        futs = [c.call_async("takes_anything", "take", np.ones((1 << 20) // 8), timeout=60) for _ in range(8)]
        assert c.stats()["arena"]["in_use"] == 8
        assert all(f.cancel() for f in futs)
        let_go()
        assert c.call("takes_anything", "take") == "taken"  # after the skipped ones, in ring order
        assert c.stats()["arena"]["in_use"] == 0


@sage_service(name="in_process_one", max_concurrency=1)
class InProcessOne(OneAtATime):
    """OneAtATime served from the test's own process: no actor to ask."""


def test_queued_calls_to_an_in_process_service_can_be_cancelled(bus):
    svc = InProcessOne().start(bus=bus)
    ns = bus_namespace(bus)
    gate = SageQueue("inproc-gate", 4096, namespace=ns)
    release = SageQueue("inproc-release", 4096, namespace=ns)
    try:
        with FunctionClient(bus=bus) as c:
            held = c.call_async("in_process_one", "hold", gate.name, release.name, ns, timeout=60)
            assert gate.get(timeout=30) == "holding"
            futs = [c.call_async("in_process_one", "work", i, timeout=60) for i in range(100)]
            said = [f.cancel() for f in futs[:60]]
            release.put("go")
            assert held.result(timeout=60) == "released"
            assert [f.result(timeout=60) for f in futs[60:]] == list(range(60, 100))
            assert all(said)
            assert c.call("in_process_one", "ran_so_far") == list(range(60, 100))
    finally:
        svc.stop()
        gate.destroy()
        release.destroy()


def _direct_client(bus: str) -> FunctionClient:
    direct = DirectTransport(bus_namespace(bus))
    return FunctionClient(bus=bus, transport=lambda node: direct)


@contextlib.contextmanager
def _ray_threads_held(bus: str, cls: type, tag: str):
    """``cls`` (a service with ``hold``) deployed, every one of its replica
    actor's Ray threads held by a ``hold`` call over Ray (the actor has 4 + 1
    threads; the router's watch() holds one), so a call over Ray waits in
    Ray's queue. Yields (a fifth client over Ray, let_go); let_go() releases
    the holds and waits for them. One lane per client: a lane sends one call
    at a time to a one-thread replica."""
    cls.deploy(bus=bus)
    name = cls.__sage_name__
    ns = bus_namespace(bus)
    gate = SageQueue(f"{tag}-gate", 4096, namespace=ns)
    release = SageQueue(f"{tag}-release", 4096, namespace=ns)
    clients = [_direct_client(bus) for _ in range(5)]
    try:
        holds = [c.call_async(name, "hold", gate.name, release.name, ns, timeout=60) for c in clients[:4]]
        assert [gate.get(timeout=30) for _ in holds] == ["holding"] * 4

        def let_go() -> None:
            for _ in holds:
                release.put("go")
            assert [h.result(timeout=60) for h in holds] == ["released"] * 4

        yield clients[4], let_go
    finally:
        for c in clients:
            c.close()
        gate.destroy()
        release.destroy()


def test_a_call_sent_over_ray_is_cancelled_if_its_replica_has_not_started_it(bus):
    """Over Ray (the cross-node path), cancel() of a call already sent asks
    the replica: True only when the replica confirms it never started it.
    Here the replica's every Ray thread is held, so the call waits in Ray's
    queue; cancel() does not (it has threads of its own)."""
    with _ray_threads_held(bus, OneAtATime, "direct") as (c, let_go):
        fut = c.call_async("one_at_a_time", "work", 7, timeout=60)
        assert fut.cancel() and fut.cancelled()
        let_go()
        assert c.call_async("one_at_a_time", "work", 8, timeout=60).result(timeout=60) == 8
        assert c.call("one_at_a_time", "ran_so_far") == [8]  # 7 never ran


@ray.remote(num_cpus=0.05)
class Caller:
    """A caller in a process of its own, to be SIGKILLed with calls in flight."""

    def pid(self) -> int:
        return os.getpid()

    def start(self, bus: str, gate: str, ns: str, queued: int) -> int:
        self.client = FunctionClient(bus=bus)
        self.futs = [self.client.call_async("one_at_a_time", "until_cancelled", gate, ns, timeout=60)]
        self.futs += [self.client.call_async("one_at_a_time", "work", i, timeout=60) for i in range(queued)]
        return len(self.futs)


def test_a_caller_that_dies_cancels_its_calls_in_the_replica(bus):
    """SIGKILL of a caller with one call running and 50 queued: the running
    handler is told (it stops early), and none of the queued ones runs."""
    OneAtATime.deploy(bus=bus)
    ns = bus_namespace(bus)
    gate = SageQueue("orphan-gate", 4096, namespace=ns)
    caller = Caller.remote()
    try:
        pid = ray.get(caller.pid.remote(), timeout=60)
        assert ray.get(caller.start.remote(bus, gate.name, ns, 50), timeout=60) == 51
        assert gate.get(timeout=30) == "started"
        os.kill(pid, signal.SIGKILL)
        with FunctionClient(bus=bus) as c:
            wait_for(lambda: c.call("one_at_a_time", "ran_so_far") == [-2], 30, "the running call to be told")
            wait_for(lambda: c.call("one_at_a_time", "stats")["cancelled"] == 50, 30, "the queued calls skipped")
            assert c.call("one_at_a_time", "ran_so_far") == [-2]  # none of the 50 ran
    finally:
        ray.kill(caller)
        gate.destroy()


def test_a_call_cancelled_over_ray_is_skipped_without_unpickling_it(bus, tmp_path):
    """As above, over Ray: the replica reads the cancel key from the header
    and skips the call before its arguments are unpickled (no mark)."""
    with _ray_threads_held(bus, TakesAnything, "unread-direct") as (c, let_go):
        fut = c.call_async("takes_anything", "take", Tattle(str(tmp_path / "cancelled")), timeout=60)
        assert fut.cancel()
        let_go()
        assert c.call("takes_anything", "take", Tattle(str(tmp_path / "kept"))) == "taken"
        assert sorted(os.listdir(tmp_path)) == ["kept"]
