"""Buses are named and isolated: the same service name on two buses never mixes."""

from __future__ import annotations

import uuid

import pytest

from sage_ray_comm import BaseService, FunctionClient, ServiceNotFound, get_communication_bus, service_function


class Tagged(BaseService):
    def __init__(self, name, tag):
        super().__init__(name)
        self.tag = tag

    @service_function
    def tag_of(self):
        return self.tag


def test_get_communication_bus_honours_its_name(ray_session):
    a, b = get_communication_bus("bus-a-" + uuid.uuid4().hex[:6]), get_communication_bus("bus-b-" + uuid.uuid4().hex[:6])
    assert a is not b and a.name != b.name
    assert get_communication_bus(a.name) is a


def test_same_service_name_on_two_buses_is_isolated(bus):
    other = bus + "-other"
    s1 = Tagged("worker", "one").start(bus=bus)
    s2 = Tagged("worker", "two").start(bus=other)
    c1, c2 = FunctionClient(bus=bus), FunctionClient(bus=other)
    try:
        assert {c1.call("worker", "tag_of") for _ in range(20)} == {"one"}
        assert {c2.call("worker", "tag_of") for _ in range(20)} == {"two"}
        assert s1._runtime.queue.shm_name != s2._runtime.queue.shm_name
    finally:
        s2.stop()
        c2.close()
        get_communication_bus(other).shutdown()
        s1.stop()
        c1.close()


def test_bus_services_view_and_idempotent_start(bus):
    b = get_communication_bus(bus)
    assert b.start() is b.start()
    svc = Tagged("viewed", "x").start(bus=bus)
    rows = b.services()
    assert [r["service"] for r in rows] == ["viewed"]
    row = rows[0]
    assert row["functions"] == ["tag_of"] and row["pid"] > 0 and row["instance"] == svc.service_id
    svc.stop()
    assert b.services() == []
    with pytest.raises(ServiceNotFound):
        b.call("viewed", "tag_of")
