"""``cancel()`` on a call's future never lies: a call it reports cancelled was
never run. (Until cancellation can claim a request back from a replica's
ring, a call is under way from the moment ``call_async`` returns, and
``cancel()`` says so by returning False, as ``concurrent.futures`` does for
a running future.)"""

from __future__ import annotations

from sage_ray_comm import BaseService, FunctionClient, SageQueue, sage_service, service_function
from sage_ray_comm.router import bus_namespace

QUEUED = 200


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


def test_cancel_never_reports_a_call_that_then_runs(bus):
    """The issue's case: one call running on a one-thread replica, 200 more
    queued behind it with call_async, then cancel() on all 200."""
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
    assert all(f.running() or f.done() for f in futs)
