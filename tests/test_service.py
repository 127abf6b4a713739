"""Services as Ray actors and in-process, called through FunctionClient on a
real local Ray: the issue's examples, the four patterns, and typed errors."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time

import numpy as np
import pytest
import ray

from sage_ray_comm import (
    BaseService,
    CallTimeout,
    FunctionClient,
    FunctionNotFound,
    NameConflict,
    RemoteError,
    SerializationError,
    ServiceFunction,
    ServiceNotFound,
    ServiceUnavailable,
    ValidationError,
    get_communication_bus,
    sage_service,
    service_function,
    subscribe,
)
from sage_ray_comm.router import ROUTER_NAMESPACE
from sage_ray_comm.shm import process_alive


@sage_service(name="calculator", replicas=2)
class Calculator(BaseService):
    def initialize(self):
        self.seen = 0
        self.sends = []

    @service_function
    def calculate(self, data: int, message=None) -> dict:
        self.seen += 1
        return {"result": data * 2, "function": message.function, "sender": message.sender}

    @ServiceFunction(name="add")
    def add_numbers(self, a: int, b: int) -> int:
        return a + b

    @service_function
    async def async_double(self, x: int) -> int:
        await asyncio.sleep(0.001)
        return 2 * x

    @service_function
    def divide(self, a, b):
        return a / b

    @service_function
    def echo(self, x):
        return x

    @service_function
    def whoami(self):
        return self.service_id

    @service_function
    def record(self, item):
        self.sends.append(item)

    @service_function
    def recorded(self):
        return list(self.sends)

    @service_function
    def bad_result(self):
        return threading.Lock()

    @service_function
    def sleep(self, seconds: float):
        time.sleep(seconds)
        return "done"

    @ServiceFunction(timeout=0.5)
    def sleep_with_default_timeout(self, seconds: float):
        time.sleep(seconds)

    @service_function
    def pid(self):
        return os.getpid()


@pytest.fixture
def calc(bus):
    handle = Calculator.deploy(bus=bus)
    client = FunctionClient(bus=bus)
    yield handle, client
    client.close()


# --------------------------------------------------------- the issue's example
def test_issue_example(calc, bus):
    handle, client = calc
    assert handle.replicas == 2
    r = client.call("calculator", "calculate", 42)
    assert r["result"] == 84 and r["function"] == "calculate" and r["sender"] == client.client_id
    fut = client.call_async("calculator", "add", 1, 2)
    assert fut.result(timeout=10) == 3

    async def from_async_code():
        return await client.acall("calculator", "calculate", 1)

    assert asyncio.run(from_async_code())["result"] == 2
    assert client.stats()["shm"] >= 3, "same-node calls must take the shared-memory path"


def test_acall_from_an_async_ray_actor(calc, bus):
    @ray.remote(num_cpus=0.1)
    class AsyncCaller:
        async def go(self, bus):
            from sage_ray_comm import FunctionClient

            c = FunctionClient(bus=bus)
            out = await asyncio.gather(*(c.acall("calculator", "add", i, i) for i in range(20)))
            stats = c.stats()
            c.close()
            return out, stats["shm"]

    a = AsyncCaller.remote()
    out, shm_calls = ray.get(a.go.remote(bus), timeout=60)
    assert out == [2 * i for i in range(20)] and shm_calls == 20
    ray.kill(a)


def test_original_in_process_form_is_registered_like_any_other(bus):
    events = []

    class MyService(BaseService):
        def __init__(self):
            super().__init__("my_service")

        def initialize(self):
            events.append("initialize")

        def cleanup(self):
            events.append("cleanup")

        @service_function
        def hello(self, name: str) -> str:
            return f"hello {name} from {os.getpid()}"

    svc = MyService().start(bus=bus)
    assert events == ["initialize"] and svc.is_running

    @ray.remote(num_cpus=0.1)
    def call_from_another_process(bus):
        from sage_ray_comm import FunctionClient

        with FunctionClient(bus=bus) as c:
            return c.call("my_service", "hello", "actor"), c.stats()["shm"]

    reply, shm_calls = ray.get(call_from_another_process.remote(bus), timeout=60)
    assert reply == f"hello actor from {os.getpid()}" and shm_calls == 1
    client = FunctionClient(bus=bus)
    assert "my_service" in client.service_names()
    assert client.function_signatures("my_service") == {"hello": "hello(name: str) -> str"}
    svc.stop()
    assert events == ["initialize", "cleanup"] and not svc.is_running
    assert "my_service" not in client.service_names()
    with pytest.raises(ServiceNotFound):
        client.call("my_service", "hello", "x")
    client.close()


# -------------------------------------------------- defects of the original code, regressions
def test_async_handlers_are_awaited(calc):
    _, client = calc
    assert client.call("calculator", "async_double", 21) == 42


def test_handler_exception_is_raised_at_the_caller_with_its_type(calc):
    _, client = calc
    with pytest.raises(ZeroDivisionError) as ei:
        client.call("calculator", "divide", 1, 0)
    err = ei.value
    assert isinstance(err, RemoteError)
    assert err.remote_type == "builtins.ZeroDivisionError" and err.service == "calculator" and err.function == "divide"
    assert "a / b" in err.remote_traceback, "the remote traceback shows the failing line"
    # the service keeps serving
    assert client.call("calculator", "divide", 6, 3) == 2


def test_message_to_no_target_is_an_error_not_a_log_line(calc):
    _, client = calc
    with pytest.raises(ServiceNotFound, match="known services: calculator"):
        client.call("no_such_service", "f")
    with pytest.raises(ServiceNotFound):
        client.send("no_such_service", "f", 1)
    with pytest.raises(FunctionNotFound, match=r"it has: .*add.*calculate"):
        client.call("calculator", "no_such_function")


# ---------------------------------------------------------- typed failures
def test_wrong_argument_type_is_a_validation_error_naming_the_field(calc):
    _, client = calc
    with pytest.raises(ValidationError) as ei:
        client.call("calculator", "add", 1, "not a number")
    assert "calculator.add" in str(ei.value) and "b:" in str(ei.value)
    assert [e["field"] for e in ei.value.errors] == ["b"]
    with pytest.raises(ValidationError, match="data"):
        client.call("calculator", "calculate", data="x")


def test_call_timeout_does_not_hang_and_the_service_recovers(calc):
    _, client = calc
    t0 = time.monotonic()
    with pytest.raises(CallTimeout, match=r"calculator\.sleep"):
        client.call("calculator", "sleep", 3.0, timeout=0.3)
    assert time.monotonic() - t0 < 2.5
    assert client.call("calculator", "add", 1, 1, timeout=10) == 2


def test_the_function_declared_timeout_is_the_default(calc):
    _, client = calc
    t0 = time.monotonic()
    with pytest.raises(CallTimeout):
        client.call("calculator", "sleep_with_default_timeout", 3.0)
    assert time.monotonic() - t0 < 2.5


def test_unpicklable_argument_and_result_are_serialization_errors(calc):
    _, client = calc
    with pytest.raises(SerializationError, match="cannot pickle"):
        client.call("calculator", "echo", threading.Lock())
    with pytest.raises(SerializationError, match=r"calculator\.bad_result"):
        client.call("calculator", "bad_result")
    assert client.call("calculator", "echo", "still serving") == "still serving"


@pytest.mark.kills
def test_a_replica_that_dies_mid_call_fails_the_call_fast(calc):
    handle, client = calc
    pid = client.call("calculator", "pid", instance=handle.instances[0].instance_id)
    fut = client.call_async("calculator", "sleep", 30.0, instance=handle.instances[0].instance_id, timeout=60)
    os.kill(pid, 9)
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="died"):
        fut.result(timeout=20)
    assert time.monotonic() - t0 < 10, "a dead replica must not cost the caller its whole timeout"
    # the other replica still serves
    assert client.call("calculator", "add", 2, 2, instance=handle.instances[1].instance_id) == 4


def test_name_conflict_and_same_class_redeploy(calc, bus):
    handle, client = calc

    @sage_service(name="calculator")
    class Impostor(BaseService):
        @service_function
        def add(self, a, b):
            return "impostor"

    with pytest.raises(NameConflict, match="taken by class"):
        Impostor.deploy(bus=bus)
    assert client.call("calculator", "add", 1, 1) == 2
    # The same class and code again keeps what matches (idempotent) and drops
    # replicas beyond the new count; changed code replaces (the notebook test).
    again = Calculator.deploy(bus=bus, replicas=1)
    client.refresh()
    assert client.call("calculator", "add", 1, 1) == 2
    assert [i.instance_id for i in again.instances] == [handle.instances[0].instance_id]
    assert {r["instance"] for r in get_communication_bus(bus).services()} == {handle.instances[0].instance_id}


def test_replicas_have_readable_actor_names(calc, bus):
    for i in (1, 2):
        a = ray.get_actor(f"sage:{bus}:calculator#{i}", namespace=ROUTER_NAMESPACE)
        assert ray.get(a.pid.remote()) > 0
    assert ray.get_actor(f"sage:{bus}:router", namespace=ROUTER_NAMESPACE)


def test_shutdown_deregisters(calc, bus):
    handle, client = calc
    assert client.service_names() == ["calculator"]
    handle.shutdown()
    # ray.kill() only asks Ray: shutdown() returns once the replicas are dead.
    assert [i.pid for i in handle.instances if process_alive(i.pid, i.pid_start)] == []
    assert client.service_names() == []
    with pytest.raises(ServiceNotFound):
        client.call("calculator", "add", 1, 1)


# ------------------------------------------------------------- the patterns
def test_point_to_point_targets_one_replica(calc):
    handle, client = calc
    target = handle.instances[1].instance_id
    for i in range(20):
        assert client.send("calculator", "record", i, instance=target) == target
    # The sends are queued ahead of this call; with several dispatcher threads
    # the last ones may still be running, so wait for them to show.
    deadline = time.monotonic() + 30
    while sorted(got := client.call("calculator", "recorded", instance=target)) != list(range(20)):
        assert time.monotonic() < deadline, got
        time.sleep(0.01)
    assert client.call("calculator", "recorded", instance=handle.instances[0].instance_id) == []


def test_load_balancing_spreads_work_over_replicas(calc):
    handle, client = calc
    who = [client.call("calculator", "whoami") for _ in range(200)]
    per = {i.instance_id: who.count(i.instance_id) for i in handle.instances}
    assert sum(per.values()) == 200 and min(per.values()) >= 40, per
    rr = FunctionClient(bus=handle.bus, policy="round_robin")
    who = [rr.call("calculator", "whoami") for _ in range(10)]
    assert who.count(handle.instances[0].instance_id) == 5
    rr.close()


def test_pipelined_calls_spread_by_outstanding_counts(calc):
    handle, client = calc
    futs = [client.call_async("calculator", "sleep", 0.05) for _ in range(8)]
    assert [f.result(timeout=30) for f in futs] == ["done"] * 8
    seen = client.stats()["by_instance"]
    assert all(seen.get(i.instance_id, 0) >= 2 for i in handle.instances), seen


@sage_service(name="monitor", replicas=2, max_concurrency=1)  # one thread: events and calls in ring order
class Monitor(BaseService):
    def initialize(self):
        self.got = []

    @subscribe("sensor.*.temp")
    def on_temp(self, payload, message=None):
        self.got.append((message.topic, payload))

    @service_function
    def readings(self):
        return list(self.got)


def test_publish_subscribe_with_wildcards(bus):
    b = get_communication_bus(bus).start()
    one, rest = queue.Queue(), queue.Queue()
    b.subscribe("sensor.*", lambda p: one.put(p))
    b.subscribe("sensor.>", lambda p, message=None: rest.put((message.topic, p)))
    assert b.publish("sensor.kitchen", 1) == 2
    assert b.publish("sensor.kitchen.temp", 2) == 1
    assert b.publish("motor.x", 3) == 0
    assert one.get(timeout=10) == 1
    assert rest.get(timeout=10) == ("sensor.kitchen", 1)
    assert rest.get(timeout=10) == ("sensor.kitchen.temp", 2)
    assert one.empty()


def test_service_subscribers_share_events_and_actors_can_publish(bus):
    h = Monitor.deploy(bus=bus)
    client = FunctionClient(bus=bus)

    @ray.remote(num_cpus=0.1)
    def publisher(bus):
        from sage_ray_comm import FunctionClient

        with FunctionClient(bus=bus) as c:
            c.wait_for_subscribers("sensor.a.temp", 2)
            return [c.broadcast(f"sensor.{r}.temp", i) for i, r in enumerate("abcdef")] + [
                c.broadcast("sensor.a.hum", 9)
            ]

    assert ray.get(publisher.remote(bus), timeout=60) == [1, 1, 1, 1, 1, 1, 0]
    # Calls queue behind events on each replica's ring, so both have handled theirs.
    got = [client.call("monitor", "readings", instance=i.instance_id) for i in h.instances]
    assert sorted(x for g in got for x in g) == [(f"sensor.{r}.temp", i) for i, r in enumerate("abcdef")]
    assert all(len(g) == 3 for g in got), "the two replicas of the group share the events"
    client.close()


# ------------------------------------------------------------- load and size
def test_concurrent_callers_8_threads_x_500(calc):
    _, client = calc
    errors = []

    def worker(k):
        try:
            for i in range(500):
                if client.call("calculator", "add", k, i) != k + i:
                    errors.append((k, i))
        except Exception as e:  # recorded, and the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert client.stats()["calls"] >= 4000


@pytest.mark.parametrize("n", [0, 1, 1000, 1 << 20, 3 << 20])
def test_payload_sizes_round_trip(calc, n):
    _, client = calc
    a = np.arange(n, dtype=np.uint8)
    b = client.call("calculator", "echo", a)
    assert b.dtype == a.dtype and np.array_equal(a, b)


def test_oversize_request_and_reply_leave_no_segment(calc, bus):
    _, client = calc
    a = np.random.default_rng(1).random(1 << 21)  # 16 MiB: over the 4 MiB frame limit
    assert np.array_equal(client.call("calculator", "echo", a), a)
    fut = client.call_async("calculator", "echo", a)
    assert np.array_equal(fut.result(timeout=60), a)
    # (the bus fixture asserts at teardown that no segment is left)


def test_service_calls_service_without_deadlock(bus):
    @sage_service(name="chain", replicas=1, max_concurrency=8)
    class Chain(BaseService):
        @service_function
        def depth(self, n: int) -> int:
            # Each level blocks one dispatcher thread on a call to this same
            # replica: it only completes if another thread takes the request.
            return 0 if n == 0 else 1 + self.call_function("chain", "depth", n - 1, timeout=30)

    h = Chain.deploy(bus=bus)
    with FunctionClient(bus=bus) as c:
        assert c.call("chain", "depth", 5, timeout=60) == 5
    h.shutdown()


@sage_service(name="phoenix", max_restarts=1)
class Phoenix(BaseService):
    @service_function
    def pid(self):
        return os.getpid()


@pytest.mark.kills
def test_a_restarted_replica_registers_again_and_serves(bus):
    h = Phoenix.deploy(bus=bus)
    b = get_communication_bus(bus)
    with FunctionClient(bus=bus) as c:
        first = c.call("phoenix", "pid")
        old_instance = h.instances[0].instance_id
        os.kill(first, 9)
        deadline = time.monotonic() + 60
        while True:  # wait for the restart to show in the registry (the old entry expires by heartbeat)
            rows = b.services()
            if [r["instance"] for r in rows if r["alive"]] and old_instance not in [r["instance"] for r in rows]:
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.1)
        c.refresh()
        second = c.call("phoenix", "pid")
        assert second != first


@sage_service(name="early")
class Early(BaseService):
    def initialize(self):
        # Requests can arrive as soon as the replica registers, before start()
        # returns: whatever a handler reaches for must already know the bus.
        self.bus_at_start = self.bus_name
        self.client_bus = self.client.bus

    @service_function
    def seen(self):
        return self.bus_at_start, self.client_bus


def test_a_replica_knows_its_bus_before_it_takes_requests(bus):
    Early.deploy(bus=bus)
    with FunctionClient(bus=bus) as c:
        assert c.call("early", "seen") == (bus, bus)


def test_subscriber_buffer_is_4_mib_by_default(bus):
    """The README's default: a process's event buffer is a 4 MiB ring."""
    from sage_ray_comm import _core, shm
    from sage_ray_comm.router import bus_namespace

    b = get_communication_bus(bus).start()
    b.subscribe("buffer.size", lambda p: None)
    (evt,) = [s for s in shm.list_segments(bus_namespace(bus)) if ".evt_" in s.shm_name]
    assert evt.size == (4 << 20) + _core.HEADER_SIZE


@sage_service(name="clock")
class Clock(BaseService):
    @service_function
    def budget(self, message=None) -> float:
        return message.deadline - message.timestamp  # the time the caller gave this call


def test_default_timeout_is_30_seconds_unless_configured(bus, monkeypatch):
    """No timeout on the call or the function: the caller's default, 30 s,
    or $SAGE_COMM_TIMEOUT, or FunctionClient(timeout=...)."""
    Clock.deploy(bus=bus)
    monkeypatch.delenv("SAGE_COMM_TIMEOUT", raising=False)
    assert 29.0 < FunctionClient(bus=bus).call("clock", "budget") <= 30.0
    monkeypatch.setenv("SAGE_COMM_TIMEOUT", "12")
    assert 11.0 < FunctionClient(bus=bus).call("clock", "budget") <= 12.0
    assert 6.0 < FunctionClient(bus=bus, timeout=7).call("clock", "budget") <= 7.0
