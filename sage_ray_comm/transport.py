"""Transports: how a request reaches a replica and its reply comes back.

One small interface, :class:`Transport`, and its implementations in
``shm_transport`` (same node, shared-memory rings) and ``ray_transport``
(across nodes, or straight to a replica's actor over Ray). The client's
routing only sees :class:`Transport`; ``sage_ray_comm.testing`` ships a fake
one for tests, and the real ones are tested on real processes.
"""

from __future__ import annotations

import abc
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from . import shm
from ._future import CallFuture
from ._wire import (
    Reply,
    Request,
)
from .router import InstanceInfo, Subscription

__all__ = [
    "EVENT_RING_BYTES",
    "EXPIRY",
    "EXPIRY_SLACK",
    "REPLY_RING_BYTES",
    "REQUEST_RING_BYTES",
    "Finish",
    "Pending",
    "Transport",
    "check_shm_space",
    "settle",
    "settle_from_ref",
    "shm_warn_once",
]

log = logging.getLogger(__name__)

REQUEST_RING_BYTES = 8 << 20  # one frame may be half: 4 MiB
# How long a waiting reader spins before it sleeps on the futex, at first.
# A caller waiting for a reply spins longer than a queue consumer's default
# 20 us: a futex wake-up costs ~40 us here, more than most handlers take.
REPLY_SPIN_US = 100.0
REQUEST_SPIN_US = 50.0
# Both then follow their recent waits (spinning.SpinTuner), up to these: a
# 1 MiB round trip took 250-450 us on a slower host of the same 2-core kind,
# and a 200 us cap left caller and replica each asleep when the other's
# frame came, paying a futex wake on both sides (measured per step: the
# caller's put 22 us instead of 3.6, the replica's reply put 16.6 instead of
# 1.5). Waits longer than the cap go back to the short spin.
REPLY_SPIN_MAX_US = 500.0
REQUEST_SPIN_MAX_US = 500.0
REPLY_RING_BYTES = 8 << 20
EVENT_RING_BYTES = 4 << 20
# Below this much free /dev/shm a process warns once at start: a caller needs
# a reply ring per calling thread, a replica its request ring (8 MiB each).
SHM_COMFORT_BYTES = 64 << 20


# ------------------------------------------------------------ /dev/shm room
_SHM_WARNED = False


def shm_warn_once(what: str) -> None:
    """Logs, once per process, that shared memory is short and calls go over Ray."""
    global _SHM_WARNED
    if _SHM_WARNED:
        return
    _SHM_WARNED = True
    total, free = shm.shm_space()
    log.warning(
        "sage_ray_comm: /dev/shm is short (%d MiB free of %d MiB; each ring needs %d MiB, about %d MiB per "
        "calling process and per replica): %s. What does not fit goes through Ray instead (slower). "
        "Give it more room, e.g. `docker run --shm-size=1g`.",
        free >> 20,
        total >> 20,
        REPLY_RING_BYTES >> 20,
        (REPLY_RING_BYTES + REQUEST_RING_BYTES) >> 20,
        what,
    )


def check_shm_space() -> bool:
    """Warns once when /dev/shm has less free room than a caller and a replica
    need; True when it has enough. Called when a process first uses a bus."""
    total, free = shm.shm_space()
    if total and free < SHM_COMFORT_BYTES:
        shm_warn_once(f"less than {SHM_COMFORT_BYTES >> 20} MiB free leaves room for a few rings only")
        return False
    return True


# --------------------------------------------------------------- interface
# finish(reply, error) -> value, or raises: turns a reply into the call's outcome.
Finish = Callable[[Reply | None, BaseException | None], Any]


def settle(fut: concurrent.futures.Future, finish: Finish, rep: Reply | None, exc: BaseException | None) -> None:
    """Completes ``fut`` with ``finish(rep, exc)``; a CancelledError (the
    replica skipped the call: its caller cancelled it first) cancels it."""
    try:
        value = finish(rep, exc)
    except BaseException as e:
        # Exactly CancelledError: a handler that raised one comes back as
        # RemoteError[CancelledError], a failure of the call, not a cancel.
        if type(e) is concurrent.futures.CancelledError and isinstance(fut, CallFuture):
            fut.end_cancelled()
        elif not fut.done():
            fut.set_exception(e)
        return
    if not fut.done():
        fut.set_result(value)


