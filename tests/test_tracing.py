"""Trace context that follows a request (W3C traceparent in the header) and
the spans each process records, read back from an in-memory exporter in the
driver and in every replica: real Ray, one process per service."""

from __future__ import annotations

import queue

import _tracing
import pytest
from opentelemetry import trace as otel_trace

from sage_ray_comm import BaseService, FunctionClient, context, sage_service, service_function, subscribe, tracing
from sage_ray_comm._wire import Request
from sage_ray_comm.ray_transport import DirectTransport, RayTransport
from sage_ray_comm.router import bus_namespace
from sage_ray_comm.testing import FakeRouter, FakeTransport

TRACEPARENT_LEN = 55  # "00-" + 32 hex + "-" + 16 hex + "-" + 2 hex


class _Traced(BaseService):
    """The test hook: an in-memory exporter in the replica, read back by a call."""

    @service_function
    def install(self, how: str) -> None:
        _tracing.install(how)

    @service_function
    def spans(self, count: int) -> list:
        return _tracing.collect(count)


class _Hop(_Traced):
    """Calls the next service of ``path`` (if any) and adds one."""

    @service_function
    def hop(self, path: list, x: int) -> int:
        if not path:
            return x + 1
        return self.call_function(path[0], "hop", path[1:], x) + 1

    @service_function
    def fail(self) -> None:
        raise ValueError("the leaf failed")

    @service_function
    def relay_fail(self, target: str) -> None:
        self.call_function(target, "fail")


@sage_service(name="tr_a", replicas=1, num_cpus=0.1)
class HopA(_Hop):
    @service_function
    async def hop(self, path: list, x: int) -> int:  # an async handler: the context follows the task
        if not path:
            return x + 1
        return await self.client.acall(path[0], "hop", path[1:], x) + 1


@sage_service(name="tr_b", replicas=1, num_cpus=0.1)
class HopB(_Hop):
    pass


@sage_service(name="tr_c", replicas=1, num_cpus=0.1)
class HopC(_Hop):
    pass


@sage_service(name="tr_sub1", replicas=1, num_cpus=0.1)
class Sub1(_Traced):
    @subscribe("tr.frames.*")
    def on_frame(self, payload) -> None:
        pass


@sage_service(name="tr_sub2", replicas=1, num_cpus=0.1)
class Sub2(_Traced):
    @subscribe("tr.frames.*")
    def on_frame(self, payload) -> None:
        pass


@pytest.fixture
def driver_spans():
    """An in-memory exporter for this library's spans in the test process
    (through tracing.configure: the global provider stays unset for the
    other tests)."""
    _tracing.clear()
    yield _tracing.install("sage")
    tracing.configure(None)
    _tracing.clear()


@pytest.fixture
def chain(bus, driver_spans):
    handles = {name: cls.deploy(bus=bus) for name, cls in (("tr_a", HopA), ("tr_b", HopB), ("tr_c", HopC))}
    with FunctionClient(bus=bus) as c:
        yield c, handles


def _one(spans: list, kind: str, name: str) -> dict:
    found = [s for s in spans if s["kind"] == kind and s["name"] == name]
    assert len(found) == 1, f"want one {kind} span {name!r}; got {[(s['kind'], s['name']) for s in spans]}"
    return found[0]


def test_a_call_chain_is_one_trace_across_processes(chain):
    c, handles = chain
    c.call("tr_a", "install", "global")  # OpenTelemetry's own global provider
    c.call("tr_b", "install", "sage")
    c.call("tr_c", "install", "global")
    installs = _tracing.collect(3)
    _tracing.clear()  # the install calls' own spans

    assert c.call("tr_a", "hop", ["tr_b", "tr_c"], 0) == 3

    mine = _tracing.collect(1)
    a, b, cc = c.call("tr_a", "spans", 2), c.call("tr_b", "spans", 2), c.call("tr_c", "spans", 1)
    assert [s["kind"] for s in installs] == ["CLIENT"] * 3
    client = _one(mine, "CLIENT", "tr_a/hop")
    a_server, a_client = _one(a, "SERVER", "tr_a/hop"), _one(a, "CLIENT", "tr_b/hop")
    b_server, b_client = _one(b, "SERVER", "tr_b/hop"), _one(b, "CLIENT", "tr_c/hop")
    c_server = _one(cc, "SERVER", "tr_c/hop")
    # One trace, parent links across four processes: driver -> A -> B -> C.
    chain_spans = [client, a_server, a_client, b_server, b_client, c_server]
    assert {s["trace_id"] for s in chain_spans} == {client["trace_id"]}
    assert client["parent"] is None
    assert a_server["parent"] == client["span_id"]
    assert a_client["parent"] == a_server["span_id"]  # the async handler's call is its child
    assert b_server["parent"] == a_client["span_id"]
    assert b_client["parent"] == b_server["span_id"]
    assert c_server["parent"] == b_client["span_id"]
    # RPC conventions, and where the call went.
    for s, service, replica in (
        (a_server, "tr_a", handles["tr_a"].instances[0].instance_id),
        (c_server, "tr_c", handles["tr_c"].instances[0].instance_id),
    ):
        at = s["attributes"]
        assert at["rpc.system.name"] == "sage_ray_comm" and at["rpc.method"] == f"{service}/hop"
        assert at["sage.replica"] == replica and at["sage.transport"] == "shm"
        assert at["sage.request.size"] > 52 and at["rpc.response.status_code"] == "ok"
        assert s["status"] == "UNSET"
    at = client["attributes"]
    assert at["sage.replica"] == handles["tr_a"].instances[0].instance_id and at["sage.transport"] == "shm"
    assert at["rpc.response.status_code"] == "ok"


