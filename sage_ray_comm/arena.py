"""A process's arena: shared-memory slabs of reusable slots. A large buffer
of a call or a reply goes into a slot once; the receiver reads it in place
(numpy arrays over the slot, read-only, as Ray's plasma arrays), and the
slot is free again the moment the receiver lets go of its last view.

A slab is a segment (``names.slab_name``) of equal slots; its data region::

    [ words: SLOT_WORDS per slot, padded to a page ][ slot 0 ][ slot 1 ] ...
    word 8i         = generation << 32 | holders     (holders 0: the slot is free)
    words 8i+1..8i+7 = pids of its holders (0: none); a holder whose pid
                      is not there (more than seven, or unknown) is untracked

- The owner (the process that made the slab) takes a free slot with one
  compare-and-swap, to the next generation with one holder: the receiver.
  It copies the buffer in (the one copy of the message), and the frame
  carries the slot's location (:class:`Location`), not its bytes.
- The receiver maps the slab (once; :class:`SlabReader`) and rebuilds the
  object over a ``SlotView`` of the slot. When the last view is released
  (reference counting: Python never waits for its garbage collector), the
  view takes its holder away: one atomic decrement, refused (and counted)
  if the slot moved on to another generation, so a slot is never freed twice.
- A buffer that already lives in a slot (an array received, or made with
  :meth:`Arena.buffer`) is sent by location again, with one more holder:
  an echo of a received array copies nothing.
- The share of a holder that died is taken back when the owner runs short
  (its pid off the list, then one holder fewer; a live holder does the same
  in that order when it lets go), so a slot held by many (an event to many
  subscribers, an array sent on) comes back too. A slab whose owner died is
  removed by ``shm.gc()``.
- A full arena makes the sender wait, up to its deadline, for a slot to be
  released (``CallTimeout`` after that): it never grows past its budget and
  never drops a call.

>>> arena = Arena("sage-doctest", budget=8 << 20)
>>> loc = arena.place(memoryview(b"x" * (1 << 20)), reader_pid=0, timeout=1.0)
>>> view = READERS.view(loc)
>>> bytes(memoryview(view)[:3]), arena.in_use()
(b'xxx', 1)
>>> del view; arena.in_use()
0
>>> arena.close()
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import threading
import time
import uuid
import weakref
from typing import Any, NamedTuple

from . import context, shm
from .errors import CallTimeout, DeserializationError, InvalidCallArgument, MessageTooLarge, SageCommError
from .names import slab_geometry, slab_name

__all__ = [
    "ARENA_MIN_BYTES",
    "DEFAULT_BUDGET",
    "HELD_MIN_BYTES",
    "READERS",
    "SLOT_CLASSES",
    "Arena",
    "ArenaOwner",
    "Location",
    "SlabReader",
    "check_budget",
    "fill",
]

log = logging.getLogger(__name__)

# A buffer this large goes into the arena; smaller ones are copied with the
# frame. Measured (echo round trips, p50, same run): up to 256 KiB the ring
# was as fast or faster (numpy 115 us against 116-133, bytes 79 against
# 123-136); from 512 KiB the arena won (numpy 74 us against 156, bytes 144
# against 207). SAGE_ARENA_MIN_BYTES overrides it (for measuring).
ARENA_MIN_BYTES = int(os.environ.get("SAGE_ARENA_MIN_BYTES", 512 << 10))
# A buffer that already is a whole slot (an array made in an arena, or one
# received and sent on) goes by its location from this size: no copy at all,
# where the ring would copy it in and out. Measured on the 2-core VM (echo of
# an array made in shared memory, p50, same run): 64 KiB 231 us through the
# ring, 177 by location; 256 KiB 412 against 197. Smaller ones ride the frame.
HELD_MIN_BYTES = min(ARENA_MIN_BYTES, 64 << 10)
# Slot sizes; a buffer takes the smallest that holds it. Larger than the last:
# a slab of one slot of its own size.
SLOT_CLASSES = (1 << 20, 4 << 20, 16 << 20, 64 << 20)
# About how large a slab of small slots is (fewer segments, fewer mappings).
SLAB_TARGET = 16 << 20
# The arena's default size: a quarter of what /dev/shm has free (a default
# Docker container has 64 MiB), at most this.
DEFAULT_BUDGET = 1 << 30
_PAGE = 4096
_GEN_SHIFT = 32
_HOLDERS = (1 << _GEN_SHIFT) - 1
# How long a sender waits between looks at a full arena (it grows to this).
_WAIT_MAX = 0.002


class Location(NamedTuple):
    """Where a buffer of a message lives: a slot of a slab."""

    slab: str  # the slab's POSIX shared-memory name (its geometry is in it: names.slab_name)
    slot: int
    gen: int  # the slot's generation when the message was sent
    offset: int  # of the buffer in the slab's data region
    length: int


# A slot's words: its state, then the pids of its holders (csrc/slots.hpp).
_WORDS = shm.SLOT_WORDS
# A slab's geometry is in its name: parsed once per slab, not per message.
_geometry = functools.lru_cache(maxsize=1024)(slab_geometry)


def _words_bytes(slots: int) -> int:
    return -(-(8 * _WORDS * slots) // _PAGE) * _PAGE


def _take_back_dead(seg: Any, word: int) -> int:
    """Takes back the shares of the slot's holders that died; how many."""
    gen = seg.word_load(word) >> _GEN_SHIFT
    n = 0
    for i in range(word + 1, word + 1 + shm.SLOT_NAMES):
        pid = seg.word_load(i)
        if not pid or shm.process_alive(pid, 0) or seg.word_cas(i, pid, 0) != pid:
            continue
        n += seg.slot_release(word, gen, 0)  # the entry is ours now: exactly one holder to take away
    return n


