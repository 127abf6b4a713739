"""``cancel()`` on a call's future never lies, and now mostly succeeds: a
call it reports cancelled was never run (the replica and the canceller race
for it under one lock, cancels.py), and one already running is told (an
``async def`` handler gets ``CancelledError``, a sync one sees
``self.cancelled()``)."""

from __future__ import annotations

import asyncio
import time

import pytest

from sage_ray_comm import BaseService, FunctionClient, SageQueue, sage_service, service_function
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
    def until_cancelled(self, gate: str, ns: str) -> str:
        SageQueue(gate, namespace=ns, create=False).put("started")
        t0 = time.monotonic()
        while not self.cancelled():
            if time.monotonic() - t0 > 30:
                return "never told"
            time.sleep(0.001)  # the work, in slices
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