def test_a_process_without_a_provider_passes_the_trace_on(chain):
    c, _ = chain
    c.call("tr_a", "install", "sage")
    c.call("tr_b", "install", "none")  # records nothing, but must not break the trace
    c.call("tr_c", "install", "sage")
    _tracing.clear()

    assert c.call("tr_a", "hop", ["tr_b", "tr_c"], 0) == 3

    a, cc = c.call("tr_a", "spans", 2), c.call("tr_c", "spans", 1)
    a_client, c_server = _one(a, "CLIENT", "tr_b/hop"), _one(cc, "SERVER", "tr_c/hop")
    assert c_server["trace_id"] == a_client["trace_id"]
    assert c_server["parent"] == a_client["span_id"]  # B handed on the context it was given


def test_a_failure_is_recorded_on_both_sides(chain):
    c, _ = chain
    c.call("tr_a", "install", "sage")
    c.call("tr_b", "install", "sage")
    _tracing.clear()
    with pytest.raises(ValueError, match="the leaf failed"):
        c.call("tr_a", "relay_fail", "tr_b")
    b_server = _one(c.call("tr_b", "spans", 1), "SERVER", "tr_b/fail")
    assert b_server["status"] == "ERROR" and "the leaf failed" in b_server["description"]
    assert b_server["attributes"]["error.type"] == "ValueError"
    client = _one(_tracing.collect(1), "CLIENT", "tr_a/relay_fail")
    assert client["status"] == "ERROR" and client["attributes"]["error.type"].startswith("RemoteError")


@pytest.mark.parametrize("path", ["gateway", "direct"])
def test_a_call_over_ray_carries_the_trace(chain, bus, path):
    """Through the node's gateway (which hands the frame on over shared
    memory), and straight to the replica's actor (served from its Ray call)."""
    c, _ = chain
    c.call("tr_a", "install", "sage")
    _tracing.clear()
    cls = RayTransport if path == "gateway" else DirectTransport
    with FunctionClient(bus=bus, transport=lambda node: cls(bus_namespace(bus))) as far:
        assert far.call("tr_a", "hop", [], 1) == 2
        assert far.stats()["ray"] == 1
    client = _one(_tracing.collect(1), "CLIENT", "tr_a/hop")
    assert client["attributes"]["sage.transport"] == "ray"
    server = _one(c.call("tr_a", "spans", 1), "SERVER", "tr_a/hop")
    assert (server["trace_id"], server["parent"]) == (client["trace_id"], client["span_id"])
    assert server["attributes"]["sage.transport"] == ("shm" if path == "gateway" else "ray")


def test_a_send_is_a_producer_and_consumer_pair(chain):
    c, _ = chain
    c.call("tr_b", "install", "sage")
    _tracing.clear()
    c.send("tr_b", "hop", [], 1)
    consumer = _one(c.call("tr_b", "spans", 1), "CONSUMER", "process tr_b/hop")
    producer = _one(_tracing.collect(1), "PRODUCER", "send tr_b/hop")
    assert consumer["parent"] == producer["span_id"]
    assert consumer["attributes"]["messaging.operation.type"] == "process"


