"""The replica runtime on its own: a real request ring and real reply rings
in shared memory, a FakeRouter for the registry, no Ray. The same runtime is
tested through deployed services (test_service.py, test_faults.py)."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from sage_ray_comm import BaseService, _wire, service_function, shm
from sage_ray_comm._replica import Runtime
from sage_ray_comm._wire import (
    ERR_FUNCTION,
    ERR_PROTOCOL,
    ERR_VALIDATION,
    OP_CALL,
    OP_SEND,
    PROTOCOL_VERSION,
    ST_ERROR,
    ST_OK,
    ErrorInfo,
    Request,
)
from sage_ray_comm.names import reply_ring_name
from sage_ray_comm.queue import SageQueue
from sage_ray_comm.router import bus_namespace
from sage_ray_comm.shm_transport import put_request
from sage_ray_comm.testing import FakeRouter


class Doubler(BaseService):
    def __init__(self):
        super().__init__("doubler")
        self.sent = []
        self.got_send = threading.Event()

    @service_function
    def double(self, x: int) -> int:
        return 2 * x

    @service_function
    def note(self, x):
        self.sent.append(x)
        self.got_send.set()


@pytest.fixture
def replica():
    bus = f"unit-{uuid.uuid4().hex[:8]}"  # its own segment namespace
    ns = bus_namespace(bus)
    router = FakeRouter(bus)
    svc = Doubler()
    ring = SageQueue(f"req.doubler.{svc.service_id}", 1 << 20, auto_cleanup=True, namespace=ns)
    rt = Runtime(svc, bus, router, ring, node_id="node-a", alive=lambda: True)
    rt.start()
    reply = SageQueue(reply_ring_name(os.getpid(), uuid.uuid4().hex[:8]), 1 << 20, auto_cleanup=True, namespace=ns)
    yield rt, router, ring, reply, svc
    rt.stop()
    reply.destroy()
    assert not shm.list_segments(ns), "the runtime left segments"


def _call(ring, reply, fn, *args, cid=1):
    put_request(ring, Request(OP_CALL, cid, fn, args, None, reply.name, None, "unit-test", None, "doubler"), 5)
    return reply.get(timeout=10)


def test_registers_with_its_router_and_answers_calls(replica):
    rt, router, ring, reply, _ = replica
    snap = router.snapshot()
    inst = snap["services"]["doubler"][rt.instance_id]
    assert inst.node_id == "node-a" and set(inst.functions) == {"double", "note"}
    assert inst.request_queue == ring.name
    assert _call(ring, reply, "double", 21, cid=7) == (7, ST_OK, 42)


def test_typed_errors_come_back_with_the_call_id(replica):
    _, _, ring, reply, _ = replica
    cid, status, info = _call(ring, reply, "triple", 1, cid=3)
    assert (cid, status, ErrorInfo(*info).code) == (3, ST_ERROR, ERR_FUNCTION)
    assert "double" in ErrorInfo(*info).message
    cid, status, info = _call(ring, reply, "double", "not a number", cid=4)
    assert (cid, status, ErrorInfo(*info).code) == (4, ST_ERROR, ERR_VALIDATION)


def test_a_request_on_another_protocol_version_is_answered_not_run(replica, monkeypatch):
    rt, _, ring, reply, _ = replica
    monkeypatch.setattr(_wire, "PROTOCOL_VERSION", PROTOCOL_VERSION + 3)
    put_request(ring, Request(OP_CALL, 9, "double", (1,), None, reply.name, None, None, None, "doubler"), 5)
    monkeypatch.setattr(_wire, "PROTOCOL_VERSION", PROTOCOL_VERSION)
    cid, status, info = reply.get(timeout=10)
    info = ErrorInfo(*info)
    assert (cid, status, info.code, info.extra) == (9, ST_ERROR, ERR_PROTOCOL, (PROTOCOL_VERSION + 3, PROTOCOL_VERSION))
    assert rt.stats["calls"] == 0


def test_sends_run_without_a_reply(replica):
    _, _, ring, reply, svc = replica
    put_request(ring, Request(OP_SEND, 0, "note", ("hello",), None, None, None, None, None, "doubler"), 5)
    assert svc.got_send.wait(10)
    assert svc.sent == ["hello"] and reply.qsize() == 0


def test_stop_deregisters_and_removes_the_request_ring(replica):
    rt, router, ring, _, _ = replica
    name = ring.shm_name
    rt.stop()
    assert rt.instance_id not in router.snapshot()["services"].get("doubler", {})
    assert not os.path.exists(f"/dev/shm/{name}")
