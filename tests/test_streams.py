"""Streaming calls (streams.py, producers.py) on a real local Ray: generator
functions of deployed replicas, read over shared memory and over Ray, with
real processes killed mid-stream."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
from _wait import wait_for

from sage_ray_comm import (
    BaseService,
    CallTimeout,
    CommunicationPattern,
    FunctionClient,
    InvalidCallArgument,
    Message,
    RemoteError,
    ServiceCallMixin,
    ServiceUnavailable,
    StreamConsumed,
    get_communication_bus,
    sage_service,
    service_function,
    shm,
    stream_service,
)
from sage_ray_comm.producers import IDLE_SECONDS
from sage_ray_comm.ray_transport import DirectTransport
from sage_ray_comm.router import HEARTBEAT_INTERVAL, ROUTER_NAMESPACE, bus_namespace


@sage_service(name="gen", num_cpus=0.1)
class Gen(BaseService):
    def initialize(self):
        self.produced = 0
        self.finally_ran = 0

    @service_function
    def count(self, n: int, pause: float = 0.0):
        try:
            for i in range(n):
                if pause:
                    time.sleep(pause)  # a slow producer
                self.produced += 1
                yield i
        finally:
            self.finally_ran += 1

    @service_function
    async def acount(self, n: int):
        try:
            for i in range(n):
                await asyncio.sleep(0)
                self.produced += 1
                yield i
        finally:
            self.finally_ran += 1

    @service_function
    def fails_after(self, k: int):
        yield from range(k)
        raise ValueError(f"no item {k}")

    @service_function
    def silent(self, seconds: float):
        time.sleep(seconds)  # longer than the consumer's idle timeout
        yield "late"

    @service_function
    def big(self, n: int, size: int):
        for i in range(n):
            self.produced += 1
            yield bytes([i % 256]) * size

    @service_function
    def state(self) -> dict:
        return {"produced": self.produced, "finally_ran": self.finally_ran}

    @service_function
    def plain(self, x: int) -> int:
        return x


@ray.remote(num_cpus=0.1)
class Consumer:
    """Another actor, which reads stream handles the driver opened."""

    def total(self, handle) -> int:
        return sum(handle)

    def first(self, handle, k: int) -> list:
        self.held = handle  # keeps reading it later: the stream stays open, and this actor's
        return [next(handle) for _ in range(k)]

    def more(self, k: int) -> list:
        return [next(self.held) for _ in range(k)]

    def pid(self) -> int:
        return os.getpid()


def test_a_stream_delivers_every_item_in_order(bus):
    Gen.deploy(bus=bus)
    with FunctionClient(bus=bus) as client:
        assert list(client.stream("gen", "count", 100_000)) == list(range(100_000))
        assert client.call("gen", "state")["finally_ran"] == 1  # ran to its end
        assert list(client.stream("gen", "count", 0)) == []


def test_a_stream_over_ray_straight_to_the_replica(bus):
    Gen.deploy(bus=bus)
    direct = DirectTransport(bus_namespace(bus))
    with FunctionClient(bus=bus, transport=lambda node: direct) as client:
        assert list(client.stream("gen", "count", 20_000, window=64)) == list(range(20_000))
        assert direct.counts["calls"] == 0  # sync fetches: call(), one Ray call each
        assert sum(client.stream("gen", "acount", 1000)) == sum(range(1000))


def test_async_generators_and_astream(bus):
    Gen.deploy(bus=bus)

    async def read() -> list:
        async with await client.astream("gen", "acount", 500, window=16) as s:
            return [x async for x in s]

    with FunctionClient(bus=bus) as client:
        assert asyncio.run(read()) == list(range(500))
        assert list(client.stream("gen", "acount", 300)) == list(range(300))


def test_the_producer_never_runs_more_than_a_window_ahead(bus):
    Gen.deploy(bus=bus)
    window = 8
    with FunctionClient(bus=bus) as client, client.stream("gen", "count", 10_000, window=window) as s:
        for consumed in range(1, 200):
            next(s)
            if consumed % 20 == 0:
                ahead = client.call("gen", "state")["produced"] - consumed
                assert 0 <= ahead <= window, (consumed, ahead)


def test_large_items_come_a_few_megabytes_per_fetch(bus):
    from sage_ray_comm.producers import FETCH_MAX_BYTES

    Gen.deploy(bus=bus)
    size = 1 << 20
    with FunctionClient(bus=bus) as client, client.stream("gen", "big", 40, size, window=64) as s:
        first = next(s)
        assert first == bytes([0]) * size
        # One fetch stops at FETCH_MAX_BYTES, not at the 64-item window.
        assert client.call("gen", "state")["produced"] <= FETCH_MAX_BYTES // size + 1
        rest = list(s)
    assert [x[0] for x in rest] == list(range(1, 40)) and all(len(x) == size for x in rest)


def test_the_end_of_a_stream_is_explicit(bus):
    Gen.deploy(bus=bus)
    with FunctionClient(bus=bus) as client:
        got = []
        with pytest.raises(RemoteError, match="no item 3") as e:
            for x in client.stream("gen", "fails_after", 3):
                got.append(x)
        assert got == [0, 1, 2] and isinstance(e.value, ValueError)
        t0 = time.monotonic()
        with pytest.raises(CallTimeout):
            next(client.stream("gen", "silent", 5.0, idle_timeout=0.5))
        assert time.monotonic() - t0 < 3


def test_closing_a_stream_runs_the_generators_finally(bus):
    Gen.deploy(bus=bus)
    with FunctionClient(bus=bus) as client:
        with client.stream("gen", "count", 1_000_000) as s:
            assert next(s) == 0
        assert client.call("gen", "state")["finally_ran"] == 1  # closed when the block ended
        s = client.stream("gen", "acount", 1_000_000)
        assert next(s) == 0
        s.close()
        assert client.call("gen", "state")["finally_ran"] == 2
        s = client.stream("gen", "count", 1_000_000)
        assert next(s) == 0
        del s  # the last reference: closed without waiting
        gc.collect()
        t0 = time.monotonic()
        wait_for(lambda: client.call("gen", "state")["finally_ran"] == 3, 10, "the dropped stream's finally")
        assert time.monotonic() - t0 < 2


def test_calls_and_streams_do_not_mix_up(bus):
    handle = Gen.deploy(bus=bus)
    with FunctionClient(bus=bus) as client:
        with pytest.raises(InvalidCallArgument, match="generator function"):
            client.call("gen", "count", 3)
        with pytest.raises(InvalidCallArgument, match="not a generator function"):
            client.stream("gen", "plain", 3)
        for bad in (0, 2.5, "8"):
            with pytest.raises(InvalidCallArgument, match="window"):
                client.stream("gen", "count", 3, window=bad)
        assert handle.stats()[0]["streams"] == 0  # a refused stream was never opened
        assert client.call("gen", "plain", 3) == 3


@pytest.mark.kills  # the reading actor is killed at the end, holding its client: its reply ring is left for gc
def test_a_handle_passed_to_another_actor_is_consumed_there(bus):
    Gen.deploy(bus=bus)
    reader = Consumer.remote()
    reader_pid = ray.get(reader.pid.remote(), timeout=60)
    try:
        with FunctionClient(bus=bus) as client:
            handle = client.stream("gen", "count", 1000)
            assert ray.get(reader.total.remote(handle), timeout=60) == sum(range(1000))
            second = client.stream("gen", "count", 1000, window=4)
            assert ray.get(reader.first.remote(second, 3), timeout=60) == [0, 1, 2]
            with pytest.raises(StreamConsumed):  # the actor reads it: this handle may not
                next(second)
            assert ray.get(reader.more.remote(2), timeout=60) == [3, 4]  # the actor still may
            del second  # pickled: dropping it here does not close the actor's stream
            gc.collect()
            assert ray.get(reader.more.remote(1), timeout=60) == [5]
    finally:
        ray.kill(reader)
        # ray.kill only asks: the segments check at teardown must find the reader dead, not dying.
        wait_for(lambda: not shm.process_alive(reader_pid, 0), 30, "the reader actor to exit")


@pytest.mark.kills
def test_a_replica_killed_mid_stream_fails_it_with_service_unavailable(bus):
    handle = Gen.deploy(bus=bus)
    with FunctionClient(bus=bus) as client:
        s = client.stream("gen", "count", 1_000_000, 0.001, window=4)
        assert next(s) == 0
        pid = ray.get(ray.get_actor(handle.instances[0].actor_name, namespace=ROUTER_NAMESPACE).pid.remote())
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            for _ in s:
                pass
        assert time.monotonic() - t0 < 10


_CONSUMER = """
import sys, ray
from sage_ray_comm import FunctionClient
ray.init(address=sys.argv[1], log_to_driver=False)
s = FunctionClient(bus=sys.argv[2]).stream("gen", "count", 1_000_000)
print(next(s), flush=True)
sys.stdin.read()
"""


@pytest.mark.kills
def test_a_consumer_killed_mid_stream_has_its_stream_closed(bus):
    """No close arrives from a SIGKILLed consumer: the replica sees its
    process gone (same host) and closes the generator itself."""
    Gen.deploy(bus=bus)
    p = subprocess.Popen(
        [sys.executable, "-c", _CONSUMER, ray.get_runtime_context().gcs_address, bus],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "0"
        with FunctionClient(bus=bus) as client:
            assert client.call("gen", "state")["finally_ran"] == 0
            p.send_signal(signal.SIGKILL)
            p.wait()
            t0 = time.monotonic()
            wait_for(lambda: client.call("gen", "state")["finally_ran"] == 1, 30, "the replica closing it")
            assert time.monotonic() - t0 < 5 * HEARTBEAT_INTERVAL + 2 < IDLE_SECONDS
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_the_sage_surface_and_route_message_stream_too(bus):
    Gen.deploy(bus=bus)

    class Operator(ServiceCallMixin):
        sage_bus = bus

    assert list(Operator().stream_service["gen"].count(5)) == [0, 1, 2, 3, 4]
    assert list(stream_service("gen", 3, method="count", bus=bus, window=2)) == [0, 1, 2]
    msg = Message(receiver="gen", function="count", payload=4)
    with get_communication_bus(bus).route_message(msg, CommunicationPattern.STREAM) as s:
        assert list(s) == [0, 1, 2, 3]


def test_status_shows_the_open_streams_of_each_replica(bus):
    from sage_ray_comm.cli import status_rows

    Gen.deploy(bus=bus)
    b = get_communication_bus(bus)
    with FunctionClient(bus=bus) as client:
        with client.stream("gen", "count", 100, window=2) as s:
            next(s)
            wait_for(lambda: [r["streams"] for r in b.services()] == [1], 10, "a heartbeat reporting the stream")
            (row,) = status_rows(client.endpoint.refresh())
            assert row["streams"] == 1 and "@" not in row["functions"]
        wait_for(lambda: [r["streams"] for r in b.services()] == [0], 10, "a heartbeat after the close")
