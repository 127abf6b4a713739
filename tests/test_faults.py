"""Faults and recovery with real processes: replicas, routers and callers
killed mid-work, stuck handlers, full rings, slow subscribers, hostile input,
and many processes starting the same bus at once."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time
import uuid

import pytest
import ray
from _wait import wait_for

from sage_ray_comm import (
    BaseService,
    CallTimeout,
    DeserializationError,
    FunctionClient,
    SerializationError,
    ServiceNotFound,
    ServiceUnavailable,
    _core,
    endpoint,
    get_communication_bus,
    sage_service,
    service_function,
    shm,
)
from sage_ray_comm.router import ROUTER_NAMESPACE, bus_namespace, router_name

pytestmark = [pytest.mark.slow, pytest.mark.kills]


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


# ServiceUnavailable reaches a waiting caller within LIVENESS_SLICE (0.25 s)
# of a replica's death; the tests allow this much on a loaded 2-core machine.
DEATH_BOUND = 1.0


def _call(client, mode, loop, service, fn, *args, **kw):
    """One call in each of the three request-response forms."""
    if mode == "call":
        return client.call(service, fn, *args, **kw)
    if mode == "call_async":
        return client.call_async(service, fn, *args, **kw).result(timeout=30)
    return loop.run_until_complete(client.acall(service, fn, *args, **kw))


def test_replica_death_under_load(bus):
    h = Worker.deploy(bus=bus)
    b = get_communication_bus(bus).start()
    client = FunctionClient(bus=bus)
    pids = {i.instance_id: client.call("worker", "pid", instance=i.instance_id) for i in h.instances}
    stop = threading.Event()
    outcomes: list = []  # (kind, function, mode, started, ended, detail): every call, whatever happened
    lock = threading.Lock()

    def caller(k):
        loop = asyncio.new_event_loop()
        i = 0
        while not stop.is_set():
            fn = "square" if i % 2 else "square_once"
            mode = ("call", "call_async", "acall")[(i // 2 + k) % 3]
            t0 = time.monotonic()
            try:
                r = _call(client, mode, loop, "worker", fn, i, timeout=5)
                kind, detail = ("ok" if r == i * i else "wrong"), r
            except BaseException as e:  # every outcome is collected: none kills the thread unseen
                kind, detail = type(e).__name__, repr(e)
            with lock:
                outcomes.append((kind, fn, mode, t0, time.monotonic(), detail))
            i += 1
        loop.close()

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(o[0] == "ok" for o in outcomes) > 200, what="calls flowing")

    # 1: ray.kill of one replica; 2: SIGKILL of another's worker process.
    kills = []
    for n, victim in enumerate([h.instances[0], h.instances[1]]):
        before = sum(o[0] == "ok" for o in outcomes)
        kills.append(time.monotonic())
        if n == 0:
            ray.kill(h.actors[0], no_restart=True)
        else:
            os.kill(pids[victim.instance_id], signal.SIGKILL)
        wait_for(
            lambda v=victim: v.instance_id not in {r["instance"] for r in b.services()}, 10, "the router dropping it"
        )
        dropped_after = time.monotonic() - kills[-1]
        assert dropped_after < 2.0, f"the router took {dropped_after:.2f} s to drop a dead replica"
        wait_for(lambda b0=before: sum(o[0] == "ok" for o in outcomes) > b0 + 200, what="calls going on after the kill")
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    kinds = {o[0] for o in outcomes}
    assert kinds <= {"ok", "ServiceUnavailable"}, [o for o in outcomes if o[0] not in ("ok", "ServiceUnavailable")][:5]
    # Idempotent calls are retried on another replica, in every form: never a failure.
    assert not [o for o in outcomes if o[1] == "square" and o[0] != "ok"]
    # A non-idempotent call that saw the death: ServiceUnavailable within the
    # bound of the death (or of its own start, if it started after), never its 5 s timeout.
    for kind, _fn, mode, t0, t1, detail in outcomes:
        if kind == "ServiceUnavailable":
            death = max([k for k in kills if k <= t1], default=t0)
            assert t1 - max(t0, death) < DEATH_BOUND, (mode, t1 - max(t0, death), detail)
    assert {o[2] for o in outcomes if o[0] == "ok"} == {"call", "call_async", "acall"}
    assert sum(o[0] == "ok" for o in outcomes) > 400
    client.close()


@sage_service(name="held", replicas=2, max_concurrency=4)
class Held(BaseService):
    """A replica "armed" by a test blocks the calls it gets until it is killed."""

    def initialize(self):
        self.armed = False

    @service_function
    def arm(self, gate: str, ns: str) -> int:
        self.armed, self.gate, self.ns = True, gate, ns
        return os.getpid()

    def _hold(self, x):
        if not self.armed:
            return x
        from sage_ray_comm import SageQueue

        SageQueue(self.gate, namespace=self.ns, create=False).put("started")
        threading.Event().wait()  # until the test kills this replica
        return x

    @service_function(idempotent=True)
    def hold(self, x):
        return self._hold(x)

    @service_function
    def hold_once(self, x):
        return self._hold(x)


@pytest.mark.parametrize("mode", ["call", "call_async", "acall"])
def test_replica_death_mid_call_in_each_call_form(bus, mode):
    """A call in flight on a replica that is SIGKILLed: idempotent ones finish
    on the other replica; others get ServiceUnavailable within the bound."""
    from sage_ray_comm import SageQueue

    h = Held.deploy(bus=bus)
    client = FunctionClient(bus=bus)
    ns = bus_namespace(bus)
    loop = asyncio.new_event_loop()
    victim = h.instances[0]
    for fn, expect in (("hold", "ok"), ("hold_once", "ServiceUnavailable")):
        gate = SageQueue(f"gate-{fn}", 4096, namespace=ns)
        pid = client.call("held", "arm", gate.name, ns, instance=victim.instance_id)
        retries = client.stats()["retries"]
        # Routing picks a replica; repeat until one call is held by the armed one.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            while True:
                fut = pool.submit(_call, client, mode, loop, "held", fn, 7, timeout=20)
                done, _ = concurrent.futures.wait([fut], timeout=5)
                if not done:
                    break  # not answered: it is the one held by the armed replica
                assert fut.result() == 7  # answered by the other one
            assert gate.get(timeout=10) == "started"
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            if expect == "ok":
                assert fut.result(timeout=20) == 7
                assert client.stats()["retries"] == retries + 1
            else:
                with pytest.raises(ServiceUnavailable, match="died"):
                    fut.result(timeout=20)
            assert time.monotonic() - t_kill < DEATH_BOUND
        gate.destroy()
        if expect == "ok":
            h.shutdown()  # the next function needs a fresh armed replica
            h = Held.deploy(bus=bus)
            victim = h.instances[0]
    loop.close()
    client.close()


@sage_service(name="steady")
class Steady(BaseService):
    @service_function
    def echo(self, x):
        return x


@pytest.mark.parametrize("form", ["call", "call_async"])
def test_a_call_over_ray_to_a_frozen_replica_fails_at_its_timeout(bus, form):
    """SIGSTOP: the replica's actor neither answers nor dies. A call over Ray
    (the path every cross-node call to a deployed replica takes) fails with
    CallTimeout at its timeout plus the slack, never later, and the sweeper
    holds nothing afterwards."""
    from sage_ray_comm.ray_transport import DirectTransport
    from sage_ray_comm.transport import EXPIRY, EXPIRY_SLACK

    Steady.deploy(bus=bus)
    direct = DirectTransport(bus_namespace(bus))
    with FunctionClient(bus=bus, transport=lambda node: direct) as client:
        assert client.call("steady", "echo", 1) == 1
        inst = client.endpoint.instances("steady")[0]
        pid = ray.get(ray.get_actor(inst.actor_name, namespace=ROUTER_NAMESPACE).pid.remote(), timeout=30)
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(CallTimeout, match=r"steady\.echo"):
                if form == "call":
                    client.call("steady", "echo", 2, timeout=0.5)
                else:
                    client.call_async("steady", "echo", 2, timeout=0.5).result(timeout=10)
            took = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert 0.5 <= took < 0.5 + EXPIRY_SLACK + 0.5, took
        assert client.call("steady", "echo", 3) == 3  # thawed: it answers again
    assert len(EXPIRY) == 0


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
    wait_for(
        lambda: any(s.pattern == "after.restart" for s in (ask("snapshot") or {"subscriptions": []})["subscriptions"]),
        10,
        "re-subscription",
    )
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
    def wait_gate(self, gate: str, ns: str, tag=None):
        """Runs until the test puts into the gate queue: no sleep stands in for a window."""
        from sage_ray_comm import SageQueue

        self.runs.append(tag)
        SageQueue(gate + "-started", namespace=ns, create=False).put(tag)
        SageQueue(gate, namespace=ns, create=False).get(timeout=60)
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
    from sage_ray_comm import SageQueue

    Sleeper.deploy(bus=bus)
    client = FunctionClient(bus=bus)
    gate = SageQueue("gate", 4096, namespace=bus_namespace(bus))

    @ray.remote(num_cpus=0.1)
    class Caller:
        def pid(self):
            return os.getpid()

        def call(self, bus, gate, ns):
            from sage_ray_comm import FunctionClient

            return FunctionClient(bus=bus).call("sleeper", "wait_gate", gate, ns, "doomed", timeout=30)

    started = SageQueue("gate-started", 4096, namespace=bus_namespace(bus))
    c = Caller.remote()
    try:
        pid = ray.get(c.pid.remote())
        c.call.remote(bus, gate.name, bus_namespace(bus))
        assert started.get(timeout=30) == "doomed"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _core.process_alive(pid), 10, "the caller to be gone")
        gate.put("go")  # only now does the handler finish: its caller is certainly dead
        # The replica finds the caller dead, drops and counts the reply, and
        # removes the caller's reply ring.
        wait_for(lambda: client.call("sleeper", "stats")["replies_dropped"] == 1, what="the dropped reply")
        theirs = [s for s in shm.list_segments(bus_namespace(bus)) if s.creator_pid == pid]
        assert theirs == []
        assert client.call("sleeper", "nap", 0, "fine") == "fine"
    finally:
        ray.kill(c)
        gate.destroy()
        started.destroy()
        client.close()


def test_expired_calls_are_not_run(bus):
    from sage_ray_comm import SageQueue

    Slowpoke.deploy(bus=bus)
    client = FunctionClient(bus=bus)
    ns = bus_namespace(bus)
    gate = SageQueue("gate", 4096, namespace=ns)
    started = SageQueue("gate-started", 4096, namespace=ns)
    try:
        first = client.call_async("slowpoke", "wait_gate", gate.name, ns, "t0", timeout=30)
        assert started.get(timeout=30) == "t0"  # the one handler thread is now held
        # One thread, held by the first call: these wait in the ring past their deadlines.
        futs = [client.call_async("slowpoke", "nap", 0, f"t{i}", timeout=0.3) for i in range(1, 5)]
        for f in futs:
            with pytest.raises(CallTimeout):
                f.result(timeout=10)
        gate.put("go")
        assert first.result(timeout=30) == "t0"
        # Reached after their deadlines: dropped unrun, and counted.
        assert client.call("slowpoke", "stats")["expired"] == 4
        assert client.call("slowpoke", "ran") == ["t0"]
    finally:
        gate.destroy()
        started.destroy()
        client.close()


@sage_service(name="tiny", max_concurrency=1, queue_bytes=64 * 1024)
class Tiny(BaseService):
    def initialize(self):
        self.got = 0

    @service_function
    def block(self, gate: str, ns: str):
        from sage_ray_comm import SageQueue

        SageQueue(gate, namespace=ns, create=False).get(timeout=60)

    @service_function
    def take(self, blob: bytes):
        self.got += 1

    @service_function
    def count(self):
        return self.got


def test_full_request_ring_is_backpressure_not_loss(bus):
    from sage_ray_comm import SageQueue

    Tiny.deploy(bus=bus)
    client = FunctionClient(bus=bus)
    ns = bus_namespace(bus)
    gate = SageQueue("gate", 4096, namespace=ns)
    try:
        client.send("tiny", "block", gate.name, ns)  # holds the one handler thread until released
        accepted, refused = 0, 0
        while refused == 0:
            try:
                client.send("tiny", "take", b"x" * 4096, timeout=0.2)
                accepted += 1
            except CallTimeout as e:
                assert "stayed full" in str(e) and "tiny" in str(e)
                refused += 1
        # What the 64 KiB ring holds of ~4.2 KiB frames (the blocked call's
        # frame is out already, or not much): 13 to 15 of them, no more.
        assert 13 <= accepted <= 15, accepted
        gate.put("go")
        # Everything accepted is processed once the handler unblocks: nothing lost.
        wait_for(lambda: client.call("tiny", "count", timeout=30) == accepted, what="all accepted processed")
    finally:
        gate.destroy()
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
    try:
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
        client.close()
    finally:
        ray.kill(slow)  # also when the test fails


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
        import test_faults

        from sage_ray_comm import get_communication_bus

        get_communication_bus(bus).start()
        h = test_faults.Worker.deploy(bus=bus)
        return sorted(i.instance_id for i in h.instances)

    try:
        results = ray.get([start_everything.remote(name) for _ in range(16)], timeout=240)
        assert all(r == results[0] for r in results), "every process ended up with the same replicas"
        routers = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == router_name(name)]
        assert len(routers) == 1
        snap = ray.get(ray.get_actor(router_name(name), namespace=ROUTER_NAMESPACE).snapshot.remote())
        assert sorted(snap["services"]["worker"]) == results[0] and len(results[0]) == 3
    finally:
        get_communication_bus(name).shutdown()  # also when the test fails
        assert shm.list_segments(bus_namespace(name)) == []


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

    @service_function
    def ok_with(self, thing):
        return True


def test_services_holding_unpicklable_state_deploy(bus):
    Holder.deploy(bus=bus)
    with FunctionClient(bus=bus) as c:
        assert c.call("holder", "ok") is True
        # Such state as an argument: a typed error at the caller, naming the
        # type and the call; nothing is sent and the service goes on.
        with pytest.raises(
            SerializationError, match=r"call to holder\.ok_with cannot be pickled: TypeError: .*_thread\.lock"
        ):
            c.call("holder", "ok_with", threading.Lock())
        assert c.call("holder", "ok") is True


# With the router's same-host pid check off, Ray's actor state (the pending
# watch() call) is the only fast signal: it drops a killed replica well under
# the 2 s heartbeat grace. (Measured here: about 0.1-0.3 s.)
WATCH_BOUND = 1.0


def test_router_learns_of_a_replica_death_from_ray_alone(bus):
    from sage_ray_comm.router import get_router

    router = get_router(bus, check_pids=False)  # created first: every later lookup gets this one
    assert ray.get(router.ping.remote())["check_pids"] is False
    h = Steady.deploy(bus=bus)
    b = get_communication_bus(bus).start()
    assert [r["instance"] for r in b.services()] == [h.instances[0].instance_id]
    # No caller ever touches the replica: the router learns of its death alone.
    ray.kill(h.actors[0], no_restart=True)
    t0 = time.monotonic()
    wait_for(lambda: b.services() == [], 10, "the router dropping the replica")
    assert time.monotonic() - t0 < WATCH_BOUND


_INPROC = """
import sys, ray
from sage_ray_comm import BaseService, service_function
ray.init(address=sys.argv[1], log_to_driver=False)

