"""Faults and recovery with real processes: replicas, routers and callers
killed mid-work, stuck handlers, full rings, slow subscribers, hostile input,
and many processes starting the same bus at once."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time

import pytest
import ray
from _wait import wait_for

from sage_ray_comm import (
    BaseService,
    CallTimeout,
    DeserializationError,
    FunctionClient,
    ServiceUnavailable,
    get_communication_bus,
    sage_service,
    service_function,
    shm,
)
from sage_ray_comm.router import ROUTER_NAMESPACE, bus_namespace, router_name

pytestmark = pytest.mark.slow


@sage_service(name="worker", replicas=3)
class Worker(BaseService):
    @service_function(idempotent=True)
    def square(self, x: int) -> int:
        time.sleep(0.001)
        return x * x

    @service_function
    def square_once(self, x: int) -> int:
        time.sleep(0.001)
        return x * x

    @service_function
    def pid(self) -> int:
        return os.getpid()


def test_replica_death_under_load(bus):
    h = Worker.deploy(bus=bus)
    b = get_communication_bus(bus).start()
    client = FunctionClient(bus=bus)
    pids = {i.instance_id: client.call("worker", "pid", instance=i.instance_id) for i in h.instances}
    stop = threading.Event()
    outcomes = {"ok": 0, "typed": 0, "wrong": [], "slow": []}
    lock = threading.Lock()

    def caller(k):
        i = 0
        while not stop.is_set():
            fn = "square" if i % 2 else "square_once"
            t0 = time.monotonic()
            try:
                r = client.call("worker", fn, i, timeout=5)
                with lock:
                    if r == i * i:
                        outcomes["ok"] += 1
                    else:
                        outcomes["wrong"].append((fn, i, r))
            except (ServiceUnavailable, CallTimeout) as e:
                with lock:
                    if fn == "square":
                        outcomes["wrong"].append(("idempotent call saw the death", repr(e)))
                    outcomes["typed"] += 1
            if time.monotonic() - t0 > 5 + 1:
                with lock:
                    outcomes["slow"].append(time.monotonic() - t0)
            i += 1

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: outcomes["ok"] > 200, what="calls flowing")

    # 1: ray.kill of one replica; 2: SIGKILL of another's worker process.
    victims = [h.instances[0], h.instances[1]]
    for n, victim in enumerate(victims):
        before = outcomes["ok"]
        t_kill = time.monotonic()
        if n == 0:
            ray.kill(h.actors[0], no_restart=True)
        else:
            os.kill(pids[victim.instance_id], signal.SIGKILL)
        wait_for(lambda: victim.instance_id not in {r["instance"] for r in b.services()}, 10, "the router dropping it")
        dropped_after = time.monotonic() - t_kill
        assert dropped_after < 2.0, f"the router took {dropped_after:.2f} s to drop a dead replica"
        wait_for(lambda: outcomes["ok"] > before + 200, what="calls going on after the kill")
    stop.set()
    for t in threads:
        t.join(30)
    assert not outcomes["wrong"] and not outcomes["slow"], outcomes
    assert outcomes["ok"] > 400
    client.close()


@sage_service(name="steady")
class Steady(BaseService):
    @service_function
    def echo(self, x):
        return x


def test_router_death_does_not_break_known_calls_and_the_registry_rebuilds(bus):
    h = Steady.deploy(bus=bus)
    b = get_communication_bus(bus).start()
    got = []
    b.subscribe("after.restart", got.append)
    client = FunctionClient(bus=bus)
    assert client.call("steady", "echo", 1) == 1
    router = ray.get_actor(router_name(bus), namespace=ROUTER_NAMESPACE)
    started = ray.get(router.ping.remote())["started_at"]
    ray.kill(router, no_restart=False)  # Ray restarts it (max_restarts=-1), empty
    # Known services keep working from the cached registry while it is down.
    for i in range(50):
        assert client.call("steady", "echo", i) == i

    def ask(method):
        try:
            return ray.get(getattr(router, method).remote(), timeout=10)
        except ray.exceptions.RayError:  # restarting
            return None

    wait_for(lambda: (p := ask("ping")) and p["started_at"] != started, what="router restart")
    # Replicas re-register on their next heartbeat; subscribers re-subscribe.
    snap = wait_for(lambda: (s := ask("snapshot")) and s["services"].get("steady") and s, 10, "re-registration")
    assert {i.instance_id for i in snap["services"]["steady"].values()} == {h.instances[0].instance_id}
    wait_for(lambda: any(s.pattern == "after.restart" for s in (ask("snapshot") or {"subscriptions": []})["subscriptions"]),
             10, "re-subscription")
    client.refresh()
    assert client.call("steady", "echo", "after") == "after"
    assert b.publish("after.restart", "hello") == 1
    wait_for(lambda: got == ["hello"], what="the event")
    client.close()


@sage_service(name="slowpoke", max_concurrency=1)
class Slowpoke(BaseService):
    def initialize(self):
        self.runs = []

    @service_function
    def nap(self, seconds: float, tag=None):
        self.runs.append(tag)
        time.sleep(seconds)
        return tag

    @service_function
    def ran(self):
        return list(self.runs)

    @service_function
    def stats(self):
        return self.get_stats()


@sage_service(name="sleeper", max_concurrency=4)
class Sleeper(Slowpoke):
    """Slowpoke with threads to spare, so it can be watched while it naps."""


def test_caller_killed_mid_call(bus):
    Sleeper.deploy(bus=bus)
    client = FunctionClient(bus=bus)

    @ray.remote(num_cpus=0.1)
    class Caller:
        def pid(self):
            return os.getpid()

        def call(self, bus):
            from sage_ray_comm import FunctionClient

            return FunctionClient(bus=bus).call("sleeper", "nap", 1.0, "doomed", timeout=30)

    c = Caller.remote()
    pid = ray.get(c.pid.remote())
    c.call.remote(bus)
    wait_for(lambda: client.call("sleeper", "ran") == ["doomed"], what="the call to start")
    os.kill(pid, signal.SIGKILL)
    # The replica finishes, finds the caller dead, drops and counts the reply,
    # and removes the caller's reply ring.
    wait_for(lambda: client.call("sleeper", "stats")["replies_dropped"] == 1, what="the dropped reply")
    theirs = [s for s in shm.list_segments(bus_namespace(bus)) if s.creator_pid == pid]
    assert theirs == []
    assert client.call("sleeper", "nap", 0, "fine") == "fine"
    client.close()


def test_expired_calls_are_not_run(bus):
    Slowpoke.deploy(bus=bus)
    client = FunctionClient(bus=bus)
    futs = [client.call_async("slowpoke", "nap", 0.5, f"t{i}", timeout=0.3) for i in range(5)]
    for f in futs:
        with pytest.raises(CallTimeout):
            f.result(timeout=10)
    # The first started before its deadline; the others waited behind it and
    # were dropped unrun when the replica reached them.
    wait_for(lambda: client.call("slowpoke", "stats")["expired"] == 4, what="four expired")
    assert client.call("slowpoke", "ran") == ["t0"]
    client.close()


@sage_service(name="tiny", max_concurrency=1, queue_bytes=64 * 1024)
class Tiny(BaseService):
    def initialize(self):
        self.got = 0

    @service_function
    def block(self, seconds: float):
        time.sleep(seconds)

    @service_function
    def take(self, blob: bytes):
        self.got += 1

    @service_function
    def count(self):
        return self.got


def test_full_request_ring_is_backpressure_not_loss(bus):
    Tiny.deploy(bus=bus)
    client = FunctionClient(bus=bus)
    client.send("tiny", "block", 2.0)
    accepted, refused = 0, 0
    t0 = time.monotonic()
    while refused == 0:
        try:
            client.send("tiny", "take", b"x" * 4096, timeout=0.2)
            accepted += 1
        except CallTimeout as e:
            assert "stayed full" in str(e) and "tiny" in str(e)
            refused += 1
    assert time.monotonic() - t0 < 10 and 5 < accepted < 20
    # Everything accepted is processed once the handler unblocks: nothing lost.
    wait_for(lambda: client.call("tiny", "count", timeout=30) == accepted, what="all accepted processed")
    client.close()


def test_slow_subscriber_does_not_block_publisher_or_others(bus):
    b = get_communication_bus(bus).start()
    fast = []
    b.subscribe("feed.data", fast.append)

    @ray.remote(num_cpus=0.1)
    class SlowSubscriber:
        def __init__(self, bus):
            from sage_ray_comm import FunctionClient

            self.release = threading.Event()
            self.got = []
            self.c = FunctionClient(bus=bus)
            self.c.subscribe("feed.data", self.on, buffer_bytes=256 * 1024)  # room for ~30 events

        def on(self, payload):
            self.release.wait()
            self.got.append(payload[:8])

        def go(self):
            self.release.set()

        def seen(self):
            return list(self.got)

        def close(self):
            self.c.close()

    slow = SlowSubscriber.remote(bus)
    client = FunctionClient(bus=bus)
    client.wait_for_subscribers("feed.data", 2)
    n = 200
    t0 = time.monotonic()
    delivered = [client.broadcast("feed.data", b"%08d" % i + bytes(8 * 1024)) for i in range(n)]
    publish_time = time.monotonic() - t0
    assert publish_time < 20  # never waited on the stuck subscriber
    dropped = client.stats()["dropped"]
    assert dropped > 0 and sum(delivered) == 2 * n - dropped
    wait_for(lambda: len(fast) == n, what="the fast subscriber getting everything")
    ray.get(slow.go.remote())
    accepted = n - dropped
    got = wait_for(lambda: len(s := ray.get(slow.seen.remote())) >= accepted and s, what="the slow one")
    # At-most-once: what it got is a subset, in order, without duplicates.
    assert len(got) == accepted == len(set(got)) and got == sorted(got)
    ray.get(slow.close.remote())
    ray.kill(slow)
    client.close()


class Poison:
    """Pickles fine, fails to unpickle (on the replica)."""

    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise RuntimeError("cannot be rebuilt here")


def test_arguments_that_fail_to_unpickle_are_a_typed_error(bus):
    Steady.deploy(bus=bus)
    client = FunctionClient(bus=bus)
    with pytest.raises(DeserializationError, match=r"steady\.echo.*RuntimeError: cannot be rebuilt here"):
        client.call("steady", "echo", Poison())
    assert client.call("steady", "echo", "still serving") == "still serving"
    client.close()


def test_concurrent_start_up_makes_one_router_and_one_entry_per_replica(ray_session):
    name = f"race-{os.getpid()}-{int(time.time())}"

    @ray.remote(num_cpus=0.01)
    def start_everything(bus):
        from sage_ray_comm import get_communication_bus

        import test_faults

        get_communication_bus(bus).start()
        h = test_faults.Worker.deploy(bus=bus)
        return sorted(i.instance_id for i in h.instances)

    results = ray.get([start_everything.remote(name) for _ in range(16)], timeout=240)
    assert all(r == results[0] for r in results), "every process ended up with the same replicas"
    routers = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == router_name(name)]
    assert len(routers) == 1
    snap = ray.get(ray.get_actor(router_name(name), namespace=ROUTER_NAMESPACE).snapshot.remote())
    assert sorted(snap["services"]["worker"]) == results[0] and len(results[0]) == 3
    get_communication_bus(name).shutdown()


@sage_service(name="holder")
class Holder(BaseService):
    """Holds a lock, a logger and an open file: built in the actor, never pickled."""

    def __init__(self):
        super().__init__()
        import logging

        self.lock = threading.Lock()
        self.log = logging.getLogger("holder")
        self.file = open(os.devnull, "w")

    @service_function
    def ok(self):
        with self.lock:
            self.file.write("x")
        return True


def test_services_holding_unpicklable_state_deploy(bus):
    with pytest.raises(TypeError):
        pickle.dumps(threading.Lock())
    Holder.deploy(bus=bus)
    with FunctionClient(bus=bus) as c:
        assert c.call("holder", "ok") is True


def test_router_death_detection_uses_ray_actor_state_not_callers(bus):
    # No caller ever touches the replica: the router learns of its death alone.
    h = Steady.deploy(bus=bus)
    b = get_communication_bus(bus).start()
    ray.kill(h.actors[0], no_restart=True)
    t0 = time.monotonic()
    wait_for(lambda: b.services() == [], 10, "the router dropping the replica")
    assert time.monotonic() - t0 < 2.0
