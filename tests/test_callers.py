"""Callers on other hosts (callers.py): a replica learns that one died from
Ray (the caller's life object fails with OwnerDiedError), cancels its calls
and closes its streams. The callers here run on this host, under another host's name, so the
replica cannot fall back on their pids."""

from __future__ import annotations

import os
import signal
import time

import ray
from _wait import wait_for
from test_cancel import OneAtATime
from test_streams import Gen

from sage_ray_comm import FunctionClient, SageQueue, shm
from sage_ray_comm.callers import RemoteCallers
from sage_ray_comm.names import direct_caller_name
from sage_ray_comm.producers import IDLE_SECONDS
from sage_ray_comm.ray_transport import DirectTransport
from sage_ray_comm.router import bus_namespace

ELSEWHERE = "another-host"


@ray.remote(num_cpus=0.05)
class Owner:
    def pid(self) -> int:
        return os.getpid()

    def life(self) -> list:
        self.ref = ray.put(b"")
        return [self.ref]  # in a list: the caller gets the reference, owned here

    def start(self, bus: str, gate: str, ns: str, queued: int) -> int:
        """Calls over Ray as if from another host (its name says so)."""
        shm._HOST_ID = ELSEWHERE  # the one way to be "another host" on one machine
        direct = DirectTransport(ns)
        self.client = FunctionClient(bus=bus, transport=lambda node: direct)
        self.futs = [self.client.call_async("one_at_a_time", "until_cancelled", gate, ns, timeout=60)]
        self.futs += [self.client.call_async("one_at_a_time", "work", i, timeout=60) for i in range(queued)]
        return len(self.futs)


def test_a_dead_owner_is_found_and_a_live_one_is_not(ray_session):
    doomed, kept = Owner.remote(), Owner.remote()
    pids = ray.get([doomed.pid.remote(), kept.pid.remote()], timeout=60)
    callers = RemoteCallers()
    names = [direct_caller_name(pid, ELSEWHERE, "t") for pid in pids]
    for name, owner in zip(names, (doomed, kept), strict=True):
        callers.remember(name, ray.get(owner.life.remote(), timeout=60)[0])
    try:
        assert callers.alive(names[0]) and callers.alive(names[1])
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: not callers.alive(names[0]), 30, "Ray to say the owner died")
        assert callers.known_dead(names[0]) and not callers.known_dead(names[1])
        assert callers.alive(names[1])  # asked as often, never taken for dead
        assert callers.alive("rep.1.not-a-direct-caller")
    finally:
        callers.close()
        ray.kill(kept)


def test_a_caller_on_another_host_that_dies_has_its_running_call_cancelled(bus):
    OneAtATime.deploy(bus=bus)
    ns = bus_namespace(bus)
    gate = SageQueue("remote-gate", 4096, namespace=ns)
    caller = Owner.remote()
    try:
        pid = ray.get(caller.pid.remote(), timeout=60)
        assert ray.get(caller.start.remote(bus, gate.name, ns, 20), timeout=60) == 21
        assert gate.get(timeout=30) == "started"
        os.kill(pid, signal.SIGKILL)
        with FunctionClient(bus=bus) as c:
            wait_for(lambda: c.call("one_at_a_time", "ran_so_far") == [-2], 30, "the running call to be told")
            assert c.call("one_at_a_time", "ran_so_far") == [-2]  # none of the queued 20 ran
    finally:
        ray.kill(caller)
        gate.destroy()


@ray.remote(num_cpus=0.05)
class Consumer:
    def pid(self) -> int:
        return os.getpid()

    def open(self, bus: str, ns: str) -> int:
        """Opens a stream over Ray as if from another host, and keeps it."""
        shm._HOST_ID = ELSEWHERE
        direct = DirectTransport(ns)
        self.client = FunctionClient(bus=bus, transport=lambda node: direct)
        self.stream = self.client.stream("gen", "count", 1_000_000)
        return next(self.stream)


def test_a_consumer_on_another_host_that_dies_has_its_stream_closed(bus):
    Gen.deploy(bus=bus)
    consumer = Consumer.remote()
    try:
        pid = ray.get(consumer.pid.remote(), timeout=60)
        assert ray.get(consumer.open.remote(bus, bus_namespace(bus)), timeout=60) == 0
        with FunctionClient(bus=bus) as client:
            assert client.call("gen", "state")["finally_ran"] == 0
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            wait_for(lambda: client.call("gen", "state")["finally_ran"] == 1, 30, "the replica closing it")
            assert time.monotonic() - t0 < 10 < IDLE_SECONDS  # Ray said the consumer died: not the idle reap
    finally:
        ray.kill(consumer)