class Pending:
    """One call over Ray waiting for its reply: its future, completed once,
    with ``finish`` of the reply or error, by whichever comes first: the
    reply, or the expiry sweeper at ``timeout`` (plus ``EXPIRY_SLACK``, so
    the replica's own timeout reply wins the race), which fails it with
    ``timed_out()``. No thread waits per call."""

    __slots__ = ("_key", "_once", "finish", "future")

    def __init__(
        self,
        finish: Finish,
        timeout: float | None = None,
        timed_out: Callable[[], BaseException] | None = None,
        running: bool = True,
        canceller: Callable[[], bool] | None = None,
    ) -> None:
        # running=False: not sent yet, so cancel() may still stop it (see DirectTransport);
        # once running, cancel() is True only if ``canceller()`` (which asks the replica) says so.
        self.future: concurrent.futures.Future = CallFuture(running=running, canceller=canceller)
        self.finish = finish
        self._once = threading.Lock()  # the reply and the expiry race: the first settles
        self._key = None
        if timeout is not None and timed_out is not None:
            self._key = EXPIRY.add(time.monotonic() + timeout + EXPIRY_SLACK, lambda: self.complete(None, timed_out()))

    def complete(self, rep: Reply | None, exc: BaseException | None) -> None:
        if self._once.acquire(blocking=False):
            if self._key is not None:
                EXPIRY.discard(self._key)
            settle(self.future, self.finish, rep, exc)


def settle_from_ref(
    ref: Any,
    finish: Finish,
    unwrap: Callable[[Any], Reply],
    ray_error: Callable[[BaseException], BaseException],
    timeout: float | None = None,
    timed_out: Callable[[], BaseException] | None = None,
) -> concurrent.futures.Future:
    """A future completed, on Ray's callback, with ``finish`` of the reply that
    ``unwrap`` makes of the Ray object, or of the error ``ray_error`` maps a
    RayError to (a :class:`Pending` call: ``timeout`` and ``timed_out`` as there)."""
    import ray

    pending = Pending(finish, timeout, timed_out)

    def done(f: concurrent.futures.Future) -> None:
        try:
            rep, exc = unwrap(f.result()), None
        except ray.exceptions.RayError as e:
            rep, exc = None, ray_error(e)
        except BaseException as e:
            rep, exc = None, e
        pending.complete(rep, exc)

    ref.future().add_done_callback(done)
    return pending.future


# How late after its timeout a call over Ray fails on the caller's side, and
# how often the sweeper looks: the replica answers a late call itself at its
# deadline, and that (typed) answer should arrive first.
EXPIRY_SLACK = 1.0
EXPIRY_SWEEP_SECONDS = 0.05


class Expiry:
    """Calls ``on_expire()`` for entries still present at their deadline
    (monotonic seconds), from one daemon thread started on first use that
    sweeps every ``EXPIRY_SWEEP_SECONDS``. Entries are removed when their
    call completes (:meth:`discard`), so the sweep sees only calls in flight."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[float, Callable[[], None]]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._busy = threading.Event()  # set while there are entries: the sweeper sleeps otherwise
        self._thread: threading.Thread | None = None

    def add(self, when: float, on_expire: Callable[[], None]) -> int:
        key = next(self._ids)
        with self._lock:
            self._entries[key] = (when, on_expire)
            if self._thread is None:
                self._thread = threading.Thread(target=self._sweep, name="sage-expiry", daemon=True)
                self._thread.start()
            if not self._busy.is_set():
                self._busy.set()
        return key

    def discard(self, key: int) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def _sweep(self) -> None:
        while True:
            self._busy.wait()
            time.sleep(EXPIRY_SWEEP_SECONDS)  # a timer tick, not a wait for another thread
            now = time.monotonic()
            with self._lock:
                due = [k for k, (when, _) in list(self._entries.items()) if when <= now]
                fire = [self._entries.pop(k)[1] for k in due if k in self._entries]
                if not self._entries:
                    self._busy.clear()  # add() sets it again under the same lock
            for on_expire in fire:
                try:
                    on_expire()
                except Exception:  # never lose the sweeper
                    log.exception("expiring a call over Ray failed")


EXPIRY = Expiry()


class Transport(abc.ABC):
    """Carries requests to one replica. ``name`` is what stats call it."""

    name = "?"

    @abc.abstractmethod
    def call(self, inst: InstanceInfo, req: Request, timeout: float) -> Reply:
        """Sends ``req`` and waits for its reply. Raises CallTimeout, ServiceUnavailable."""

    @abc.abstractmethod
    def call_async(self, inst: InstanceInfo, req: Request, timeout: float, finish: Finish) -> concurrent.futures.Future:
        """Sends ``req`` and returns a future at once. When the reply (or a
        transport error) arrives, the future gets ``finish(reply, None)`` (or
        ``finish(None, error)``): its return value, or what it raises."""

    @abc.abstractmethod
    def send(self, inst: InstanceInfo, req: Request, timeout: float) -> None:
        """Delivers ``req`` with no reply. Blocks (up to ``timeout``) while the replica is full."""

    @abc.abstractmethod
    def deliver(self, sub: Subscription, req: Request) -> bool:
        """Offers an event to a subscriber without blocking; False if its buffer was full."""

    def close(self) -> None:  # noqa: B027 - optional: most transports hold nothing
        """Releases what the transport holds (rings, threads)."""


# --------------------------------------------------------------- Ray path


# ------------------------------------------------------------ direct to a replica
