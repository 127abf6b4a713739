"""The client's routing logic against the shipped fakes (sage_ray_comm.testing:
no Ray, no shared memory), as Ray Serve's router tests do: which replica and
which transport each call takes, retries, and how replies turn into values
and typed errors."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import pickle
import random

import pytest
from _wait import wait_for

from sage_ray_comm import (
    CallTimeout,
    FunctionClient,
    FunctionNotFound,
    RemoteError,
    ServiceNotFound,
    ServiceUnavailable,
    ValidationError,
)
from sage_ray_comm._wire import (
    ERR_REMOTE,
    ERR_VALIDATION,
    OP_CALL,
    OP_EVENT,
    ST_ERROR,
    ErrorInfo,
    Reply,
)
from sage_ray_comm.completion import outcome
from sage_ray_comm.router import FunctionInfo, InstanceInfo, Subscription
from sage_ray_comm.routing import pick_instance
from sage_ray_comm.testing import FakeRouter, FakeTransport


def inst(iid, node="local", service="calc", idempotent=False, policy="least_outstanding", timeout=7.0):
    return InstanceInfo(
        service=service,
        instance_id=iid,
        class_id="m:C",
        node_id=node,
        host_id="h",
        pid=1,
        pid_start=1,
        request_queue=f"req.{iid}",
        functions={"add": FunctionInfo("add", timeout, idempotent=idempotent), "get": FunctionInfo("get", None)},
        policy=policy,
    )


def _add(inst, req):
    return sum(req.args)


def make_client(instances, subs=(), policy=None, timeout=None):
    """A client on a FakeRouter holding ``instances`` and ``subs``, whose calls
    go to one FakeTransport for node "local" (this process's) and another for
    every other node."""
    router = FakeRouter("b")
    for i in instances:
        router.register(i)
    for sub in subs:
        router.subscribe(sub)
    shm_t, ray_t = FakeTransport("shm", handler=_add), FakeTransport("ray", handler=_add)
    c = FunctionClient(
        "tester",
        bus="b",
        policy=policy,
        timeout=timeout,
        transport=lambda node: shm_t if node == "local" else ray_t,
        router=router,
        node_id="local",
    )
    return c, shm_t, ray_t


# ---------------------------------------------------------------- policies
def test_round_robin_cycles_in_instance_order():
    pool = [inst("c"), inst("a"), inst("b")]
    rr = itertools.count()
    got = [pick_instance(pool, "round_robin", {}, "local", rr).instance_id for _ in range(6)]
    assert got == ["a", "b", "c", "a", "b", "c"]


def test_power_of_two_choices_prefers_the_less_loaded():
    pool = [inst("a"), inst("b")]
    out = {"a": 5, "b": 0}
    got = {
        pick_instance(pool, "least_outstanding", out, "local", itertools.count(), random.Random(i)).instance_id
        for i in range(50)
    }
    assert got == {"b"}


def test_power_of_two_choices_spreads_equal_load():
    pool = [inst(x) for x in "abcd"]
    rng = random.Random(7)
    counts = collections.Counter(
        pick_instance(pool, "least_outstanding", {}, "local", itertools.count(), rng).instance_id for _ in range(400)
    )
    assert set(counts) == set("abcd") and min(counts.values()) > 50


def test_same_node_replicas_are_preferred():
    pool = [inst("far1", node="other"), inst("near", node="local"), inst("far2", node="other")]
    for policy in ("round_robin", "least_outstanding"):
        got = {pick_instance(pool, policy, {}, "local", itertools.count()).instance_id for _ in range(20)}
        assert got == {"near"}


@pytest.mark.parametrize("policy", ["round_robin", "least_outstanding"])
def test_locality_follows_load(policy):
    """Same-node first while the local replica's queue stays within the
    threshold of the least loaded remote one; then calls spill over."""
    pool = [inst("far1", node="x"), inst("near", node="local"), inst("far2", node="y")]
    out: collections.Counter = collections.Counter()
    picks: list[str] = []
    rr = itertools.count()
    for _ in range(30):  # 30 calls in flight at once from this process
        i = pick_instance(pool, policy, out, "local", rr, random.Random(len(picks)), 4).instance_id
        out[i] += 1
        picks.append(i)
    assert picks[:5] == ["near"] * 5  # within the threshold: all local
    assert out["near"] - min(out["far1"], out["far2"]) <= 5  # never more than threshold + 1 ahead
    assert out["far1"] > 0 and out["far2"] > 0 and out["near"] > max(out["far1"], out["far2"])
    # As calls finish, the local replica takes them again.
    done = {"near": 0, "far1": out["far1"], "far2": out["far2"]}
    assert pick_instance(pool, policy, done, "local", itertools.count(), random.Random(0), 4).instance_id == "near"


def test_remote_replicas_are_used_when_no_local_one_exists():
    pool = [inst("far1", node="x"), inst("far2", node="y")]
    rr = itertools.count()
    got = {pick_instance(pool, "round_robin", {}, "local", rr).instance_id for _ in range(4)}
    assert got == {"far1", "far2"}


# ---------------------------------------------------------------- client
def test_calls_take_the_transport_of_the_replica_node():
    c, shm_t, ray_t = make_client([inst("near"), inst("far", node="other", service="remote")])
    assert c.call("calc", "add", 1, 2) == 3
    assert c.call("remote", "add", 3, 4) == 7
    assert [x[0] for x in shm_t.calls] == ["near"] and [x[0] for x in ray_t.calls] == ["far"]
    s = c.stats()
    assert (s["shm"], s["ray"], s["calls"]) == (1, 1, 2)


def test_round_robin_policy_spreads_client_calls():
    c, shm_t, _ = make_client([inst("a", policy="round_robin"), inst("b", policy="round_robin")])
    for _ in range(6):
        c.call("calc", "add", 1, 1)
    assert collections.Counter(x[0] for x in shm_t.calls) == {"a": 3, "b": 3}


def test_the_function_timeout_is_the_default_and_travels_as_a_deadline():
    c, shm_t, _ = make_client([inst("a", timeout=7.0)])
    c.call("calc", "add", 1, 1)
    _, req, t = shm_t.calls[-1]
    assert t == 7.0 and req.op == OP_CALL and req.deadline is not None and req.sender == "tester"
    c.call("calc", "add", 1, 1, timeout=0.5)
    assert shm_t.calls[-1][2] == 0.5


def test_functions_without_a_declared_timeout_use_the_client_default(monkeypatch):
    c, shm_t, _ = make_client([inst("a")], timeout=3.0)
    c.call("calc", "get", 1)
    assert shm_t.calls[-1][2] == 3.0
    monkeypatch.setenv("SAGE_COMM_TIMEOUT", "4.5")
    c2, shm2, _ = make_client([inst("a")])
    c2.call("calc", "get", 1)
    assert shm2.calls[-1][2] == 4.5


def test_unknown_service_and_function_name_what_exists():
    c, _, _ = make_client([inst("a")])
    with pytest.raises(ServiceNotFound, match=r"no service 'nope' on bus 'b'; known services: calc"):
        c.call("nope", "add")
    with pytest.raises(FunctionNotFound, match=r"no function 'mul'; it has: add, get"):
        c.call("calc", "mul")


def test_idempotent_calls_retry_on_another_replica():
    c, shm_t, _ = make_client([inst("a", idempotent=True), inst("b", idempotent=True)], policy="round_robin")
    shm_t.dead.add("a")
    assert [c.call("calc", "add", 2, 2) for _ in range(3)] == [4, 4, 4]
    assert c.stats()["retries"] == 1, "only the first call met the dead replica; then it was avoided"
    assert "a" in c.endpoint.dead


def test_non_idempotent_calls_surface_the_death():
    c, shm_t, _ = make_client([inst("a"), inst("b")], policy="round_robin")
    shm_t.dead.add("a")
    with pytest.raises(ServiceUnavailable, match="replica a of service 'calc' is dead"):
        c.call("calc", "add", 1, 1)
    # the dead replica is not chosen again until the registry drops it
    assert c.call("calc", "add", 1, 1) == 2


def test_all_replicas_dead_is_service_unavailable():
    """Every replica seen dead here, and the router never says more: the
    call waits for its word, within its timeout, then fails typed."""
    c, _, _ = make_client([inst("a")])
    c.endpoint.mark_dead("a")
    with pytest.raises(ServiceUnavailable, match=r"none came back within 0\.3 s"):
        c.call("calc", "add", 1, 1, timeout=0.3)
    assert c.stats()["restart_waits"] == 1


def _call_waiting_for_the_routers_word(pool, timeout: float):
    """A client whose only replica, "a", this process saw die while the
    router still lists it, and a call (run in ``pool``) now waiting for the
    router's word: (the router, the call's future)."""
    c, _, _ = make_client([inst("a")])
    c.endpoint.mark_dead("a")
    fut = pool.submit(c.call, "calc", "add", 2, 3, timeout=timeout)
    wait_for(lambda: c.stats()["restart_waits"] == 1 or fut.done(), 10, "the call waiting")
    assert not fut.done(), fut.exception()
    return c.endpoint.router, fut


def test_a_call_that_saw_every_replica_die_waits_for_the_routers_word():
    """This process saw the replica die before the router did (its liveness
    check can beat the router's): the call waits for the registry's news
    instead of failing. Ray restarting the replica: the call gets it."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        router, fut = _call_waiting_for_the_routers_word(pool, timeout=30)
        router.register(inst("a-again"))  # restarted: a new instance
        assert fut.result(timeout=10) == 5


def test_a_call_that_saw_every_replica_die_fails_once_the_router_drops_them():
    """The router's word is "dead for good": the call fails at once, long
    before its timeout."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        router, fut = _call_waiting_for_the_routers_word(pool, timeout=60)
        router.deregister("a")
        with pytest.raises(ServiceNotFound):
            fut.result(timeout=10)


def test_instance_targets_one_replica_and_unknown_instance_is_typed():
    c, shm_t, _ = make_client([inst("a"), inst("b")])
    for _ in range(4):
        assert c.send("calc", "add", 1, instance="b") == "b"
    assert {x[0] for x in shm_t.calls} == {"b"}
    with pytest.raises(ServiceNotFound, match="no live replica 'zz'"):
        c.send("calc", "add", 1, instance="zz")


def test_call_async_resolves_through_the_same_decoding():
    c, _, _ = make_client([inst("a")])
    assert c.call_async("calc", "add", 5, 6).result(timeout=1) == 11


def test_broadcast_reaches_each_callback_and_one_member_per_group():
    subs = [
        Subscription("cb1", "sensor.*", "evt1", "local", "h", 1, 1),
        Subscription("cb2", "sensor.>", "evt2", "other", "h", 2, 1),
        Subscription("g1", "sensor.*", "req1", "local", "h", 3, 1, group="mon", function="@event:on"),
        Subscription("g2", "sensor.*", "req2", "local", "h", 4, 1, group="mon", function="@event:on"),
        Subscription("no", "motor.*", "evt3", "local", "h", 5, 1),
    ]
    c, shm_t, ray_t = make_client([], subs)
    for _ in range(4):
        assert c.broadcast("sensor.t", 1) == 3
    local = collections.Counter(s for s, _ in shm_t.delivered)
    assert local == {"cb1": 4, "g1": 2, "g2": 2}
    assert [s for s, _ in ray_t.delivered] == ["cb2"] * 4
    req = shm_t.delivered[0][1]
    assert req.op == OP_EVENT and req.args == (1,) and req.headers["topic"] == "sensor.t"


def test_a_full_subscriber_is_counted_as_a_drop():
    subs = [Subscription("cb1", "x", "e1", "local", "h", 1, 1), Subscription("cb2", "x", "e2", "local", "h", 2, 1)]
    c, shm_t, _ = make_client([], subs)
    shm_t.full.add("cb1")
    assert c.broadcast("x", "p") == 1
    assert c.stats()["dropped"] == 1


# -------------------------------------------------------------- outcomes
def test_remote_errors_keep_their_type_message_and_traceback():
    e = KeyError("missing")
    info = ErrorInfo(ERR_REMOTE, "builtins.KeyError", "'missing'", "Traceback...\nKeyError", pickle.dumps(e))
    with pytest.raises(KeyError) as ei:
        outcome(Reply(1, ST_ERROR, tuple(info)), "svc", "fn")
    err = ei.value
    assert isinstance(err, RemoteError) and err.args == ("missing",)
    assert err.remote_type == "builtins.KeyError" and "Traceback" in err.remote_traceback
    assert "svc.fn" in str(err)


def test_an_exception_that_does_not_unpickle_is_a_plain_remote_error():
    info = ErrorInfo(ERR_REMOTE, "mod.Weird", "weird happened", "tb", None)
    with pytest.raises(RemoteError) as ei:
        outcome(Reply(1, ST_ERROR, tuple(info)), "svc", "fn")
    assert type(ei.value) is RemoteError and ei.value.remote_type == "mod.Weird"
    assert "weird happened" in str(ei.value)


def test_validation_errors_carry_the_field_list():
    info = ErrorInfo(ERR_VALIDATION, "", "invalid arguments for s.f: data: bad", "", None, [{"field": "data"}])
    with pytest.raises(ValidationError) as ei:
        outcome(Reply(1, ST_ERROR, tuple(info)), "s", "f")
    assert ei.value.errors == [{"field": "data"}] and isinstance(ei.value, ValueError)


def test_call_timeout_is_also_a_timeout_error():
    assert issubclass(CallTimeout, TimeoutError)