def test_a_publish_reaches_two_subscribers_with_linked_spans(bus, driver_spans):
    for cls in (Sub1, Sub2):
        cls.deploy(bus=bus)
    with FunctionClient(bus=bus) as c:
        c.call("tr_sub1", "install", "sage")
        c.call("tr_sub2", "install", "global")
        got: queue.Queue = queue.Queue()
        c.subscribe("tr.frames.*", got.put)  # a third, in this process (its inbox thread)
        c.wait_for_subscribers("tr.frames.cam0", 3)
        _tracing.clear()
        assert c.publish("tr.frames.cam0", b"frame") == 3
        assert got.get(timeout=10) == b"frame"
        mine = _tracing.collect(2)
        producer = _one(mine, "PRODUCER", "publish tr.frames.cam0")
        consumers = [_one(c.call(s, "spans", 1), "CONSUMER", "process tr.frames.cam0") for s in ("tr_sub1", "tr_sub2")]
        consumers.append(_one(mine, "CONSUMER", "process tr.frames.cam0"))
    at = producer["attributes"]
    assert at["messaging.system"] == "sage_ray_comm" and at["messaging.destination.name"] == "tr.frames.cam0"
    assert at["sage.delivered"] == 3
    for s in consumers:
        assert s["links"] == [(producer["trace_id"], producer["span_id"])]
        assert s["parent"] == producer["span_id"] and s["trace_id"] == producer["trace_id"]
        assert s["attributes"]["messaging.message.body.size"] > 0
    assert {s["attributes"].get("messaging.consumer.group.name") for s in consumers[:2]} == {"tr_sub1", "tr_sub2"}


# ------------------------------------------------------------- no Ray at all
def _fake_client():
    seen: list[Request] = []

    def handler(inst, req):
        seen.append(req)
        return 1

    router = FakeRouter("b").add_replica("svc", "svc-1", functions=["f"])
    return FunctionClient(bus="b", transport=lambda node: FakeTransport(handler=handler), router=router), seen


def test_the_request_carries_the_client_spans_traceparent(driver_spans):
    client, seen = _fake_client()
    client.call("svc", "f")
    (span,) = _tracing.collect(1)
    carrier = tracing.decode_carrier(seen[0].trace)
    _version, trace_id, span_id, flags = carrier["traceparent"].split("-")
    assert (int(trace_id, 16), int(span_id, 16)) == (span["trace_id"], span["span_id"])
    assert int(flags, 16) & 1  # sampled
    assert len(carrier["traceparent"]) == TRACEPARENT_LEN


def test_the_callers_current_span_is_the_parent(driver_spans):
    client, _ = _fake_client()
    with driver_spans.get_tracer("user").start_as_current_span("pipeline-step") as outer:  # the user's own span
        client.call("svc", "f")
    call = _one(_tracing.collect(2), "CLIENT", "svc/f")
    assert call["parent"] == outer.get_span_context().span_id


def test_no_provider_means_no_span_and_no_trace_unless_one_is_passed_on():
    tracing.configure(None)
    assert not tracing.recording()
    client, seen = _fake_client()
    client.call("svc", "f")
    assert seen[-1].trace is None
    token = context.enter(context.Handling("a", "g", None, "traceparent:00-" + "a" * 32 + "-" + "b" * 16 + "-01"))
    try:
        client.call("svc", "f")  # inside a handler of a traced request: its context goes on as is
    finally:
        context.leave(token)
    assert seen[-1].trace == "traceparent:00-" + "a" * 32 + "-" + "b" * 16 + "-01"


def test_a_no_op_provider_leaves_calls_working():
    """A provider whose spans do not record (OTEL_SDK_DISABLED, NoOpTracerProvider)."""
    client, seen = _fake_client()
    tracing.configure(otel_trace.NoOpTracerProvider())
    try:
        assert tracing.recording()
        assert client.call("svc", "f") == 1 and client.call_async("svc", "f").result(timeout=5) == 1
        client.send("svc", "f")
        assert seen[-1].trace is None  # no valid span context: nothing to propagate
    finally:
        tracing.configure(None)


def test_the_switch_turns_it_all_off(driver_spans):
    client, seen = _fake_client()
    tracing.set_enabled(False)
    try:
        client.call("svc", "f")
        assert seen[-1].trace is None and _tracing.collect(0) == []
    finally:
        tracing.set_enabled(True)
    client.call("svc", "f")
    assert seen[-1].trace is not None and len(_tracing.collect(1)) == 1


def test_carrier_round_trip_skips_malformed_lines():
    text = tracing.encode_carrier({"traceparent": "00-x", "tracestate": "a=1,b=2:3"})
    assert tracing.decode_carrier(text + "\nnot a header\n") == {"traceparent": "00-x", "tracestate": "a=1,b=2:3"}
    assert tracing.encode_carrier({}) is None and tracing.decode_carrier(None) == {}
