"""CallFuture behaves as concurrent.futures.Future, waiters and callbacks included."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import threading

import pytest

from sage_ray_comm._future import CallFuture
from sage_ray_comm._wire import ERR_CANCELLED, ERR_REMOTE, ST_ERROR, Reply, encode_error, error_reply
from sage_ray_comm.completion import outcome
from sage_ray_comm.errors import RemoteError
from sage_ray_comm.transport import settle


def test_is_a_future_and_resolves():
    f = CallFuture()
    assert isinstance(f, cf.Future) and not f.done()
    f.set_result(5)
    assert f.done() and f.result() == 5 and f.exception() is None


def test_exception_is_raised_by_result():
    f = CallFuture()
    f.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        f.result()
    assert isinstance(f.exception(), KeyError)


def test_result_times_out_while_pending():
    with pytest.raises(cf.TimeoutError):
        CallFuture().result(timeout=0.01)


def test_second_completion_is_invalid():
    f = CallFuture()
    f.set_result(1)
    with pytest.raises(cf.InvalidStateError):
        f.set_result(2)
    with pytest.raises(cf.InvalidStateError):
        f.set_exception(ValueError())


def test_waiting_threads_wake_when_another_thread_completes():
    futs = [CallFuture() for _ in range(50)]
    got = []
    started = threading.Barrier(51)

    def waiter(f):
        started.wait()
        got.append(f.result(timeout=30))

    threads = [threading.Thread(target=waiter, args=(f,)) for f in futs]
    for t in threads:
        t.start()
    started.wait()
    for i, f in enumerate(futs):
        f.set_result(i)
    for t in threads:
        t.join(timeout=30)
    assert sorted(got) == list(range(50))


def test_completion_racing_with_waiters_never_loses_a_wakeup():
    # Many rounds of: one thread waits while another completes at the same moment.
    for i in range(2000):
        f = CallFuture()
        t = threading.Thread(target=f.set_result, args=(i,))
        t.start()
        assert f.result(timeout=10) == i
        t.join()


def test_callbacks_run_once_before_or_after_completion():
    seen = []
    f = CallFuture()
    f.add_done_callback(lambda x: seen.append(("before", x.result())))
    f.set_result(3)
    f.add_done_callback(lambda x: seen.append(("after", x.result())))
    assert seen == [("before", 3), ("after", 3)]


def test_wait_and_as_completed():
    futs = [CallFuture() for _ in range(5)]

    def finish():
        for i, f in enumerate(futs):
            f.set_result(i)

    threading.Timer(0.05, finish).start()
    done, pending = cf.wait(futs, timeout=30)
    assert len(done) == 5 and not pending
    futs2 = [CallFuture() for _ in range(3)]
    threading.Thread(
        target=lambda: [f.set_exception(ValueError(i)) if i == 1 else f.set_result(i) for i, f in enumerate(futs2)]
    ).start()
    out = sorted(repr(f.exception()) if f.exception() else str(f.result()) for f in cf.as_completed(futs2, timeout=30))
    assert out == ["0", "2", "ValueError(1)"]


def test_first_exception_wait_sees_the_failure():
    a, b = CallFuture(), CallFuture()
    threading.Timer(0.05, lambda: a.set_exception(RuntimeError("x"))).start()
    done, pending = cf.wait([a, b], timeout=30, return_when=cf.FIRST_EXCEPTION)
    assert done == {a} and pending == {b}


def test_cancel_a_pending_future():
    f = CallFuture()
    seen = []
    f.add_done_callback(lambda x: seen.append(x.cancelled()))
    assert f.cancel() and f.cancelled() and f.done() and seen == [True]
    with pytest.raises(cf.CancelledError):
        f.result()
    g = CallFuture()
    g.set_result(1)
    assert not g.cancel()


def test_a_running_call_cannot_be_cancelled_but_still_finishes():
    f = CallFuture(running=True)
    assert f.running() and not f.cancel() and not f.cancelled()
    f.set_result(3)
    assert f.result() == 3 and f.done() and not f.running()


def _settled_by_a_not_run_reply(fut: CallFuture) -> None:
    """What the Ray path does with a replica's reply to a call it skipped
    because its caller had cancelled it (ray_transport._settle)."""
    rep = Reply(*error_reply(0, ERR_CANCELLED, "cancelled before it started; not run"))
    settle(fut, lambda r, e: outcome(r, "svc", "fn"), rep, None)


@pytest.mark.parametrize("replica_says_yes", [True, False])
def test_a_not_run_reply_that_lands_while_cancel_asks_ends_the_call_cancelled(replica_says_yes):
    """The replica agrees to cancel, skips the call and replies "not run";
    that reply can settle the future before cancel() hears the agreement.
    cancel() must still say True, and the future is cancelled, not failed."""
    seen: list = []
    waiter_saw: list = []

    def canceller() -> bool:
        _settled_by_a_not_run_reply(f)  # the reply wins the race
        return replica_says_yes

    f = CallFuture(running=True, canceller=canceller)
    f.add_done_callback(lambda x: seen.append(x.cancelled()))
    t = threading.Thread(target=lambda: waiter_saw.append(cf.wait([f], timeout=10).done))
    t.start()
    assert f.cancel() is True and f.cancelled() and seen == [True]
    t.join(10)
    assert waiter_saw == [{f}]
    with pytest.raises(cf.CancelledError):
        f.result()


def test_a_handler_that_raised_cancelled_error_fails_the_call_and_does_not_cancel_it():
    f = CallFuture(running=True)
    rep = Reply(0, ST_ERROR, encode_error(ERR_REMOTE, cf.CancelledError("stopped inside")))
    settle(f, lambda r, e: outcome(r, "svc", "fn"), rep, None)
    assert not f.cancelled() and isinstance(f.exception(), RemoteError)
    assert isinstance(f.exception(), cf.CancelledError)  # still caught as what the handler raised


def test_a_call_that_ended_before_cancel_heard_yes_stays_as_it_ended():
    def canceller() -> bool:
        f.set_result(5)  # the call ran and replied while cancel() was asking
        return True

    f = CallFuture(running=True, canceller=canceller)
    assert f.cancel() is False and not f.cancelled() and f.result() == 5


def test_asyncio_wrap_future():
    f = CallFuture()

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, f.set_result, "ok")
        return await asyncio.wrap_future(f)

    assert asyncio.run(main()) == "ok"


def test_a_pending_future_is_one_tracked_object():
    gc.collect()
    before = len(gc.get_objects())
    keep = [CallFuture() for _ in range(1000)]
    assert len(gc.get_objects()) - before < 1100, "a stock Future would add about 5 tracked objects each"
    del keep
