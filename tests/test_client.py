"""SAGE's service-call surface: call_service[...] / call_service(...) and their
async twins, from a driver, a plain class, and inside another service's handler."""

from __future__ import annotations

import concurrent.futures
import os
import time

import pytest
import ray

from sage_ray_comm import (
    BaseService,
    ServiceCallMixin,
    _core,
    call_service,
    call_service_async,
    sage_service,
    service_function,
)


@sage_service(name="cache")
class Cache(BaseService):
    def initialize(self):
        self.d = {"a": 1, "b": 2}

    @service_function
    def get(self, key):
        return self.d.get(key)

    @service_function
    def process(self, key):
        return self.d.get(key, 0) * 100


@sage_service(name="frontend", max_concurrency=4)
class Frontend(BaseService):
    @service_function
    def lookup(self, key):
        # A service calling a service from its handler, in each of SAGE's forms.
        sync = self.call_service["cache"].get(key)
        fut = self.call_service_async["cache"].get(key)
        functional = call_service("cache", key, bus=self.bus_name, timeout=10)
        functional_async = call_service_async("cache", key, method="get", bus=self.bus_name)
        return sync, fut.result(timeout=10), functional, functional_async.result(timeout=10)


def test_both_forms_from_a_service_handler(bus):
    Cache.deploy(bus=bus)
    Frontend.deploy(bus=bus)
    assert call_service("frontend", "a", method="lookup", bus=bus) == (1, 1, 100, 1)
    futs = [call_service_async("frontend", k, method="lookup", bus=bus) for k in "ab" * 10]
    assert all(isinstance(f, concurrent.futures.Future) for f in futs)
    assert [f.result(timeout=60) for f in futs] == [(1, 1, 100, 1), (2, 2, 200, 2)] * 10


@pytest.mark.kills
def test_mixin_on_a_plain_class_and_a_ray_actor(bus):
    Cache.deploy(bus=bus)

    class Operator(ServiceCallMixin):
        sage_bus = bus

        def run(self, key):
            return self.call_service["cache"].get(key), self.call_service["cache"](key, method="get")

    assert Operator().run("b") == (2, 2)

    @ray.remote(num_cpus=0.1)
    class ActorOperator(ServiceCallMixin):
        def __init__(self, bus):
            self.sage_bus = bus

        def run(self, key):
            return self.call_service_async["cache"].process(key).result(timeout=10), os.getpid()

    a = ActorOperator.remote(bus)
    value, pid = ray.get(a.run.remote("a"), timeout=60)
    assert value == 100
    ray.kill(a)  # killed without closing its client: bus shutdown's gc removes its rings
    deadline = time.monotonic() + 30
    while _core.process_alive(pid, 0):
        assert time.monotonic() < deadline
        time.sleep(0.05)