class _Slab:
    """One slab of the owner's arena."""

    def __init__(self, namespace: str, slot_bytes: int, slots: int) -> None:
        self.name = slab_name(uuid.uuid4().hex[:12], slot_bytes, slots)
        self.slot_bytes, self.slots = slot_bytes, slots
        self.base = _words_bytes(slots)
        self.size = self.base + slot_bytes * slots
        self.shm_name = shm.segment_name(namespace, self.name)
        self.seg = shm.WordSegment(self.shm_name, self.size, shm.CREATE_ONLY, f"arena slab '{self.name}'")
        self.whole = shm.SlotView(self.seg, 0, self.size, False)  # the owner's own, writable view
        self.whole.prefault()  # every page touched now: a message pays no page faults

    def take(self, reader_pid: int) -> tuple[int, int] | None:
        """A free slot, now the next generation with one holder: (slot, gen).
        First fit, not round robin: the lowest free slot is usually the one
        just let go of, still in the CPU's cache (a 1 MiB copy into it took
        60 us less than into a slot last written 16 MiB of traffic ago)."""
        return self.seg.slot_take(self.slots, reader_pid)

    def reclaim(self) -> int:
        """Takes back the shares of holders that died; how many slots that freed."""
        n = 0
        for i in range(self.slots):
            if self.seg.word_load(_WORDS * i) & _HOLDERS and _take_back_dead(self.seg, _WORDS * i):
                n += not self.seg.word_load(_WORDS * i) & _HOLDERS
        return n

    def in_use(self) -> int:
        return sum(1 for i in range(self.slots) if self.seg.word_load(_WORDS * i) & _HOLDERS)


