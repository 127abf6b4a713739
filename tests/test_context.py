"""Deadlines that follow a request into the calls its handler makes (gRPC's
deadline propagation): real replicas, a real driver, counted invocations."""

from __future__ import annotations

import time

import pytest
from _wait import wait_for

from sage_ray_comm import BaseService, CallTimeout, FunctionClient, context, sage_service, service_function


@sage_service(name="dl_b", replicas=1, num_cpus=0.1)
class DeadlineB(BaseService):
    def initialize(self):
        self.runs = 0

    @service_function
    def slow(self, seconds: float) -> str:
        self.runs += 1
        time.sleep(seconds)  # the work itself: B is slow
        return "done"

    @service_function
    def runs_so_far(self) -> int:
        return self.runs


@sage_service(name="dl_a", replicas=1, num_cpus=0.1)
class DeadlineA(BaseService):
    def initialize(self):
        self.reports = []

    def _nested(self, downstream):
        t0, left = time.monotonic(), self.remaining()
        try:
            self.call_function("dl_b", "slow", downstream)
            outcome = ("ok", "")
        except CallTimeout as e:
            outcome = ("CallTimeout", str(e))
        self.reports.append({"left": left, "elapsed": time.monotonic() - t0, "outcome": outcome})

    @service_function
    def relay(self, spend: float, downstream: float) -> None:
        time.sleep(spend)  # work that uses up part of the caller's budget
        self._nested(downstream)

    @service_function
    async def arelay(self, downstream: float) -> None:
        t0, left = time.monotonic(), self.remaining()
        try:
            await self.client.acall("dl_b", "slow", downstream)
            outcome = ("ok", "")
        except CallTimeout as e:
            outcome = ("CallTimeout", str(e))
        self.reports.append({"left": left, "elapsed": time.monotonic() - t0, "outcome": outcome})

    @service_function
    def report(self) -> list:
        return self.reports


@pytest.fixture
def chain(bus):
    DeadlineB.deploy(bus=bus)
    DeadlineA.deploy(bus=bus)
    with FunctionClient(bus=bus) as c:
        yield c


def _report(c, n):
    return wait_for(lambda: len(c.call("dl_a", "report")) >= n and c.call("dl_a", "report"), 30, "A's report")


@pytest.mark.parametrize("fn", ["relay", "arelay"])
def test_a_nested_call_is_cut_at_the_time_its_parent_has_left(chain, fn):
    c = chain
    args = (0.0, 3.0) if fn == "relay" else (3.0,)
    t0 = time.monotonic()
    try:  # A answers right at its deadline: either outcome of this race is fine here
        c.call("dl_a", fn, *args, timeout=0.6)
    except CallTimeout:
        pass
    assert time.monotonic() - t0 < 2.0
    (rep,) = _report(c, 1)
    kind, message = rep["outcome"]
    assert kind == "CallTimeout", rep
    assert 0.3 < rep["left"] <= 0.6
    # Cut at A's remaining time (about 0.6 s), not B's 3 s nor the 30 s default.
    assert rep["elapsed"] < 1.5, rep
    assert f"deadline of dl_a.{fn}" in message, message
    assert c.call("dl_b", "runs_so_far") == 1  # it was sent: there was time left


def test_a_nested_call_after_the_deadline_is_never_sent(chain):
    c = chain
    with pytest.raises(CallTimeout):
        c.call("dl_a", "relay", 0.6, 0.01, timeout=0.3)  # A works past its deadline, then calls B
    (rep,) = _report(c, 1)
    kind, message = rep["outcome"]
    assert kind == "CallTimeout" and "not sent" in message and "dl_a.relay" in message, rep
    assert rep["left"] < 0 and rep["elapsed"] < 0.05, rep  # failed at once
    assert c.call("dl_b", "runs_so_far") == 0  # B never ran


def test_calls_outside_a_handler_keep_their_own_timeout():
    assert context.current() is None and context.remaining() is None
    assert context.bound_by_parent(5.0, "s", "f") == (5.0, None)
    token = context.enter(context.Handling("a", "f", time.time() + 1.0))
    try:
        t, why = context.bound_by_parent(5.0, "b", "g")
        assert 0.9 < t <= 1.0 and "deadline of a.f" in why
        assert context.bound_by_parent(0.1, "b", "g") == (0.1, None)  # its own is shorter
    finally:
        context.leave(token)
    token = context.enter(context.Handling("a", "f", time.time() - 0.5))
    try:
        with pytest.raises(CallTimeout, match=r"call to b\.g not sent: .*a\.f\) passed"):
            context.bound_by_parent(5.0, "b", "g")
    finally:
        context.leave(token)