class Local(BaseService):
    @service_function
    def f(self):
        return 1

svc = Local("local").start(bus=sys.argv[2])
print(svc.service_id, flush=True)
sys.stdin.read()
"""


def test_in_process_service_death_is_learnt_from_heartbeats(bus):
    """An in-process service has no actor of its own to watch: with the pid
    check off, heartbeat silence is the only signal, after the grace period."""
    import subprocess
    import sys

    from sage_ray_comm.router import HEARTBEAT_GRACE, get_router

    get_router(bus, check_pids=False)
    b = get_communication_bus(bus).start()
    p = subprocess.Popen(
        [sys.executable, "-c", _INPROC, ray.get_runtime_context().gcs_address, bus],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        sid = p.stdout.readline().strip()
        assert sid.startswith("local-")
        wait_for(lambda: [r["instance"] for r in b.services()] == [sid], 30, "registration")
        p.send_signal(signal.SIGKILL)
        p.wait()
        t0 = time.monotonic()
        wait_for(lambda: b.services() == [], HEARTBEAT_GRACE + 10, "the router dropping it")
        took = time.monotonic() - t0
        # not at once (nothing else can tell), and not long after the grace
        assert HEARTBEAT_GRACE * 0.5 < took < HEARTBEAT_GRACE + 3, took
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@sage_service(name="reborn", replicas=2, num_cpus=0.1, max_restarts=-1)
class Reborn(BaseService):
    """Ray restarts its replicas (max_restarts); a restarted one waits for the
    file ``gate`` before it serves: the test decides when they come back."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        if ray.get_runtime_context().was_current_actor_reconstructed:
            end = time.monotonic() + 120
            while not os.path.exists(gate) and time.monotonic() < end:
                time.sleep(0.02)

    @service_function
    def pid(self) -> int:
        return os.getpid()

    @service_function
    def nap(self, seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()

    @service_function
    def mark(self, path: str) -> None:
        open(path, "w").close()

    @service_function
    def count(self, n: int):
        yield from range(n)

    @service_function(idempotent=True)
    def once(self, path: str) -> int:
        """Naps (until killed) the first time it is called, answers after."""
        if not os.path.exists(path):
            open(path, "w").close()
            time.sleep(120)
        return os.getpid()


def _kill_all_and_see_them_restarting(client, h) -> set[int]:
    pids = {client.call("reborn", "pid", instance=i.instance_id) for i in h.instances}
    assert len(pids) == 2
    for p in pids:
        os.kill(p, signal.SIGKILL)
    ep = client.endpoint
    wait_for(
        lambda: "reborn" not in ep.refresh()["services"] and len(ep.snapshot["restarting"].get("reborn", ())) == 2,
        30,
        "both replicas listed as restarting, none live",
    )
    return pids


@sage_service(name="mortal", num_cpus=0.1)
class Mortal(BaseService):
    """Ray's default: a replica that dies is not restarted."""

    @service_function
    def pid(self) -> int:
        return os.getpid()


def test_a_call_made_while_every_replica_restarts_waits_for_one(bus, tmp_path):
    """Every replica SIGKILLed at once, and Ray restarting them: a call made
    meanwhile waits for one, up to its timeout, as a Ray Serve handle does,
    instead of failing with ServiceNotFound. A service stopped on purpose
    still fails at once."""
    gate = tmp_path / "gate"
    h = Reborn.deploy(str(gate), bus=bus)
    client = FunctionClient(bus=bus)
    try:
        pids = _kill_all_and_see_them_restarting(client, h)
        ep = client.endpoint
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(client.call, "reborn", "pid", timeout=120)
            wait_for(lambda: client.stats()["restart_waits"] == 1 or fut.done(), 30, "the call waiting for a replica")
            assert not fut.done(), f"the call did not wait: {fut.exception()!r}"
            gate.touch()  # the replicas may come back now
            assert fut.result(timeout=120) not in pids
        wait_for(lambda: ep.refresh()["restarting"] == {}, 60, "both replicas back")
        back = list(ep.snapshot["services"]["reborn"].values())
        assert len(back) == 2 and not {i.pid for i in back} & pids
        # Ray can fail the first stop() sent to a restarted replica (this
        # process's handle still catching up): shutdown() asks again, and
        # returns once the replicas Ray brought back are dead, rings removed.
        h.shutdown()
        assert [i.pid for i in back if shm.process_alive(i.pid, i.pid_start)] == []
        rings = {shm.segment_name(bus_namespace(bus), i.request_queue) for i in back}
        assert rings & {s.shm_name for s in shm.list_segments(bus_namespace(bus))} == set()
        t0 = time.monotonic()
        try:
            got = client.call("reborn", "pid", timeout=60)
        except (ServiceNotFound, ServiceUnavailable):  # (as the registry news reaches the client)
            pass
        else:
            pytest.fail(f"a stopped service answered: pid {got}; killed {pids}; registry {ep.refresh()}")
        assert time.monotonic() - t0 < 30, "a stopped service is not waited for"
    finally:
        gate.touch()
        client.close()


def test_async_calls_made_while_every_replica_restarts_do_not_block_their_caller(bus, tmp_path):
    """call_async returns at once, and acall and astream leave their event
    loop running, while the call waits for a restarting replica (in a thread of its own);
    a call cancelled before a replica came back is never sent."""
    gate = tmp_path / "gate"
    h = Reborn.deploy(str(gate), bus=bus)
    client = FunctionClient(bus=bus)
    try:
        pids = _kill_all_and_see_them_restarting(client, h)
        fut = client.call_async("reborn", "pid", timeout=120)  # returns while the gate is shut
        assert not fut.done()
        never = tmp_path / "never-sent"
        dropped = client.call_async("reborn", "mark", str(never), timeout=120)
        assert dropped.cancel() and dropped.cancelled()

        async def main() -> tuple:
            call = asyncio.ensure_future(client.acall("reborn", "pid", timeout=120))
            opening = asyncio.ensure_future(client.astream("reborn", "count", 3, timeout=120))
            # This loop goes on while the calls wait: it is what opens the gate.
            while client.stats()["restart_waits"] < 4:
                assert not call.done(), call.exception()
                assert not opening.done(), opening.exception()
                await asyncio.sleep(0.01)
            gate.touch()
            async with await opening as items:
                got = [x async for x in items]
            return await call, got

        pid, items = asyncio.run(main())
        assert pid not in pids and items == [0, 1, 2]
        assert fut.result(timeout=120) not in pids
        wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("sage-wait-")], 30, "waiters gone")
        assert not never.exists(), "a call cancelled while it waited for a replica was sent"
    finally:
        gate.touch()
        client.close()


