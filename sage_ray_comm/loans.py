"""Which arena slots this thread's large ``bytes`` came in or went out in, so
that such a ``bytes`` passed on travels by its slot instead of as a copy.

A ``bytes`` owns its memory: one read out of a slot is a copy, and one sent
is copied into a slot. But bytes never change, and a slot holds the same
bytes for its whole generation (its owner writes it only when it takes it),
so two copies can be saved:

- **Received, then sent on** (:func:`keep_slots`): while a replica's
  dispatcher runs a request, the slots of the large bytes it read stay held
  with them. A handler that returns or forwards one of them sends its slot
  again, with no copy in.
- **Sent, then returned** (:func:`track_sent`): while a caller's thread makes
  a call, the slots its large bytes went out in are noted. A reply that names
  one of them again (an echo, a stage that passes its input on) gives the
  caller its own object back, with no copy out.

>>> token = track_sent()
>>> note_sent("/sage_rc.doc.slab", 3, 1, b"x" * 10)
>>> untrack_sent(token)
>>> keep_slots(); drop_kept(); keep_slots(False)
"""

from __future__ import annotations

import threading
from typing import Any

from . import shm

__all__ = [
    "drop_kept",
    "keep",
    "keep_slots",
    "kept_view",
    "note_sent",
    "own_bytes",
    "track_sent",
    "untrack_sent",
]

# A thread keeps the slots of at most this many received bytes: a handler
# reading many replies in a loop must not pin a peer's whole arena.
KEPT_MAX = 8


class _Kept(threading.local):
    # id(bytes) -> (the bytes, the SlotView they were read out of); None: not keeping
    slots: dict | None = None


class _Sent(threading.local):
    # (slab, slot, generation) -> the bytes sent in it; None: not tracking
    d: dict | None = None


_KEPT = _Kept()
_SENT = _Sent()


def keep_slots(on: bool = True) -> None:
    """Lets go of the slots this thread kept for the bytes it read out of
    them; then keeps the next ones (``on``) or stops keeping them. A
    replica's dispatcher keeps them while it runs a request, so a handler
    that returns or forwards a large ``bytes`` it received sends it with no
    copy.

    >>> keep_slots()
    >>> keep_slots(False)
    """
    kept = _KEPT.slots
    if on and kept is not None:
        kept.clear()  # per request, twice: no new dict when it is empty already
        return
    _KEPT.slots = {} if on else None


def drop_kept() -> None:
    """Lets go of the slots this thread kept (keep_slots), and goes on keeping.
    A reply lets go of them once it is encoded (it holds what it sends on with
    holders of its own), before it is sent: its caller may be back with the
    next call, wanting the same slot, before this thread is done."""
    kept = _KEPT.slots
    if kept:
        kept.clear()


def keep(data: bytes, view: Any) -> None:
    """Keeps ``view`` (the SlotView ``data`` was read out of) while this
    thread keeps slots; the oldest goes past KEPT_MAX."""
    kept = _KEPT.slots
    if kept is None:
        return
    if len(kept) >= KEPT_MAX:
        del kept[next(iter(kept))]
    kept[id(data)] = (data, view)


def kept_view(data: bytes) -> Any:
    """The slot view ``data`` was read out of (keep_slots), or None."""
    kept = _KEPT.slots
    pair = kept.get(id(data)) if kept else None
    return pair[1] if pair is not None and pair[0] is data else None


def track_sent() -> dict | None:
    """Notes the large ``bytes`` this thread sends from now on (note_sent),
    until ``untrack_sent(token)`` with what this returned (calls nest). A
    synchronous call tracks those of its request, so a reply that returns
    one of them gives the caller its own object back (own_bytes).

    >>> token = track_sent()
    >>> untrack_sent(token)
    """
    prev = _SENT.d
    _SENT.d = {}
    return prev


def untrack_sent(token: dict | None) -> None:
    """Stops tracking (see :func:`track_sent`) and forgets what was noted."""
    _SENT.d = token


def note_sent(slab: str, slot: int, gen: int, data: bytes) -> None:
    """Notes that ``data`` went out in ``slot`` of ``slab`` at generation
    ``gen``, if this thread tracks what it sends."""
    sent = _SENT.d
    if sent is not None:
        sent[slab, slot, gen] = data


def own_bytes(view: Any) -> bytes | None:
    """The bytes this thread sent in the slot ``view`` covers, in the call
    it is making (track_sent); None if it sent none there."""
    sent = _SENT.d
    if not sent:
        return None
    own = sent.get((view.shm_name, view.word // shm.SLOT_WORDS, view.gen))
    return own if own is not None and len(own) == view.length else None