class Arena:
    """A process's slabs (see the module docstring). ``budget``: the most
    bytes of slabs it makes (default: a quarter of /dev/shm's free space, at
    most DEFAULT_BUDGET). Thread-safe."""

    def __init__(self, namespace: str, budget: int | None = None) -> None:
        if budget is None:
            budget = min(DEFAULT_BUDGET, shm.shm_space()[1] // 4)
        self.namespace = namespace
        self.budget = budget
        self._lock = threading.Lock()
        self._slabs: dict[int, list[_Slab]] = {}  # slot size -> its slabs
        self._bytes = 0
        self.reclaimed = 0  # slots taken back from receivers that died
        self.waits = 0  # sends that found the arena full and waited
        self.copies = 0  # buffers copied in (a buffer already in a slot is sent without one)
        self._warned = False
        self._finalizer = weakref.finalize(self, _unlink_all, self._slabs)

    @staticmethod
    def slot_size(nbytes: int) -> int:
        for c in SLOT_CLASSES:
            if nbytes <= c:
                return c
        return -(-nbytes // _PAGE) * _PAGE

    def fits(self, nbytes: int) -> bool:
        """Whether a buffer of ``nbytes`` can ever have a slot here."""
        size = self.slot_size(nbytes)
        return _words_bytes(1) + size <= self.budget

    def place(self, buf: memoryview, reader_pid: int, timeout: float | None, fills: list | None = None) -> Location:
        """Copies ``buf`` into a slot for one receiver (``reader_pid``: who is
        expected to let go of it, 0 if unknown). Waits up to ``timeout`` for
        a slot when the arena is full, then raises CallTimeout.

        With ``fills``, the copy is left for :func:`fill`, after the message
        naming the slot is sent: the slot says its bytes are still to come,
        and its reader copies them out as they arrive (csrc/slots.hpp)."""
        n = buf.nbytes
        slab, slot, gen = self._take(n, reader_pid, timeout)
        offset = slab.base + slot * slab.slot_bytes
        if fills is None:
            slab.whole.write(buf, offset)
        else:
            word = _WORDS * slot
            slab.seg.word_store(word + shm.SLOT_UNFILLED, n)
            fills.append((slab.whole, word, buf, offset))
        self.copies += 1
        return Location(slab.shm_name, slot, gen, offset, n)

    def _take(self, nbytes: int, reader_pid: int, timeout: float | None) -> tuple[_Slab, int, int]:
        size = self.slot_size(nbytes)
        # The common case first, without the lock: a free slot in a slab there
        # is already (taking one is a compare-and-swap; the lists only grow).
        for slab in self._slabs.get(size, ()):
            got = slab.take(reader_pid)
            if got is not None:
                return slab, *got
        if not self.fits(nbytes):
            raise MessageTooLarge(
                f"a buffer of {nbytes} bytes cannot fit this process's arena of {self.budget} bytes "
                "(give it more room: arena_bytes=)"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.00005
        waited = False
        while True:
            with self._lock:
                slabs = self._slabs.setdefault(size, [])
                for slab in slabs:
                    got = slab.take(reader_pid)
                    if got is not None:
                        return slab, *got
                freed = sum(s.reclaim() for s in slabs)
                if freed:
                    self.reclaimed += freed
                    continue
                slots = max(1, SLAB_TARGET // size) if size in SLOT_CLASSES else 1
                while slots > 1 and self._bytes + _words_bytes(slots) + size * slots > self.budget:
                    slots //= 2
                need = _words_bytes(slots) + size * slots
                if self._bytes + need <= self.budget:
                    slab = _Slab(self.namespace, size, slots)
                    slabs.append(slab)
                    self._bytes += need
                    got = slab.take(reader_pid)
                    if got is not None:
                        return slab, *got
            if not waited:
                self.waits += 1
                waited = True
            if deadline is not None and time.monotonic() >= deadline:
                raise CallTimeout(
                    f"this process's arena ({self._bytes} of {self.budget} bytes in slabs) had no free slot "
                    f"of {size} bytes for {timeout:.3g} s: its receivers hold every slot"
                )
            time.sleep(pause)  # slots come back from other processes: nothing here to wait on
            pause = min(pause * 2, _WAIT_MAX)

    def buffer(self, nbytes: int, timeout: float | None = None) -> Any:
        """A writable buffer of ``nbytes`` that lives in a slot of this
        arena: sending it (or arrays over it) copies nothing. Its slot is free
        again when the last view of it, here or in a receiver, is released."""
        slab, slot, gen = self._take(nbytes, os.getpid(), timeout)
        offset = slab.base + slot * slab.slot_bytes
        return shm.SlotView(slab.seg, offset, nbytes, False, _WORDS * slot, gen)

    def array(self, shape: Any, dtype: Any = "float64", timeout: float | None = None) -> Any:
        """A writable numpy array that lives in a slot of this arena (see
        :meth:`buffer`): passing it in a call or returning it from a handler
        copies nothing. Once sent it becomes read-only, so what the receiver
        saw never changes."""
        import numpy as np

        try:  # ints, or numpy's (anything with __index__)
            dims: tuple | None = tuple(map(operator.index, shape if isinstance(shape, (tuple, list)) else (shape,)))
        except TypeError:
            dims = None
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dims is None or min(dims, default=0) < 0 or dt is None or dt.hasobject:
            raise InvalidCallArgument(
                f"an array in shared memory needs a shape of non-negative ints and a numpy dtype without "
                f"objects; got shape {shape!r}, dtype {dtype!r} (arena of namespace '{self.namespace}')"
            )
        count = int(np.prod(dims, dtype=np.int64))
        view = self.buffer(max(1, count * dt.itemsize), timeout)
        return np.frombuffer(view, dtype=dt, count=count).reshape(dims)

    def hold(self, view: Any, reader_pid: int = 0) -> Location | None:
        """The location of ``view`` (a SlotView of a whole slot, this
        process's or another's) with one more holder: the receiver it is sent
        to (``reader_pid``, 0 if unknown). None if the slot moved on (then
        the buffer is copied instead)."""
        # The view's own mapping of the slab: no lookup of it by name.
        if not view.hold(reader_pid):
            return None
        return Location(*view.location)

    def fill(self) -> float:
        """The share of the budget in slots some receiver still holds (0..1)."""
        with self._lock:
            held = sum(s.in_use() * s.slot_bytes for slabs in self._slabs.values() for s in slabs)
        return held / max(1, self.budget)

    def too_big(self, nbytes: int) -> None:
        """Says once that a buffer is larger than the arena can hold (it is then copied with its message)."""
        if not self._warned:
            self._warned = True
            log.warning(
                "a buffer of %d bytes does not fit this process's arena of %d bytes: such buffers are copied "
                "with their message (give the arena more room: arena_bytes=)",
                nbytes,
                self.budget,
            )

    def in_use(self) -> int:
        """Slots some receiver still holds."""
        with self._lock:
            return sum(s.in_use() for slabs in self._slabs.values() for s in slabs)

    def stats(self) -> dict:
        with self._lock:
            slabs = [s for ss in self._slabs.values() for s in ss]
            return {
                "slabs": len(slabs),
                "bytes": self._bytes,
                "budget": self.budget,
                "slots": sum(s.slots for s in slabs),
                "in_use": sum(s.in_use() for s in slabs),
                "waits": self.waits,
                "copies": self.copies,
                "reclaimed": self.reclaimed,
            }

    def close(self) -> None:
        """Removes the slabs (views of them stay valid until released)."""
        self._finalizer()


def check_budget(value: Any, error: type[Exception], where: str) -> None:
    """Raises ``error`` unless ``value`` is an arena's size (``arena_bytes=``
    of ``where``): a positive number of bytes, or None for the default."""
    if value is not None and not (type(value) is int and value > 0):
        raise error(
            f"arena_bytes of {where} must be a positive number of bytes (or None for the default), got {value!r}"
        )


class ArenaOwner:
    """A sender of large buffers (a transport's calls, a replica's replies):
    its arena is made at first use, once, whichever of its threads asks
    first. Needs ``self.namespace``; ``arena_budget`` (None: the Arena's
    default) is read when the arena is made."""

    namespace: str
    arena: Arena | None = None
    arena_budget: int | None = None
    _arena_made = threading.Lock()  # taken only until an owner has its arena

    def own_arena(self) -> Arena:
        a = self.arena
        if a is None:
            with ArenaOwner._arena_made:
                if self.arena is None:
                    self.arena = Arena(self.namespace, self.arena_budget)
                a = self.arena
        return a

    def buffer(self, shape: Any, dtype: Any, timeout: Any, default: float, owner: str) -> Any:
        """An array in this owner's arena (Arena.array): sent, or returned,
        with no copy. Waits for a free slot up to ``timeout`` seconds
        (None: ``default``), cut to what is left of the deadline of the
        request being handled, then raises CallTimeout naming the buffer
        and its ``owner`` (who asked: a client, a service)."""
        where = f"buffer({shape!r}, {dtype!r}) of {owner}"
        wait = _slot_wait(timeout, default, where)
        try:
            return self.own_arena().array(shape, dtype, wait)
        except (CallTimeout, MessageTooLarge) as e:
            raise type(e)(f"{where}: {e}") from None

    def close_arena(self) -> None:
        """Removes the arena's slabs (views of them stay valid until released)."""
        if self.arena is not None:
            self.arena.close()


def _slot_wait(timeout: Any, default: float, where: str) -> float:
    """How long a ``buffer()`` may wait for a free slot: ``timeout`` (a
    positive number of seconds; None: ``default``), no longer than what is
    left before the deadline of the request being handled (as calls made
    in a handler are; context.py). An arena whose receivers hold every slot
    would otherwise keep the maker waiting for ever."""
    if timeout is None:
        timeout = default
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidCallArgument(f"timeout of {where} must be a positive number of seconds, got {timeout!r}")
    left = context.remaining()
    return float(timeout) if left is None else max(0.0, min(float(timeout), left))


def _unlink_all(slabs: dict) -> None:
    for ss in slabs.values():
        for slab in ss:
            shm.unlink(slab.shm_name)


# Slab readers keep this many slabs of other processes mapped (LRU).
_READ_LIMIT = 64


class SlabReader:
    """The receiver's side: slabs of other processes, opened by name and kept
    open, and the views of their slots that messages carry. A location that
    is corrupt or out of range, a slot that moved on, or a slab that is gone
    raises DeserializationError and is counted in ``dropped``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segs: dict[str, Any] = {}
        # Slabs already read from, with their geometry: slab name -> (segment,
        # slot bytes, slots, offset of slot 0). Payloads naming their slots
        # are read in place without Python (shm.oob_buffers); a slab is
        # added here once a location in it checked out (view_at).
        self.known: dict[str, tuple] = {}
        self.dropped = 0

    def segment(self, shm_name: str) -> Any:
        """The slab ``shm_name`` mapped (None if there is no such slab)."""
        seg = self._segs.get(shm_name)
        if seg is not None:
            return seg
        with self._lock:
            seg = self._segs.get(shm_name)
            if seg is None:
                try:
                    seg = shm.WordSegment(shm_name, 0, shm.OPEN_ONLY, f"arena slab {shm_name}")
                except SageCommError:
                    return None
                self._segs[shm_name] = seg
                while len(self._segs) > _READ_LIMIT:
                    self._forget(next(iter(self._segs)))
            return seg

    def view(self, loc: Location) -> Any:
        """A read-only SlotView of ``loc``'s buffer, holding the holder the
        sender gave this receiver (released with the view's last reference)."""
        return self.view_at(*loc)

    def view_at(self, slab: str, slot: int, gen: int, offset: int, length: int) -> Any:
        """:meth:`view` of a location given field by field (what a frame carries)."""
        try:
            geometry = _geometry(slab) if isinstance(slab, str) and slab.startswith("/" + shm.PREFIX) else None
            if geometry is None:
                raise ValueError(f"{slab!r} is not an arena slab")
            slot_bytes, slots = geometry
            base = _words_bytes(slots) + slot * slot_bytes
            if not (0 <= slot < slots and offset == base and 0 <= length <= slot_bytes and gen > 0):
                raise ValueError(f"slot {slot} at {offset} ({length} bytes) is not in a slab of {slots} x {slot_bytes}")
            seg = self.segment(slab)
            if seg is None:
                raise ValueError(f"slab {slab} is gone (its owner died or removed it)")
            if not seg.slot_check(_WORDS * slot, gen):
                w = seg.word_load(_WORDS * slot)
                raise ValueError(f"slot {slot} of {slab} moved on (generation {w >> _GEN_SHIFT}, not {gen})")
            view = shm.SlotView(seg, offset, length, True, _WORDS * slot, gen)
            if slab not in self.known:
                with self._lock:
                    if self._segs.get(slab) is seg:  # (not let go of meanwhile)
                        self.known[slab] = (seg, slot_bytes, slots, _words_bytes(slots))
            return view
        except (ValueError, TypeError, SageCommError) as e:
            self.dropped += 1
            raise DeserializationError(f"a buffer of a message cannot be read from the arena: {e}") from None

    def let_go(self, loc: Location | tuple, reader_pid: int) -> None:
        """Takes away the holder a sender gave ``reader_pid`` at ``loc`` (for a
        message that was never sent): that receiver's pid off the slot's list,
        then one holder fewer, if the slot is still at its generation.
        ``loc``: a Location, or its fields as shm.hold_slot gives them."""
        slab, slot, gen = loc[0], loc[1], loc[2]
        seg = self.segment(slab)
        if seg is None:
            return  # the slab is gone: nothing held
        seg.slot_release(_WORDS * slot, gen, reader_pid)

    def prune(self) -> None:
        """Lets go of slabs whose owner died (so shm.gc() can remove them)."""
        with self._lock:
            for name in [n for n, s in self._segs.items() if not shm.process_alive(s.stats()["creator_pid"], 0)]:
                self._forget(name)

    def _forget(self, name: str) -> None:
        # Off the known map first: a payload naming the slab then opens it again.
        self.known.pop(name, None)
        self._segs.pop(name).release()


def fill(fills: list) -> None:
    """Copies in the buffers :meth:`Arena.place` left for later (``fills``),
    once the message naming their slots is sent."""
    pending = iter(fills)
    try:
        for whole, word, buf, offset in pending:
            whole.fill_slot(word, buf, offset)
    finally:  # a KeyboardInterrupt between two: no reader may wait on a slot never filled
        for whole, word, buf, offset in pending:
            whole.fill_slot(word, buf, offset)


# This process's reader of other processes' slabs (one, shared by every ring).
READERS = SlabReader()
