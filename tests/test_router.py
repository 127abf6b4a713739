"""The registry and topic matching, without Ray."""

from __future__ import annotations

import pytest

from sage_ray_comm import InvalidSubscription, NameConflict
from sage_ray_comm.router import (
    FunctionInfo,
    InstanceInfo,
    Registry,
    Subscription,
    topic_matches,
    validate_pattern,
    validate_topic,
)


def inst(service="calc", iid="calc#1", cls="m:Calc", node="n1") -> InstanceInfo:
    return InstanceInfo(
        service=service,
        instance_id=iid,
        class_id=cls,
        node_id=node,
        host_id="h",
        pid=1,
        pid_start=1,
        request_queue=f"req.{iid}",
        functions={"add": FunctionInfo("add", 30.0)},
    )


def sub(sid, pattern, group=None) -> Subscription:
    return Subscription(sid, pattern, "evt", "n1", "h", 1, 1, group, sid)


@pytest.mark.parametrize(
    "pattern,topic,expected",
    [
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
        ("a.b", "a.b.c", False),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.x.y.c", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        (">", "a.b", True),
        ("*.b.>", "x.b.c", True),
        ("*.b.>", "x.c.c", False),
        ("sensor.*", "sensor.kitchen", True),
        ("sensor.*", "sensors.kitchen", False),
    ],
)
def test_nats_matching(pattern, topic, expected):
    assert topic_matches(pattern, topic) is expected


@pytest.mark.parametrize("bad", ["", "a..b", "a.>.b", "a.b>", "a b", ">x", 3])
def test_bad_patterns_are_typed_errors(bad):
    with pytest.raises(InvalidSubscription):
        validate_pattern(bad)


@pytest.mark.parametrize("bad", ["", "a.*", "a.>", "a..b", "a b", None])
def test_publish_topics_take_no_wildcards(bad):
    with pytest.raises(InvalidSubscription):
        validate_topic(bad)


def test_replicas_share_a_name_and_versions_grow():
    r = Registry("b")
    v1 = r.register(inst(iid="calc#1"))
    v2 = r.register(inst(iid="calc#2"))
    assert v2 > v1
    assert set(r.snapshot()["services"]["calc"]) == {"calc#1", "calc#2"}


def test_different_class_under_a_taken_name_conflicts_and_names_both():
    r = Registry("b")
    r.register(inst(cls="m:Calc"))
    with pytest.raises(NameConflict) as ei:
        r.register(inst(iid="x#1", cls="m:Other"))
    assert "m:Calc" in str(ei.value) and "m:Other" in str(ei.value) and "'calc'" in str(ei.value)
    # replace=True takes the name over and drops the old replicas
    r.register(inst(iid="x#1", cls="m:Other"), replace=True)
    assert set(r.snapshot()["services"]["calc"]) == {"x#1"}


def test_a_name_is_free_again_once_its_replicas_are_gone():
    r = Registry("b")
    r.register(inst(cls="m:Calc"))
    assert r.deregister("calc#1")
    assert not r.deregister("calc#1")
    r.register(inst(iid="y#1", cls="m:Other"))
    assert r.snapshot()["services"]["calc"]["y#1"].class_id == "m:Other"


def test_heartbeats_keep_replicas_and_silence_drops_them():
    r = Registry("b")
    r.register(inst(iid="a"), now=100.0)
    r.register(inst(iid="b"), now=100.0)
    assert r.heartbeat("a", {"in_flight": 2}, now=102.5)
    dropped = r.expire(grace=3.0, now=103.5)
    assert [i.instance_id for i in dropped] == ["b"]
    assert set(r.snapshot()["services"]["calc"]) == {"a"}
    assert r.snapshot()["load"]["a"] == {"in_flight": 2}
    assert not r.heartbeat("zzz"), "an unknown instance must be told to re-register"


def test_a_replica_known_alive_is_kept_however_late_its_heartbeat():
    r = Registry("b")
    r.register(inst(iid="busy"), now=100.0)
    r.register(inst(iid="gone"), now=100.0)
    r.register(inst(iid="far"), now=100.0)
    verdicts = {"busy": True, "gone": False, "far": None}
    dropped = r.expire(grace=3.0, now=101.0, alive=lambda i: verdicts[i.instance_id])
    assert [i.instance_id for i in dropped] == ["gone"], "a dead process is dropped at once"
    dropped = r.expire(grace=3.0, now=200.0, alive=lambda i: verdicts[i.instance_id])
    assert [i.instance_id for i in dropped] == ["far"], "only where liveness is unknown does silence count"
    assert set(r.snapshot()["services"]["calc"]) == {"busy"}


def test_subscriptions_follow_their_instance():
    r = Registry("b")
    r.register(inst(iid="calc#1"))
    r.subscribe(sub("calc#1/@event:on/x.*", "x.*", group="calc"))
    r.subscribe(sub("other", "y.>"))
    r.deregister("calc#1")
    assert [s.sub_id for s in r.snapshot()["subscriptions"]] == ["other"]
    assert r.unsubscribe("other") and not r.unsubscribe("other")


def test_drop_subscriber_process_removes_only_its_callbacks():
    r = Registry("b")
    r.subscribe(Subscription("p1", "a", "evt", "n", "h", 10, 1))
    r.subscribe(Subscription("p2", "a", "evt", "n", "h", 11, 1))
    assert r.drop_subscriber_process("h", 10) == 1
    assert [s.sub_id for s in r.snapshot()["subscriptions"]] == ["p2"]


def test_code_id_follows_the_code_not_the_object():
    from sage_ray_comm.router import code_id_of

    class A:
        def f(self):
            return 1

    class B:
        def f(self):
            return 1

    class C:
        def f(self):
            return 2

    assert code_id_of(A) == code_id_of(B), "same code, same fingerprint"
    assert code_id_of(A) != code_id_of(C), "a changed method changes it"
