"""The wire module: request frames, the versioned header, error codes, names.

Fuzzing is of pure functions; the protocol-version check is also tested
against a real replica, on the shared-memory path and on the Ray path.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_ray_comm import (
    BaseService,
    DeserializationError,
    FunctionClient,
    ProtocolMismatch,
    _wire,
    sage_service,
    service_function,
)
from sage_ray_comm._wire import (
    BESIDE_MIN_BYTES,
    ERR_PROTOCOL,
    KIND_REQ,
    KIND_REQ_OOB,
    OP_CALL,
    PROTOCOL_VERSION,
    BadRequest,
    Reply,
    Request,
    decode_header,
    decode_request,
    direct_payload,
    encode_request,
    frame_bytes,
    frame_kind,
    read_direct_reply,
)
from sage_ray_comm.completion import outcome
from sage_ray_comm.names import reply_ring_name, reply_ring_pid
from sage_ray_comm.router import ROUTER_NAMESPACE


def _frame_bytes(req: Request) -> tuple[bytes, int]:
    parts, kind = encode_request(req, "test")
    return b"".join(bytes(memoryview(p)) for p in parts), kind


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([0, 1, 2, 3, KIND_REQ, KIND_REQ_OOB, 77]))
def test_request_decoder_survives_random_frames(data, kind):
    try:
        decode_request(data, kind)
    except (ValueError, BadRequest):
        pass  # the only two outcomes allowed besides success


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**63), st.text(max_size=40), st.text(max_size=40), st.binary(max_size=200), st.text(max_size=80))
def test_a_readable_header_with_a_bad_body_names_the_call(cid, reply_to, fn, junk, trace):
    req = Request(1, cid, fn, (1,), None, reply_to or None, None, None, None, "svc", trace or None)
    parts, kind = encode_request(req, "fuzz")
    good = b"".join(bytes(memoryview(p)) for p in parts)
    assert decode_request(good, kind) == req
    head_len = len(bytes(memoryview(parts[0])))
    try:
        decode_request(good[:head_len] + junk, kind)
    except BadRequest as e:
        assert (e.cid, e.reply_to, e.function) == (cid, reply_to or None, fn)
        assert e.header.trace == (trace or None)


def test_a_frame_over_ray_says_its_kind_in_its_header():
    np = pytest.importorskip("numpy")
    plain = Request(OP_CALL, 1, "f", (1,), None, None, None, None, None, "s")
    oob = plain._replace(args=(np.ones(4096),))
    for req, want in ((plain, KIND_REQ), (oob, KIND_REQ_OOB)):
        data, kind = _frame_bytes(req)
        assert kind == want and frame_kind(data) == want
        assert decode_request(data, frame_kind(data)).function == "f"


def test_trace_context_travels_in_the_header_readable_without_unpickling():
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    trace = f"traceparent:{parent}\ntracestate:vendor=a=b,other=c"
    req = Request(OP_CALL, 7, "add", (1, 2), None, "rep.1.x", None, None, None, "calc", trace)
    data, kind = _frame_bytes(req)
    _, body_at = decode_header(data, kind)
    header, _ = decode_header(data[:body_at] + b"\xff" * 64, kind)  # the body ruined
    assert header.trace == trace
    assert decode_request(data, kind).trace == trace


def test_header_carries_the_deadline_and_a_version_readable_without_unpickling():
    deadline = time.time() + 12.5
    req = Request(OP_CALL, 7, "add", (1, 2), None, "rep.1.x", deadline, None, None, "calc")
    data, kind = _frame_bytes(req)
    header, body_at = decode_header(data, kind)
    assert header.version == PROTOCOL_VERSION and header.cid == 7 and header.function == "add"
    assert header.reply_to == "rep.1.x" and header.deadline == deadline
    assert (header.cancel_id, header.stream_id, header.credit, header.trace) == (0, 0, 0, None)
    assert body_at % 16 == 0 and body_at < len(data)
    # The header alone decodes even when the body is garbage.
    assert decode_header(data[:body_at] + b"\xff" * 8, kind)[0] == header


def test_another_protocol_version_is_a_bad_request_naming_both(monkeypatch):
    monkeypatch.setattr(_wire, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    data, kind = _frame_bytes(Request(OP_CALL, 3, "f", (), None, "rep.1.x", None, None, None, "s"))
    monkeypatch.setattr(_wire, "PROTOCOL_VERSION", PROTOCOL_VERSION)
    with pytest.raises(BadRequest) as ei:
        decode_request(data, kind)
    e = ei.value
    assert e.code == ERR_PROTOCOL and e.cid == 3 and e.reply_to == "rep.1.x"
    assert isinstance(e.error, ProtocolMismatch)
    assert str(PROTOCOL_VERSION + 1) in str(e.error) and str(PROTOCOL_VERSION) in str(e.error)


def test_reply_ring_names_carry_the_owner_pid():
    assert reply_ring_pid(reply_ring_name(4242, "abc")) == 4242
    assert reply_ring_pid("req.svc.1") is None and reply_ring_pid("rep.notapid.x") is None


# ------------------------------------------------------- against a replica
@sage_service(name="wire_echo", replicas=1, num_cpus=0.1)
class WireEcho(BaseService):
    @service_function
    def echo(self, x):
        return x


def test_a_caller_on_another_protocol_version_gets_protocol_mismatch(bus, monkeypatch):
    WireEcho.deploy(bus=bus)
    with FunctionClient(bus=bus) as client:
        assert client.call("wire_echo", "echo", 1) == 1
        monkeypatch.setattr(_wire, "PROTOCOL_VERSION", PROTOCOL_VERSION + 7)
        t0 = time.monotonic()
        with pytest.raises(ProtocolMismatch) as ei:
            client.call("wire_echo", "echo", 2, timeout=10)
        assert time.monotonic() - t0 < 5, "the replica answers at once; no timeout"
        assert ei.value.caller_version == PROTOCOL_VERSION + 7
        assert ei.value.replica_version == PROTOCOL_VERSION
        msg = str(ei.value)
        assert "wire_echo.echo" in msg and str(PROTOCOL_VERSION + 7) in msg and str(PROTOCOL_VERSION) in msg
        with pytest.raises(ProtocolMismatch):
            client.call_async("wire_echo", "echo", 3, timeout=10).result(timeout=15)
        monkeypatch.setattr(_wire, "PROTOCOL_VERSION", PROTOCOL_VERSION)
        assert client.call("wire_echo", "echo", 4) == 4  # the replica kept serving


def test_the_ray_path_checks_the_same_header(bus, monkeypatch):
    handle = WireEcho.deploy(bus=bus)
    actor = ray.get_actor(handle.instances[0].actor_name, namespace=ROUTER_NAMESPACE)
    req = Request(OP_CALL, 0, "echo", (5,), None, None, None, None, None, "wire_echo")
    data, kind = _frame_bytes(req)
    assert frame_kind(data) == kind
    assert outcome(read_direct_reply(ray.get(actor.handle.remote(data), timeout=30)), "wire_echo", "echo") == 5
    monkeypatch.setattr(_wire, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    data, kind = _frame_bytes(req)
    rep = read_direct_reply(ray.get(actor.handle.remote(data), timeout=30))
    with pytest.raises(ProtocolMismatch) as ei:
        outcome(rep, "wire_echo", "echo")
    assert (ei.value.caller_version, ei.value.replica_version) == (PROTOCOL_VERSION + 1, PROTOCOL_VERSION)


def test_large_buffers_travel_beside_the_frame_and_come_back_in_place():
    small = Request(OP_CALL, 3, "f", (b"x" * 100,), {"k": 1}, None, None, None, None, "svc")
    frame, n = direct_payload(small)
    assert n == len(frame) and decode_request(frame, frame_kind(frame)).args == (b"x" * 100,)
    big = b"y" * BESIDE_MIN_BYTES
    for args, kwargs in (((big, 1), None), ((1,), {"data": big}), ((np.zeros(BESIDE_MIN_BYTES, np.uint8),), None)):
        req = small._replace(args=args, kwargs=kwargs)
        (frame, a, k), n = direct_payload(req)
        assert len(frame) < 1024, "a large argument is not pickled into the frame"
        assert a is args and k is kwargs and n >= BESIDE_MIN_BYTES
        got = decode_request(frame, frame_kind(frame), (a, k))
        assert got.args is args and got.kwargs is kwargs and got.cid == 3 and got.function == "f"
        # The flag and what came beside must agree: a typed, answerable error otherwise.
        with pytest.raises(BadRequest, match="disagree"):
            decode_request(frame, frame_kind(frame))
    with pytest.raises(BadRequest, match="disagree"):
        decode_request(frame_bytes(small), KIND_REQ, ((1,), None))


def test_the_ray_path_takes_arguments_sent_beside_the_frame(bus):
    from sage_ray_comm.ray_transport import DirectTransport
    from sage_ray_comm.router import bus_namespace

    WireEcho.deploy(bus=bus)
    direct = DirectTransport(bus_namespace(bus))
    with FunctionClient(bus=bus, transport=lambda node: direct) as client:
        data = bytes(range(256)) * 4096  # 1 MiB
        assert client.call("wire_echo", "echo", data) == data
        arr = np.arange(1 << 18, dtype=np.float32)
        back = client.call("wire_echo", "echo", x=arr)
        assert np.array_equal(back, arr)
        futs = [client.call_async("wire_echo", "echo", data[: BESIDE_MIN_BYTES + i]) for i in range(40)]
        assert [len(f.result(timeout=60)) for f in futs] == [BESIDE_MIN_BYTES + i for i in range(40)]


def test_the_ray_path_returns_small_replies_pickled_and_large_ones_as_they_are(bus):
    handle = WireEcho.deploy(bus=bus)
    actor = ray.get_actor(handle.instances[0].actor_name, namespace=ROUTER_NAMESPACE)
    for value, travels_as in ((b"small", bytes), (b"x" * (BESIDE_MIN_BYTES), tuple)):
        data, _ = _frame_bytes(Request(OP_CALL, 0, "echo", (value,), None, None, None, None, None, "wire_echo"))
        out = ray.get(actor.handle.remote(data), timeout=30)
        assert isinstance(out, travels_as)
        assert outcome(read_direct_reply(out), "wire_echo", "echo") == value


def test_a_gateway_answers_a_caller_on_another_protocol_version(bus, monkeypatch):
    """Cross-node calls reach a node through its gateway with the same frame."""
    from sage_ray_comm.ray_transport import get_gateway
    from sage_ray_comm.router import bus_namespace

    handle = WireEcho.deploy(bus=bus)
    inst = handle.instances[0]
    gw = get_gateway(inst.node_id)
    req = Request(OP_CALL, 0, "echo", (6,), None, None, None, None, None, "wire_echo")
    data, _ = _frame_bytes(req)
    status, rep = ray.get(gw.call.remote(bus_namespace(bus), inst, data, 10.0), timeout=30)
    assert status == "ok" and outcome(Reply(*rep), "wire_echo", "echo") == 6
    monkeypatch.setattr(_wire, "PROTOCOL_VERSION", PROTOCOL_VERSION + 2)
    data, _kind = _frame_bytes(req)
    monkeypatch.setattr(_wire, "PROTOCOL_VERSION", PROTOCOL_VERSION)
    status, rep = ray.get(gw.call.remote(bus_namespace(bus), inst, data, 10.0), timeout=30)
    with pytest.raises(ProtocolMismatch) as ei:
        outcome(Reply(*rep), "wire_echo", "echo")
    assert ei.value.caller_version == PROTOCOL_VERSION + 2


def test_the_ray_path_answers_a_body_that_does_not_unpickle(bus):
    handle = WireEcho.deploy(bus=bus)
    actor = ray.get_actor(handle.instances[0].actor_name, namespace=ROUTER_NAMESPACE)
    data, kind = _frame_bytes(Request(OP_CALL, 0, "echo", (5,), None, None, None, None, None, "wire_echo"))
    header_end = decode_header(data, kind)[1]
    rep = read_direct_reply(ray.get(actor.handle.remote(data[:header_end] + b"\x80\x05garbage"), timeout=30))
    with pytest.raises(DeserializationError, match="echo"):
        outcome(rep, "wire_echo", "echo")
