"""The registry, without Ray."""

from __future__ import annotations

import pytest

from sage_ray_comm import NameConflict
from sage_ray_comm.router import RESTART_GRACE, FunctionInfo, InstanceInfo, Registry, Subscription


def inst(service="calc", iid="calc#1", cls="m:Calc", node="n1", actor=None) -> InstanceInfo:
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
        actor_name=actor,
    )


def sub(sid, pattern, group=None) -> Subscription:
    return Subscription(sid, pattern, "evt", "n1", "h", 1, 1, group, sid)


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


def test_a_replica_that_died_is_listed_restarting_until_it_registers_again():
    r = Registry("b")
    r.register(inst(iid="a1", actor="sage:b:calc#1"), now=100.0)
    r.register(inst(iid="a2", actor="sage:b:calc#2"), now=100.0)
    assert r.deregister("a1", died=True)
    v = r.version
    assert r.expire(grace=3.0, now=101.0, alive=lambda i: False) and r.version == v + 1  # a2's process is gone
    snap = r.snapshot()
    assert "calc" not in snap["services"], "no replica is live"
    assert snap["restarting"] == {"calc": ["sage:b:calc#1", "sage:b:calc#2"]}
    r.register(inst(iid="a1-again", actor="sage:b:calc#1"))  # Ray restarted it: it is back
    assert r.snapshot()["restarting"] == {"calc": ["sage:b:calc#2"]}
    r.register(inst(iid="a2-again", actor="sage:b:calc#2"))
    assert r.snapshot()["restarting"] == {}


def test_a_replica_that_stopped_or_has_no_actor_is_not_listed_restarting():
    r = Registry("b")
    r.register(inst(iid="a1", actor="sage:b:calc#1"))
    r.register(inst(iid="inproc"))  # an in-process service: nothing restarts it
    assert r.deregister("a1")  # stopped on purpose
    assert r.deregister("inproc", died=True)
    assert r.snapshot()["restarting"] == {}


def test_a_restarting_replica_is_unlisted_when_its_actor_is_gone_or_its_time_is_up():
    r = Registry("b")
    for i in (1, 2, 3):
        r.register(inst(iid=f"a{i}", actor=f"act{i}"), now=100.0)
        r.deregister(f"a{i}", died=True, now=150.0 if i == 3 else 100.0)  # the third died later
    v = r.version
    assert r.settle_restarts(lambda name: False, now=100.0 + RESTART_GRACE / 2) == 0 and r.version == v
    assert r.settle_restarts(lambda name: name == "act1", now=100.0 + RESTART_GRACE / 2) == 1  # no restarts left
    assert r.version == v + 1 and r.snapshot()["restarting"] == {"calc": ["act2", "act3"]}
    assert r.settle_restarts(lambda name: False, now=100.0 + RESTART_GRACE + 1) == 1  # Ray never brought it back
    assert r.snapshot()["restarting"] == {"calc": ["act3"]}
