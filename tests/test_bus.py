"""Buses are named and isolated: the same service name on two buses never mixes."""

from __future__ import annotations

import uuid

import pytest
from _wait import wait_for

from sage_ray_comm import BaseService, FunctionClient, ServiceNotFound, get_communication_bus, service_function


class Tagged(BaseService):
    def __init__(self, name, tag):
        super().__init__(name)
        self.tag = tag

    @service_function
    def tag_of(self):
        return self.tag


def test_get_communication_bus_honours_its_name(ray_session):
    a, b = (
        get_communication_bus("bus-a-" + uuid.uuid4().hex[:6]),
        get_communication_bus("bus-b-" + uuid.uuid4().hex[:6]),
    )
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


from sage_ray_comm import (  # noqa: E402
    CallTimeout,
    CommunicationPattern,
    DeliveryReceipt,
    InvalidCallArgument,
    Message,
    ValidationError,
    get_service_manager,
    sage_service,
)


@sage_service(name="kv", replicas=2)
class KV(BaseService):
    def initialize(self):
        self.data = {}

    @service_function
    def put(self, item):
        self.data[item[0]] = item[1]

    @service_function
    def get(self, key):
        return self.data.get(key)

    @service_function
    def size(self):
        return len(self.data)


def test_route_message_in_all_four_patterns(bus):
    import queue as _q

    h = KV.deploy(bus=bus)
    b = get_communication_bus(bus).start()
    target = h.instances[1].instance_id
    r = b.route_message(
        Message(receiver="kv", function="put", payload=("a", 1), headers={"instance": target}),
        CommunicationPattern.POINT_TO_POINT,
    )
    assert isinstance(r, DeliveryReceipt) and r.instances == [target] and r.delivered == 1
    # Sends are fire-and-forget: wait until the replica shows the write.
    wait_for(lambda: b.call("kv", "get", "a", instance=target) == 1)
    r = b.route_message(Message(receiver="kv", function="put", payload=("b", 2)), "load_balanced")
    assert r.pattern is CommunicationPattern.LOAD_BALANCED and r.instances[0] in {i.instance_id for i in h.instances}
    wait_for(lambda: b.call("kv", "get", "b", instance=r.instances[0]) == 2)
    # request-response, from a dict: the reply comes back
    assert b.route_message({"receiver": "kv", "function": "get", "payload": "missing"}) is None
    assert (
        b.route_message(
            {"receiver": "kv", "function": "get", "payload": "a", "headers": {"instance": target}},
            CommunicationPattern.POINT_TO_POINT,
        ).delivered
        == 1
    )
    got = _q.Queue()
    b.subscribe("kv.changed", got.put)
    r = b.route_message(
        Message(type="event", topic="kv.changed", payload={"k": "a"}), CommunicationPattern.PUBLISH_SUBSCRIBE
    )
    assert r.delivered == 1 and got.get(timeout=10) == {"k": "a"}


def test_route_message_bad_input_is_typed(bus):
    b = get_communication_bus(bus).start()
    with pytest.raises(ValidationError, match="type"):
        b.route_message({"type": "nonsense", "receiver": "kv", "function": "get"})
    with pytest.raises(InvalidCallArgument, match="needs a receiver"):
        b.route_message(Message(payload=1))
    with pytest.raises(InvalidCallArgument, match="unknown communication pattern"):
        b.route_message(Message(receiver="kv", function="get"), "carrier_pigeon")
    with pytest.raises(CallTimeout, match="expired"):
        b.route_message(Message(receiver="kv", function="get", deadline=1.0))
    with pytest.raises(ServiceNotFound):
        b.route_message(Message(receiver="nobody", function="f"))


def test_service_manager(bus):
    mgr = get_service_manager(bus)
    assert get_service_manager(bus) is mgr
    svc = Tagged("managed", "m")
    assert mgr.register_service(svc) == svc.service_id  # the original API returns the id
    handle = mgr.register_service(KV)
    assert mgr.list_services() == ["kv", "managed"]
    assert mgr.get_service("managed") is svc and mgr.get_service("kv") is handle
    stats = mgr.get_stats()
    assert stats["managed"]["running"] is True and len(stats["kv"]) == 2
    with pytest.raises(ServiceNotFound, match="holds: kv, managed"):
        mgr.get_service("nope")
    assert mgr.unregister_service("managed") and not svc.is_running
    mgr.stop_all()
    assert mgr.list_services() == []
    assert FunctionClient(bus=bus).list_services() == []
