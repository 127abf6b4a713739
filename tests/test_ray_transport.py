"""Calls over Ray straight to a replica's actor (DirectTransport, the path of
every cross-node call to a deployed replica), on one real node: the caller
uses the transport explicitly, as a caller on another node would.

What is checked is what batching must not change: each call gets its own
reply, error and deadline, the replica's handler threads all stay busy, and
a replica that dies fails every call it had, queued or running.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from sage_ray_comm import (
    BaseService,
    CallTimeout,
    FunctionClient,
    RemoteError,
    ServiceUnavailable,
    sage_service,
    service_function,
)
from sage_ray_comm.ray_transport import BATCH_MAX_FRAMES, DirectTransport
from sage_ray_comm.router import ROUTER_NAMESPACE, bus_namespace


@sage_service(name="batched", max_concurrency=2, num_cpus=0.1)
class Batched(BaseService):
    @service_function
    def echo(self, x):
        if isinstance(x, int) and x % 7 == 3:
            raise ValueError(f"no {x}")
        return x

    @service_function
    def typed(self, x: int) -> int:
        return x + 1


_running = 0
_lock = threading.Lock()


@sage_service(name="busy", max_concurrency=4, num_cpus=0.1)
class Busy(BaseService):
    @service_function
    def work(self, seconds: float) -> int:
        """Returns how many calls were running (itself included) when it started."""
        global _running
        with _lock:
            _running += 1
            seen = _running
        time.sleep(seconds)  # the work
        with _lock:
            _running -= 1
        return seen


@sage_service(name="single", max_concurrency=1, num_cpus=0.1)
class Single(BaseService):
    def initialize(self):
        self.ran = 0

    @service_function
    def slow(self, seconds: float) -> float:
        time.sleep(seconds)  # the work the queued calls wait behind
        return seconds

    @service_function
    def echo(self, x):
        self.ran += 1
        return x

    @service_function
    def runs(self) -> int:
        return self.ran


def _direct_client(bus: str) -> tuple[FunctionClient, DirectTransport]:
    direct = DirectTransport(bus_namespace(bus))
    return FunctionClient(bus=bus, transport=lambda node: direct), direct


def test_pipelined_calls_share_ray_calls_and_each_gets_its_own_outcome(bus):
    Batched.deploy(bus=bus)
    client, direct = _direct_client(bus)
    with client:
        n = 3000
        futs = [client.call_async("batched", "echo", i) for i in range(n)]
        futs.append(client.call_async("batched", "typed", "not a number"))
        for i, f in enumerate(futs[:n]):
            if i % 7 == 3:
                with pytest.raises(RemoteError, match=f"no {i}"):
                    f.result(timeout=60)
            else:
                assert f.result(timeout=60) == i
        with pytest.raises(Exception, match=r"typed") as e:
            futs[-1].result(timeout=60)
        assert type(e.value).__name__ == "ValidationError"
        assert direct.counts["calls"] == n + 1
        # Two handler threads: beyond two calls out, the rest went in batches.
        assert direct.counts["ray_calls"] <= n // 4, direct.counts
        assert direct.counts["ray_calls"] >= (n + 1) // BATCH_MAX_FRAMES
        assert client.call("batched", "echo", "after") == "after"


def test_queued_calls_keep_every_handler_thread_busy(bus):
    """A batch runs in order in one actor thread: batches are a fair share
    of the queue, so the replica's four threads stay busy. Taking the whole
    queue at once ran 36 of these 40 calls one after another."""
    Busy.deploy(bus=bus)
    client, direct = _direct_client(bus)
    with client:
        seen = [f.result(timeout=60) for f in [client.call_async("busy", "work", 0.05) for _ in range(40)]]
    assert max(seen) == 4, seen  # never more than its max_concurrency
    busy = sum(1 for s in seen if s >= 3)
    assert busy >= 30, f"only {busy} of 40 calls started beside 2 others: {seen}"
    assert direct.counts["ray_calls"] < 40


def test_a_queued_call_whose_deadline_passes_times_out(bus):
    Single.deploy(bus=bus)
    client, _ = _direct_client(bus)
    with client:
        slow = client.call_async("single", "slow", 1.0)
        late = client.call_async("single", "echo", "late", timeout=0.3)
        with pytest.raises(CallTimeout, match=r"single\.echo"):
            late.result(timeout=10)
        assert slow.result(timeout=10) == 1.0
        assert client.call_async("single", "echo", "next").result(timeout=10) == "next"


def test_a_replica_killed_with_calls_queued_fails_each_of_them(bus):
    Single.deploy(bus=bus)
    client, _ = _direct_client(bus)
    with client:
        inst = client.endpoint.instances("single")[0]
        pid = ray.get(ray.get_actor(inst.actor_name, namespace=ROUTER_NAMESPACE).pid.remote(), timeout=30)
        running = client.call_async("single", "slow", 30.0, timeout=60)
        queued = [client.call_async("single", "echo", i, timeout=60) for i in range(10)]
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        for f in [running, *queued]:
            with pytest.raises(ServiceUnavailable, match="single"):
                f.result(timeout=30)
        assert time.monotonic() - t0 < 30


def test_calls_still_queued_in_the_caller_can_be_cancelled_and_never_run(bus):
    """A one-thread replica runs one call of this process at a time: the
    rest wait in the caller, where cancel() can still stop them for sure."""
    import asyncio
    import concurrent.futures

    Single.deploy(bus=bus)
    client, direct = _direct_client(bus)
    with client:
        running = client.call_async("single", "slow", 1.0)
        queued = [client.call_async("single", "echo", i) for i in range(200)]
        # Queued behind the one call in flight: cancelled here, for sure. (First:
        # once `running` is cancelled the queue moves on, and an echo sent and
        # done before its cancel() cannot be stopped any more.)
        said = [f.cancel() for f in queued[:150]]
        # Sent: cancel() asks the replica, which says yes only if it has not started it.
        said_running = running.cancel()
        assert all(said) and all(f.cancelled() for f in queued[:150])
        done, _ = concurrent.futures.wait(queued[:150], timeout=5)
        assert len(done) == 150
        assert [f.result(timeout=30) for f in queued[150:]] == list(range(150, 200))
        assert running.cancelled() if said_running else running.result(timeout=30) == 1.0
        assert client.call("single", "runs") == 50  # none of the 150 ran
        assert direct.counts["calls"] == 201

        async def cancel_a_queued_acall() -> None:
            slow = asyncio.ensure_future(client.acall("single", "slow", 0.5))
            task = asyncio.ensure_future(client.acall("single", "echo", "never"))
            await asyncio.sleep(0)  # one loop turn: both calls are made; the second waits in the caller
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await slow

        asyncio.run(cancel_a_queued_acall())
        assert client.call("single", "runs") == 50