def test_an_async_retry_that_finds_every_replica_restarting_waits_in_a_thread_of_its_own(bus, tmp_path):
    """An idempotent call_async whose replica dies while every replica is
    killed: its retry waits for a restarted one in a thread of its own, and
    the thread that completes this process's calls goes on meanwhile."""
    gate = tmp_path / "gate"
    h = Reborn.deploy(str(gate), bus=bus)
    Mortal.deploy(bus=bus)
    client = FunctionClient(bus=bus)
    try:
        pids = {client.call("reborn", "pid", instance=i.instance_id) for i in h.instances}
        napping = tmp_path / "napping"
        fut = client.call_async("reborn", "once", str(napping), timeout=120)
        wait_for(napping.exists, 30, "the first attempt running")
        for p in pids:
            os.kill(p, signal.SIGKILL)
        wait_for(lambda: client.stats()["restart_waits"] == 1 or fut.done(), 30, "the retry waiting for a replica")
        assert not fut.done(), f"the retry did not wait: {fut.exception()!r}"
        assert [t for t in threading.enumerate() if t.name == "sage-retry"]
        assert client.call_async("mortal", "pid", timeout=30).result(timeout=30) > 0  # completions go on
        gate.touch()
        assert fut.result(timeout=120) not in pids
        # One retry, or more when the first retry met the other killed replica
        # before the registry dropped it (the limit is Retrying.MAX_RETRIES).
        assert 1 <= client.stats()["retries"] <= 3
    finally:
        gate.touch()
        client.close()


