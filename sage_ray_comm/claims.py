"""Claims in shared memory: a caller's ``cancel()`` and the replica that
takes the request race for one 64-bit word, and exactly one wins.

A process's ``call_async`` calls on one node each get a slot in a claim
table, a small segment beside the caller's reply ring (its name is
``names.claim_table_name`` of that ring). The call's ticket travels as the
cancellation id in the request header (``_wire.py``), so the replica decides
before it unpickles anything::

    word = ticket << 3 | state    state: PENDING, TAKEN, CANCELLED or EXPIRED
    ticket = generation * slots + slot  (never 0: generations start at 1)

- the caller stores ``(ticket, PENDING)`` before it writes the request;
- the replica that reads the request swaps ``(ticket, PENDING)`` for
  ``(ticket, TAKEN)``; if the word held anything else, the call was cancelled
  (or its caller gave up and reused the slot), and the request is skipped;
- ``cancel()`` swaps ``(ticket, PENDING)`` for ``(ticket, CANCELLED)``: True
  when it won, and the request will never run; False when the replica took
  it first (it runs, and is told of the cancellation through its actor). A
  call that timed out is swapped to EXPIRED the same way: nobody waits for it.

Both swaps are one compare-and-swap on the same word (``Ring.word_cas`` in
``csrc/``), so a ``cancel()`` that says True can never be matched by a run.
A caller that died leaves its table behind: a replica cannot open it, or
sees its creator dead, and skips that caller's queued requests.

>>> table = ClaimTable("doc-claims", "sage-doctest")
>>> t1, t2 = table.arm(), table.arm()
>>> claims = ClaimReader("sage-doctest")
>>> claims.take("doc-claims", t1) == TAKEN     # the replica is first: it runs
True
>>> table.cancel(t1), table.cancel(t2)         # too late for t1; t2 never runs
(False, True)
>>> claims.take("doc-claims", t2) == CANCELLED
True
>>> claims.close(); table.close()
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any

from . import shm
from .errors import QueueNotFound, SageCommError
from .names import caller_pid

__all__ = ["CANCELLED", "CLAIM_SLOTS", "EXPIRED", "PENDING", "TAKEN", "ClaimReader", "ClaimTable"]

# How many calls of one process can be cancellable (in flight with a slot) at
# once; more go without a ticket, and cancel() asks the replica instead. A
# power of two (a ticket's slot is its low bits): 64 KiB of words.
CLAIM_SLOTS = 8192
PENDING = 1
TAKEN = 2
CANCELLED = 3
EXPIRED = 4
_STATE_BITS = 3
_STATE_MASK = (1 << _STATE_BITS) - 1


class ClaimTable:
    """The caller's side: one per ``call_async`` reply ring (see the module
    docstring). Thread-safe; the segment is removed by :meth:`close` or at exit."""

    def __init__(self, name: str, namespace: str, slots: int = CLAIM_SLOTS) -> None:
        if slots <= 0 or slots & (slots - 1):
            raise ValueError(f"a claim table's slots must be a power of two, got {slots}")
        self.name = name
        self.slots = slots
        shm_name = shm.segment_name(namespace, name)
        self._ring = shm.WordSegment(shm_name, slots * 8, shm.CREATE_ONLY, f"claim table '{name}'")
        self._finalizer = weakref.finalize(self, _remove, self._ring, shm_name)
        self._lock = threading.Lock()
        self._free = collections.deque(range(slots))
        self._gen = [0] * slots
        self._armed = [0] * slots  # slot -> its ticket while a call holds it (0: free)
        self.full = 0  # calls that found every slot taken (they went without a ticket)

    def arm(self) -> int:
        """A ticket for a call about to be written, its word set PENDING; 0
        when every slot is in use (the call goes without one)."""
        with self._lock:
            if not self._free:
                self.full += 1
                return 0
            slot = self._free.popleft()
            self._gen[slot] += 1
            ticket = self._gen[slot] * self.slots + slot
            self._armed[slot] = ticket
        try:
            self._ring.word_store(slot, ticket << _STATE_BITS | PENDING)
        except SageCommError:  # the table was closed (the process is exiting): no ticket
            return 0
        return ticket

    def cancel(self, ticket: int, why: int = CANCELLED) -> bool:
        """True when this cancels the call before any replica took it (it will
        never run); False when a replica took it first. ``why``: CANCELLED,
        or EXPIRED for a call its caller stopped waiting for."""
        slot = ticket & (self.slots - 1)
        pending = ticket << _STATE_BITS | PENDING
        try:
            seen = self._ring.word_cas(slot, pending, ticket << _STATE_BITS | why)
        except SageCommError:  # the table was closed (the process is exiting): nothing is certain
            return False
        return seen == pending

    def state(self, ticket: int) -> int:
        """PENDING, TAKEN, CANCELLED or EXPIRED; 0 when the slot moved on to another call."""
        try:
            word = self._ring.word_load(ticket & (self.slots - 1))
        except SageCommError:  # closed
            return 0
        return word & _STATE_MASK if word >> _STATE_BITS == ticket else 0

    def release(self, ticket: int) -> None:
        """The call is over (replied, cancelled, failed or timed out): its slot
        may be used again. A second release of the same ticket does nothing."""
        slot = ticket & (self.slots - 1)
        with self._lock:
            if self._armed[slot] != ticket:
                return
            self._armed[slot] = 0
            self._free.append(slot)

    def in_use(self) -> int:
        """Slots held by calls not over yet."""
        return self.slots - len(self._free)

    def close(self) -> None:
        self._finalizer()


def _remove(ring: Any, shm_name: str) -> None:
    ring.release()
    shm.unlink(shm_name)


# How many callers' tables a replica keeps open (least recently used dropped).
_READER_LIMIT = 256


class ClaimReader:
    """The replica's side: takes requests by their ticket in their callers'
    tables, which it opens by name and keeps open (up to ``_READER_LIMIT``)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._tables: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def take(self, name: str, ticket: int) -> int:
        """TAKEN when the replica won ``ticket`` in table ``name`` and must run
        the request; else why not: CANCELLED, EXPIRED (its caller stopped
        waiting), or 0 (its slot moved on, or the caller's table is gone: the
        caller died)."""
        ring = self._tables.get(name)  # lock-free hit: dict reads are atomic under the GIL
        if ring is None:
            ring = self._open(name)
            if ring is None:
                return 0
        slot = ticket % ring.word_count()
        pending = ticket << _STATE_BITS | PENDING
        try:
            seen = ring.word_cas(slot, pending, ticket << _STATE_BITS | TAKEN)
        except SageCommError:  # a ticket past the table: not a request this caller armed
            return 0
        if seen == pending:
            return TAKEN
        return seen & _STATE_MASK if seen >> _STATE_BITS == ticket else 0

    def _open(self, name: str) -> Any:
        with self._lock:
            ring = self._tables.get(name)
            if ring is not None:
                return ring
            try:
                ring = shm.WordSegment(
                    shm.segment_name(self.namespace, name), 0, shm.OPEN_ONLY, f"claim table '{name}'"
                )
            except QueueNotFound:
                return None
            except SageCommError:  # not a table (corrupt, or another layout): treat as gone
                return None
            self._tables[name] = ring
            while len(self._tables) > _READER_LIMIT:
                self._tables.popitem(last=False)[1].release()
            return ring

    def prune(self, alive: Any) -> list[str]:
        """Lets go of the tables of callers ``alive(pid)`` says are dead, so
        ``shm.gc()`` can remove them (the heartbeat calls it); returns their
        names."""
        dead = []
        with self._lock:
            for name in list(self._tables):
                pid = caller_pid(name)
                if pid is not None and not alive(pid):
                    self._tables.pop(name).release()
                    dead.append(name)
        return dead

    def close(self) -> None:
        with self._lock:
            tables, self._tables = list(self._tables.values()), collections.OrderedDict()
        for ring in tables:
            ring.release()