def test_a_call_waiting_for_a_restarting_replica_gives_up_when_its_client_closes(bus, tmp_path, monkeypatch):
    """Closing the client (as ray.shutdown() does) ends the wait at once,
    with a typed error, instead of at the call's timeout."""
    # The waiter looks again every RESTART_LOOK_SECONDS anyway: made longer
    # than this test waits, only close() waking it can end the wait in time.
    monkeypatch.setattr(endpoint, "RESTART_LOOK_SECONDS", 600.0)
    gate = tmp_path / "gate"
    h = Reborn.deploy(str(gate), bus=bus)
    client = FunctionClient(bus=bus)
    try:
        _kill_all_and_see_them_restarting(client, h)
        fut = client.call_async("reborn", "pid", timeout=120)
        wait_for(lambda: client.stats()["restart_waits"] == 1, 30, "the call waiting for a replica")
        ep = client.endpoint
        t0 = time.monotonic()
        client.close()
        assert ep.closed, "the test's client was not the endpoint's last"
        with pytest.raises(ServiceUnavailable, match="closed"):
            fut.result(timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        gate.touch()
        client.close()


def test_a_call_that_waited_for_a_restarting_replica_keeps_its_timeout(bus, tmp_path):
    """The wait for a restarting replica comes off the call's timeout: a
    call with 10 s that waited 4 s has 6 s left for a handler that takes 7."""
    gate = tmp_path / "gate"
    h = Reborn.deploy(str(gate), bus=bus)
    client = FunctionClient(bus=bus)
    try:
        _kill_all_and_see_them_restarting(client, h)
        opener = threading.Timer(4.0, gate.touch)  # the scenario: a replica is back only after 4 s
        t0 = time.monotonic()
        opener.start()
        with pytest.raises(CallTimeout):
            client.call("reborn", "nap", 7.0, timeout=10.0)
        took = time.monotonic() - t0
        assert 4.0 < took < 11.5, took
        assert client.stats()["restart_waits"] == 1
    finally:
        gate.touch()
        client.close()


@sage_service(name="twice", replicas=2, num_cpus=0.1)
class Twice(BaseService):
    """An idempotent function that writes its pid to a file, then naps."""

    @service_function(idempotent=True)
    def nap(self, seconds: float, pids: str) -> int:
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        return os.getpid()


def test_a_retried_call_keeps_its_first_attempts_deadline(bus, tmp_path):
    """An idempotent call whose replica died is retried on another one with
    what is left of its timeout, not a fresh one: 8 s in all, 3 s of them
    spent on the replica that died, leave 5 s for a handler that takes 6."""
    Twice.deploy(bus=bus)
    client = FunctionClient(bus=bus)
    pids = tmp_path / "pids"
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            t0 = time.monotonic()
            fut = pool.submit(client.call, "twice", "nap", 6.0, str(pids), timeout=8.0)
            wait_for(lambda: pids.exists() and pids.read_text().count("\n") == 1, 30, "the first attempt running")
            kill_at = t0 + 3.0  # the scenario: the first replica dies 3 s into the call
            time.sleep(max(0.0, kill_at - time.monotonic()))
            os.kill(int(pids.read_text()), signal.SIGKILL)
            with pytest.raises(CallTimeout):
                fut.result(timeout=60)
            took = time.monotonic() - t0
        assert pids.read_text().count("\n") == 2, "the call was not retried"
        assert took < 8.0 + DEATH_BOUND + 1.0, took
    finally:
        client.close()


def test_a_call_to_a_service_whose_replica_died_for_good_fails_fast(bus):
    """No restarts left (Ray's default): the replica's actor name is freed,
    the router stops listing it as restarting, and a call fails with a typed
    error instead of waiting out its timeout."""
    Mortal.deploy(bus=bus)
    client = FunctionClient(bus=bus)
    try:
        os.kill(client.call("mortal", "pid"), signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises((ServiceNotFound, ServiceUnavailable)):
            client.call("mortal", "pid", timeout=60)
        assert time.monotonic() - t0 < 30
        wait_for(lambda: client.endpoint.refresh()["restarting"] == {}, 10, "the dead replica unlisted")
    finally:
        client.close()


@ray.remote(num_cpus=0.05)
class _Probed:
    def __init__(self, gate: str) -> None:
        if ray.get_runtime_context().was_current_actor_reconstructed:
            end = time.monotonic() + 120
            while not os.path.exists(gate) and time.monotonic() < end:
                time.sleep(0.02)

    def pid(self) -> int:
        return os.getpid()


def test_the_router_tells_a_restarting_replica_from_one_dead_for_good(ray_session, tmp_path):
    """The router's probe of the replicas it lists as restarting, against
    real actors: one SIGKILLed with no restarts left and a name nobody holds
    are gone for good; one Ray is restarting (held at a gate) and a live one
    are not, however often they are probed."""
    from sage_ray_comm.router import _RouterActor

    gate, tag = tmp_path / "gate", uuid.uuid4().hex[:8]
    names = {k: f"probe-{k}-{tag}" for k in ("dead", "back", "live", "never")}
    actors = {
        k: _Probed.options(name=names[k], namespace=ROUTER_NAMESPACE, max_restarts=r).remote(str(gate))
        for k, r in (("dead", 0), ("back", -1), ("live", 0))
    }
    try:
        for k in ("dead", "back"):
            os.kill(ray.get(actors[k].pid.remote()), signal.SIGKILL)
        router = _RouterActor(f"probe-{tag}")
        gone: set = set()
        answered = []  # the restarting one's probes that came back (each is then replaced by a new one)

        def look() -> bool:
            before = router._probes.get(names["back"])
            gone.update(router._gone_for_good(set(names.values())))
            if before is not None and router._probes.get(names["back"]) is not before:
                answered.append(before)
            return {names["dead"], names["never"]} <= gone and len(answered) >= 2

        wait_for(look, 60, "the dead replicas found, and the restarting one probed twice")
        assert gone == {names["dead"], names["never"]}
        gate.touch()

        def restarted() -> bool:
            try:
                return ray.get(actors["back"].pid.remote(), timeout=60) > 0
            except ray.exceptions.ActorUnavailableError:
                return False  # still restarting

        wait_for(restarted, 60, "the restarting one back")
    finally:
        gate.touch()
        for a in actors.values():
            ray.kill(a, no_restart=True)
