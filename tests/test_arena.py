"""The arena (arena.py) and located buffers (_codec.py): large buffers go
into a shared-memory slot once, are read in place by another process, and
the slot is free again when the last view of it is released. Real processes,
real shared memory, real SIGKILLs."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import signal
import struct
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from _wait import wait_for

from sage_ray_comm import CallTimeout, DeserializationError, InvalidCallArgument, shm
from sage_ray_comm._codec import (
    KIND_PICKLE_OOB,
    abandon,
    decode_oob,
    encode_payload,
)
from sage_ray_comm.arena import ARENA_MIN_BYTES, HELD_MIN_BYTES, READERS, Arena, ArenaOwner, Location
from sage_ray_comm.bigbytes import wrap_big_bytes
from sage_ray_comm.loans import drop_kept, keep_slots, track_sent, untrack_sent

MiB = 1 << 20


def _ns() -> str:
    return f"arena-{uuid.uuid4().hex[:8]}"


def _frame(obj, arena, pid=0, timeout=5.0) -> bytes:
    parts, kind = encode_payload(obj, "test", arena, pid, timeout)
    assert kind == KIND_PICKLE_OOB
    return b"".join(bytes(p) for p in parts)


def _read_in_child(frame: bytes, out, hold) -> None:
    x = decode_oob(memoryview(frame))
    out.put((type(x).__name__, bool(x.flags.writeable), float(x.sum()), os.getpid()))
    hold.wait(60)  # keeps the view until told (or killed)


@pytest.fixture
def arena():
    a = Arena(_ns(), budget=64 * MiB)
    yield a
    a.close()


def test_another_process_reads_the_array_in_place_read_only_and_frees_it(arena):
    x = np.arange(MiB // 8, dtype=np.float64)
    frame = _frame(x, arena)
    assert len(frame) < 4096  # the frame carries where the array is, not the array
    ctx = multiprocessing.get_context("spawn")
    out, hold = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_read_in_child, args=(frame, out, hold))
    p.start()
    assert out.get(timeout=60)[:3] == ("ndarray", False, float(x.sum()))
    assert arena.in_use() == 1  # the child holds its view
    hold.set()
    p.join(30)
    assert p.exitcode == 0 and arena.in_use() == 0  # its views went with it


def test_a_slot_stays_held_while_any_view_of_it_lives(arena):
    x = np.ones(MiB // 8)
    y = decode_oob(memoryview(_frame(x, arena)))
    part = y[10:20]  # a slice keeps the whole slot
    del y
    assert arena.in_use() == 1 and part.sum() == 10
    del part
    assert arena.in_use() == 0


def test_an_echo_sends_the_received_slot_back_without_copying(arena):
    x = np.random.rand(MiB // 8)
    got = decode_oob(memoryview(_frame(x, arena)))
    back = decode_oob(memoryview(_frame(got, arena)))  # sent again: by location, one more holder
    assert arena.stats()["in_use"] == 1 and np.array_equal(back, x)
    assert np.shares_memory(got, back)  # the very same slot
    del got
    assert arena.in_use() == 1
    del back
    assert arena.in_use() == 0


def test_sending_has_value_semantics(arena):
    x = np.zeros(MiB // 8)
    frame = _frame(x, arena)
    x[:] = 7  # after the send: the receiver must not see it
    assert decode_oob(memoryview(frame)).sum() == 0
    made = np.frombuffer(arena.buffer(MiB), dtype=np.float64)  # lives in the arena: sent without a copy
    made[:] = 1
    assert made.flags.writeable
    seen = decode_oob(memoryview(_frame(made, arena)))
    assert not made.flags.writeable  # sent: the sender can no longer change what was seen
    assert arena.in_use() == 1 and seen.sum() == MiB // 8  # the same slot: a copy would take another
    del seen, made
    assert arena.in_use() == 0


def test_bytes_stay_bytes_and_are_let_go_of_at_once(arena):
    b = os.urandom(MiB)
    got = decode_oob(memoryview(_frame((wrap_big_bytes(b), "small"), arena)))
    assert got == (b, "small") and type(got[0]) is bytes
    assert arena.in_use() == 0  # copied out: the slot is free already


def test_large_bytes_received_and_sent_on_go_by_their_slot(arena):
    """While a thread keeps slots (a replica runs a request), bytes it read
    out of a slot and sends on name that slot again: no copy in."""
    b = os.urandom(MiB)
    keep_slots()
    other = Arena(_ns(), budget=4 * MiB)
    try:
        got = decode_oob(memoryview(_frame(wrap_big_bytes(b), arena)))
        assert type(got) is bytes and got == b
        assert arena.in_use() == 1  # kept with the bytes read out of it
        back = decode_oob(memoryview(_frame(wrap_big_bytes(got), other)))
        assert back == b and other.copies == 0 and other.in_use() == 0  # sent by the first slot
        equal = bytes(bytearray(got))  # the same bytes, another object: copied
        assert decode_oob(memoryview(_frame(wrap_big_bytes(equal), other))) == b and other.copies == 1
    finally:
        keep_slots(False)
        other.close()
    assert arena.in_use() == 0  # let go of once the thread stops keeping them


def test_kept_slots_are_let_go_of_by_drop_kept_and_keeping_goes_on(arena):
    keep_slots()
    try:
        decode_oob(memoryview(_frame(wrap_big_bytes(os.urandom(MiB)), arena)))
        assert arena.in_use() == 1
        drop_kept()  # what a reply does once encoded, before it is sent
        assert arena.in_use() == 0
        got = decode_oob(memoryview(_frame(wrap_big_bytes(os.urandom(MiB)), arena)))
        assert type(got) is bytes and arena.in_use() == 1  # still keeping
    finally:
        keep_slots(False)
    assert arena.in_use() == 0


def test_bytes_a_call_sent_come_back_as_the_same_object(arena):
    """While a call is tracked (track_sent), a reply naming the slot its large
    bytes went out in gives back the caller's own object, uncopied."""
    b = os.urandom(MiB)
    token = track_sent()
    try:
        sent = _frame(wrap_big_bytes(b), arena)
        assert decode_oob(memoryview(sent)) is b  # the echo of that slot
        assert arena.in_use() == 0  # and its slot let go of at once
        other = os.urandom(MiB)  # sent in another slot, also while tracked
        assert decode_oob(memoryview(_frame(wrap_big_bytes(other), arena))) is other
    finally:
        untrack_sent(token)
    untracked = os.urandom(MiB)
    got = decode_oob(memoryview(_frame(wrap_big_bytes(untracked), arena)))
    assert got == untracked and got is not untracked  # not tracked: copied out
    assert arena.in_use() == 0


def test_tracking_sent_bytes_nests_and_forgets(arena):
    b = os.urandom(MiB)
    before = sys.getrefcount(b)
    outer = track_sent()
    try:
        first = _frame(wrap_big_bytes(b), arena)
        recorded = sys.getrefcount(b)
        inner = track_sent()  # a nested call: its own record
        try:
            got = decode_oob(memoryview(first))
            own = got is b  # (not in an assert: pytest's rewriting would keep b referenced)
        finally:
            untrack_sent(inner)
    finally:
        untrack_sent(outer)
    del inner  # the token it returned was the outer call's record
    after = sys.getrefcount(b)
    assert got == b and not own  # the outer call's bytes: not this call's, so copied
    assert recorded == before + 1 and after == before  # the record held b, and let go of it
    assert arena.in_use() == 0


def test_a_thread_keeps_only_a_few_slots_for_received_bytes():
    a = Arena(_ns(), budget=32 * MiB)
    keep_slots()
    try:
        got = [decode_oob(memoryview(_frame(wrap_big_bytes(os.urandom(MiB)), a))) for _ in range(12)]
        assert len(got) == 12 and a.in_use() == 8  # the oldest four let go of
    finally:
        keep_slots(False)
        a.close()


def test_small_buffers_stay_in_the_frame(arena):
    x = np.ones(ARENA_MIN_BYTES // 8 - 1)
    frame = _frame(x, arena)
    assert len(frame) > x.nbytes and arena.stats()["slabs"] == 0


@pytest.mark.parametrize("kib", [64, 256])
def test_an_array_made_in_shared_memory_goes_by_location_below_the_copy_threshold(arena, kib):
    """From HELD_MIN_BYTES, a buffer that already is a whole slot is never
    copied (the ring would copy it in and out); a buffer of the same size on
    the heap, or a smaller one, rides the frame."""
    assert HELD_MIN_BYTES <= kib * 1024 < ARENA_MIN_BYTES
    made = arena.array((kib * 128,), "float64")
    made[:] = 5.0
    frame = _frame(made, arena, pid=os.getpid())
    assert len(frame) < 4096 and arena.stats()["copies"] == 0  # a location record, no bytes
    got = decode_oob(memoryview(frame))
    assert got.sum() == 5.0 * kib * 128 and not got.flags.writeable and not made.flags.writeable
    assert len(_frame(np.ones(kib * 128), arena)) > kib * 1024  # heap memory: in the frame
    small = arena.array((HELD_MIN_BYTES // 8 - 1,), "float64")
    assert len(_frame(small, arena)) > small.nbytes  # under the threshold: in the frame
    assert arena.stats()["copies"] == 0
    del got, made, small
    assert arena.in_use() == 0


def test_a_full_arena_waits_for_a_slot_then_times_out():
    a = Arena(_ns(), budget=3 * MiB)  # room for two slots of 1 MiB
    try:
        held = [decode_oob(memoryview(_frame(np.ones(MiB // 8), a))) for _ in range(2)]
        t0 = time.monotonic()
        with pytest.raises(CallTimeout, match="arena"):
            _frame(np.ones(MiB // 8), a, timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 5
        assert a.stats()["waits"] >= 1 and a.in_use() == 2  # nothing was dropped or grown
        del held[0]
        assert decode_oob(memoryview(_frame(np.ones(MiB // 8), a, timeout=0.3))).sum() == MiB // 8
    finally:
        a.close()


def test_a_payload_that_fails_part_way_lets_go_of_its_slots():
    a = Arena(_ns(), budget=3 * MiB)
    try:
        keep = decode_oob(memoryview(_frame(np.ones(MiB // 8), a)))
        with pytest.raises(CallTimeout):  # the first array gets the last slot, the second none
            _frame((np.ones(MiB // 8), np.ones(MiB // 8)), a, timeout=0.2)
        assert a.in_use() == 1  # only `keep`: the first array's slot was let go of
        placed: list = []
        encode_payload(np.ones(MiB // 8), "test", a, 0, 1.0, placed)
        assert a.in_use() == 2
        abandon(placed)
        assert a.in_use() == 1
        del keep
    finally:
        a.close()


def test_the_slots_of_a_receiver_that_died_are_taken_back():
    a = Arena(_ns(), budget=3 * MiB)
    ctx = multiprocessing.get_context("spawn")
    try:
        procs = [ctx.Process(target=_pause) for _ in range(2)]
        # Each child holds one slot, placed for it (its pid is the slot's releaser).
        frames = []
        for p in procs:
            p.start()
        for p in procs:
            frames.append(_frame(np.ones(MiB // 8), a, pid=p.pid))
        assert a.in_use() == 2
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
        # The arena is full of slots held for dead processes: the next send takes one back.
        assert decode_oob(memoryview(_frame(np.ones(MiB // 8), a, timeout=1.0))).sum() == MiB // 8
        assert a.stats()["reclaimed"] >= 1
    finally:
        a.close()


def _pause() -> None:
    signal.pause()


def _spawn_paused(n: int) -> list:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_pause) for _ in range(n)]
    for p in procs:
        p.start()
    return procs


def _kill(p) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)


def test_a_slot_held_by_several_receivers_comes_back_once_every_one_died():
    """As an event to two subscribers: one slot, two holders (each named by
    pid). A live holder keeps it; once both died, the sender takes it back."""
    a = Arena(_ns(), budget=2 * MiB)  # room for one 1 MiB slot
    procs = _spawn_paused(2)
    try:
        local = decode_oob(memoryview(_frame(np.ones(MiB // 8), a, pid=os.getpid())))
        for p in procs:  # sent on to each: one more holder each, no copy
            _frame(local, a, pid=p.pid)
        del local
        assert a.in_use() == 1 and a.stats()["copies"] == 1
        _kill(procs[0])
        with pytest.raises(CallTimeout):  # the other holder lives: its share is not taken
            _frame(np.ones(MiB // 8), a, timeout=0.3)
        _kill(procs[1])
        assert decode_oob(memoryview(_frame(np.full(MiB // 8, 2.0), a, timeout=5.0))).sum() == MiB // 4
        assert a.stats()["reclaimed"] >= 1
    finally:
        for p in procs:
            if p.is_alive():
                _kill(p)
        a.close()


def test_a_message_never_sent_lets_go_of_its_receivers_share_not_the_senders():
    """An array re-sent from a slot this process holds, whose message is then
    abandoned: the receiver's name comes off the slot, so its later death
    takes nothing from the sender, who still reads the slot."""
    a = Arena(_ns(), budget=2 * MiB)
    (p,) = _spawn_paused(1)
    try:
        mine = decode_oob(memoryview(_frame(np.full(MiB // 8, 3.0), a, pid=os.getpid())))
        placed: list = []
        encode_payload(mine, "test", a, p.pid, 5.0, placed)
        abandon(placed)
        _kill(p)
        with pytest.raises(CallTimeout):  # still ours: nothing to take back
            _frame(np.ones(MiB // 8), a, timeout=0.3)
        assert mine.sum() == 3.0 * (MiB // 8)
        del mine
        assert a.in_use() == 0
    finally:
        if p.is_alive():
            _kill(p)
        a.close()


def test_a_new_generation_of_a_slot_starts_with_a_clean_holder_list():
    """A share named for one process but let go of by another leaves that
    name behind when the slot frees; the slot's next generation must not
    inherit it, or that process's death would free a slot in use."""
    a = Arena(_ns(), budget=2 * MiB)  # one slot: the next message reuses it
    procs = _spawn_paused(2)
    try:
        placed: list = []
        encode_payload(np.ones(MiB // 8), "test", a, procs[0].pid, 5.0, placed)  # named for one ...
        view = READERS.view(placed[0][0])
        READERS.view(a.hold(view, procs[1].pid))  # ... and a second share named for the other ...
        del view  # ... both let go of here, not by them
        assert a.in_use() == 0
        mine = decode_oob(memoryview(_frame(np.full(MiB // 8, 5.0), a, pid=os.getpid())))
        for p in procs:
            _kill(p)
        with pytest.raises(CallTimeout):  # nothing of theirs to take back: the slot is ours
            _frame(np.ones(MiB // 8), a, timeout=0.3)
        assert mine.sum() == 5.0 * (MiB // 8)
    finally:
        for p in procs:
            if p.is_alive():
                _kill(p)
        a.close()


def _place_and_hang(ns: str, out) -> None:
    a = Arena(ns, budget=8 * MiB)
    out.put(_frame(np.ones(MiB // 8), a))
    signal.pause()


def test_the_slabs_of_a_sender_that_died_are_collected():
    ns = _ns()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_place_and_hang, args=(ns, out))
    p.start()
    frame = out.get(timeout=60)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert [s for s in shm.list_segments(ns) if "arena" in s.shm_name]
    removed = shm.gc(ns)
    assert any("arena" in s.shm_name for s in removed) and shm.list_segments(ns) == []
    with pytest.raises(DeserializationError, match="gone"):
        decode_oob(memoryview(frame))


def _location_record(frame: bytes) -> tuple[int, int]:
    """Where the one location record of a frame starts, and its length."""
    _magic, nbufs, plen = struct.unpack_from("<4sIQ", frame, 0)
    (ln,) = struct.unpack_from("<Q", frame, 16)
    pos = 16 + 8 * nbufs + plen
    pos += (-pos) % 16
    return pos, ln & ~(1 << 63)


def _make_known(arena) -> None:
    """Reads one buffer of ``arena``'s 1 MiB slab, so that the reader knows
    the slab: later records naming it are checked and read in C++
    (shm.oob_buffers) instead of by arena.READERS.view_at."""
    got = decode_oob(memoryview(_frame(np.zeros(MiB // 8), arena)))
    del got
    assert len([n for n in READERS.known if arena.namespace in n]) == 1


def test_a_known_slab_is_read_in_place_without_python_and_a_new_one_is_opened(arena):
    frame = _frame(np.arange(MiB // 8, dtype=np.float64), arena)
    _data, first = shm.oob_buffers(memoryview(frame), READERS.known)
    assert type(first[0]) is tuple  # a slab never read from: its fields, for view_at to open it
    name, _slot, gen, _offset, length = first[0]
    assert name.startswith("/" + shm.PREFIX) and length == MiB and gen > 0
    view = READERS.view_at(*first[0])
    del view
    frame = _frame(np.arange(MiB // 8, dtype=np.float64), arena)
    _data, then = shm.oob_buffers(memoryview(frame), READERS.known)
    assert type(then[0]) is shm.SlotView and (then[0].shm_name, then[0].length) == (name, MiB)
    assert arena.in_use() == 1
    del then
    assert arena.in_use() == 0  # the view made in C++ lets go of its slot like any other


@pytest.mark.parametrize("known", [False, True], ids=["first-read", "known-slab"])
def test_bad_locations_are_typed_errors_and_counted(arena, known):
    if known:
        _make_known(arena)
    good = _frame(np.ones(MiB // 8), arena)
    pos, _ln = _location_record(good)
    before = READERS.dropped
    slot, gen, offset, length, _nlen = struct.unpack_from("<QQQQH", good, pos)
    cases = {
        "slot past the slab": struct.pack("<Q", 999_999),
        "offset moved": struct.pack("<QQQQ", slot, gen, offset + 4096, length),
        "stale generation": struct.pack("<QQQQ", slot, gen + 1, offset, length),
        "generation zero": struct.pack("<QQ", slot, 0),
        "longer than its slot": struct.pack("<QQQQ", slot, gen, offset, length + 1),
    }
    for patch in cases.values():
        bad = bytearray(good)
        bad[pos : pos + len(patch)] = patch
        with pytest.raises(DeserializationError, match="arena"):
            decode_oob(memoryview(bytes(bad)))
    assert READERS.dropped == before + len(cases)
    assert decode_oob(memoryview(good)).sum() == MiB // 8  # the good one still reads
    assert arena.in_use() == 0


@pytest.mark.parametrize("known", [False, True], ids=["first-read", "known-slab"])
def test_the_location_decoder_survives_fuzzing(arena, known):
    if known:
        _make_known(arena)
    good = _frame(np.ones(MiB // 8), arena)
    pos, ln = _location_record(good)
    rng = random.Random(1234)
    outcomes = {"error": 0, "read": 0}
    for _ in range(3000):
        bad = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            bad[rng.randrange(pos, pos + ln)] = rng.randrange(256)
        try:
            x = decode_oob(memoryview(bytes(bad)))
            outcomes["read"] += 1
            del x
        except (DeserializationError, ValueError, pickle.UnpicklingError):
            outcomes["error"] += 1
    assert outcomes["error"] > 2500  # nearly every mutation is refused, with a typed error
    assert arena.in_use() <= 1  # and none leaves a slot held (the good frame's, unread, at most)


def test_broken_layouts_are_refused_by_name(arena):
    """Each check of the payload's layout (csrc/oob.hpp), with a payload
    that fails it; the located buffer's slot is never taken for them."""
    _make_known(arena)
    good = _frame((np.ones(MiB // 8), np.ones(64)), arena)

    def patched(at: int, fmt: str, *values: int) -> bytes:
        bad = bytearray(good)
        struct.pack_into(fmt, bad, at, *values)
        return bytes(bad)

    cases = {
        "truncated header": good[:15],
        "bad out-of-band header": patched(0, "<4s", b"XXXX"),
        "bad out-of-band header ": patched(4, "<I", len(good) // 8 + 1),  # more buffers than it could list
        f"pickle of {2**40} bytes overruns": patched(8, "<Q", 2**40),
        "buffer of 4096 bytes overruns": patched(16 + 8, "<Q", 4096),  # the last buffer, past the end
        "a buffer location of 10 bytes is truncated": patched(16, "<Q", (1 << 63) | 10),
        "slab name does not match": patched(16, "<Q", (1 << 63) | 40),
    }
    for why, bad in cases.items():
        with pytest.raises(ValueError, match=why.strip()):
            decode_oob(memoryview(bad))
    assert arena.in_use() == 1  # the good frame's holder, unread: none taken for the bad ones
    assert decode_oob(memoryview(good))[0].sum() == MiB // 8


def test_the_layout_decoder_survives_fuzzing(arena):
    """The payload's head and buffer lengths (csrc/oob.hpp parses them),
    mutated or cut short: a ValueError, or pickle's own error for a pickle
    cut wrong; never a read past the payload (the ASan rerun checks that)."""
    _make_known(arena)
    good = _frame((np.ones(MiB // 8), np.ones(64)), arena)
    _magic, nbufs, _plen = struct.unpack_from("<4sIQ", good, 0)
    head = 16 + 8 * nbufs
    rng = random.Random(4321)
    layout = 0
    for i in range(3000):
        bad = bytearray(good)
        if i % 4 == 0:
            bad = bad[: rng.randrange(1, len(good))]
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(min(head, len(bad)))] = rng.randrange(256)
        try:
            x = decode_oob(memoryview(bytes(bad)))
            del x
        except ValueError as e:
            layout += "overruns" in str(e) or "header" in str(e)
        except Exception:  # a pickle cut in the wrong place: pickle's own error
            pass
    assert layout > 2000  # the layout's own checks refuse nearly all of them
    assert arena.in_use() <= 1


def _layout(frame: bytes) -> tuple[bytes, bytes, list[tuple[bool, bytes, int]]]:
    """The layout csrc/oob.hpp draws, read here independently of it: magic,
    pickle, and each item as (a location record?, its bytes, its offset)."""
    magic, nbufs, plen = struct.unpack_from("<4sIQ", frame, 0)
    lens = struct.unpack_from(f"<{nbufs}Q", frame, 16)
    pos = 16 + 8 * nbufs
    pickled = frame[pos : pos + plen]
    pos += plen
    items = []
    for ln in lens:
        pos += (-pos) % 16
        n = ln & ~(1 << 63)
        items.append((bool(ln >> 63), frame[pos : pos + n], pos))
        pos += n
    assert pos == len(frame)  # nothing after the last item
    return magic, pickled, items


@pytest.mark.parametrize("seed", range(3))
def test_the_frame_writer_lays_out_what_an_independent_reader_reads(seed):
    """shm.oob_frame (the sender's side of csrc/oob.hpp) against a reader
    written from the drawing, and against shm.oob_buffers: pickles of every
    size around the joining limit, buffers and location records mixed."""
    rng = random.Random(seed)
    for _ in range(200):
        data = rng.randbytes(rng.choice([0, 1, 15, 17, 300, 4096, 4097, 20000]))
        items: list = []
        fields = []
        for _ in range(rng.randint(0, 5)):
            if rng.random() < 0.5:
                f = ("/" + shm.PREFIX + "s" * rng.randint(0, 40), *(rng.getrandbits(40) for _ in range(4)))
                fields.append(f)
                items.append(shm.location_record(*f))
            else:
                items.append(memoryview(rng.randbytes(rng.choice([1, 16, 1000, 70000]))))
        parts = shm.oob_frame(data, items)
        frame = b"".join(bytes(p) for p in parts)
        magic, pickled, got = _layout(frame)
        assert magic == b"SQ5B" and pickled == data
        assert [(type(i) is bytes, bytes(i)) for i in items] == [(located, b) for located, b, _ in got]
        assert all(pos % 16 == 0 for _, _, pos in got)  # numpy views of a buffer are aligned
        # Nothing large is copied here: each carried buffer, and a large pickle, is a part of its own.
        assert [id(p) for p in parts if type(p) is memoryview] == [id(i) for i in items if type(i) is memoryview]
        assert any(p is data for p in parts) == (len(data) > 4096)
        # The receiver's side reads back the same pickle, buffers and locations.
        pk, bufs = shm.oob_buffers(memoryview(frame), {})
        assert bytes(pk) == data
        assert [b if type(b) is tuple else bytes(b) for b in bufs] == [
            fields.pop(0) if type(i) is bytes else bytes(i) for i in items
        ]


def test_a_slab_name_too_long_for_a_record_is_refused():
    with pytest.raises(ValueError, match="70000 bytes is too long"):
        shm.location_record("x" * 70000, 0, 1, 0, 1)


def test_hold_slot_holds_a_whole_slot_for_its_receiver_and_nothing_else(arena):
    made = arena.array((MiB // 8,), "float64")
    made[:] = 2.0
    # Memory of the process's heap, or part of a slot: not held, the sender copies it.
    assert shm.hold_slot(pickle.PickleBuffer(np.ones(MiB // 8)).raw(), os.getpid()) is None
    assert shm.hold_slot(pickle.PickleBuffer(made[: MiB // 16]).raw(), os.getpid()) is None
    record, loc = shm.hold_slot(pickle.PickleBuffer(made).raw(), os.getpid())
    _pk, (fields,) = shm.oob_buffers(memoryview(b"".join(shm.oob_frame(b"", [record]))), {})
    assert fields == loc and loc[4] == MiB
    del made  # the maker lets go; the holder taken for the receiver keeps the slot
    assert arena.in_use() == 1
    view = READERS.view(Location(*loc))
    assert np.frombuffer(view, dtype=np.float64).sum() == 2.0 * (MiB // 8)
    del view  # the receiver's holder goes with its last view
    assert arena.in_use() == 0


def test_a_slot_released_twice_is_refused_and_counted(arena):
    from sage_ray_comm import _core

    frame = _frame(np.ones(MiB // 8), arena)
    pos, _ln = _location_record(frame)
    slot, gen, offset, length, nlen = struct.unpack_from("<QQQQH", frame, pos)
    name = frame[pos + 34 : pos + 34 + nlen].decode()
    view = READERS.view(Location(name, slot, gen, offset, length))
    seg = READERS.segment(name)
    extra = shm.SlotView(seg, offset, length, True, 2 * slot, gen)  # a second release of the same holder
    stale = _core.stale_releases()
    del view
    assert arena.in_use() == 0
    del extra  # the slot is free already: refused, counted, nothing changes
    assert _core.stale_releases() == stale + 1 and arena.in_use() == 0


def test_an_owner_makes_its_arena_once_whichever_threads_ask_first():
    """A replica's handler threads may send their first large replies at
    once: they must share one arena, not each make one."""
    owner = ArenaOwner()
    owner.namespace = _ns()
    start = threading.Barrier(16)
    got: list = []

    def first_use() -> None:
        start.wait()
        got.append(owner.own_arena())

    threads = [threading.Thread(target=first_use) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len(got) == 16 and all(a is owner.arena for a in got)
    finally:
        owner.close_arena()


@pytest.mark.parametrize(
    "shape, dtype",
    [((-1,), "float64"), (("a",), "float64"), ((2.0,), "f4"), (None, "f4"), ((4,), "nope"), ((2,), object)],
)
def test_a_bad_shape_or_dtype_for_an_array_in_shared_memory_is_a_typed_error(arena, shape, dtype):
    with pytest.raises(InvalidCallArgument, match=r"shape of non-negative ints and a numpy dtype.*got shape"):
        arena.array(shape, dtype)
    assert arena.in_use() == 0  # nothing was taken


def test_arrays_in_shared_memory_take_the_shapes_numpy_takes(arena):
    assert arena.array(5, "uint8").shape == (5,)
    assert arena.array([3, 2], "int16").shape == (3, 2)
    assert arena.array((np.int64(4),), "f4").shape == (4,)
    assert arena.array((0,), "float64").shape == (0,)


# -- filled after sending (arena.fill, csrc/slots.hpp): the sender copies a
# buffer in after the message naming its slot is out, while the reader reads it.


def _unfilled_frame(obj, arena) -> tuple[bytes, list]:
    """The frame of ``obj`` with its large buffer placed but not yet copied in."""
    fills: list = []
    parts, kind = encode_payload(obj, "test", arena, os.getpid(), 5.0, None, fills)
    assert kind == KIND_PICKLE_OOB and len(fills) == 1
    return b"".join(bytes(p) for p in parts), fills


def _read_in_thread(frame: bytes) -> tuple[threading.Thread, dict]:
    got: dict = {}

    def read() -> None:
        try:
            got["x"] = decode_oob(memoryview(frame))
        except BaseException as e:  # handed to the test
            got["error"] = e

    t = threading.Thread(target=read)
    t.start()
    return t, got


@pytest.mark.parametrize("kind", ["bytes", "numpy"])
def test_a_reader_that_starts_before_the_sender_copied_in_gets_every_byte(arena, kind):
    """bytes are copied out as they arrive (read_bytes); an array waits until
    all of it is there before numpy sees the memory. Here the reader is shown
    to be under way (the reads-while-filling count moved) before the copy
    even starts."""
    from sage_ray_comm import _core
    from sage_ray_comm.arena import fill

    src = np.random.default_rng(7).random(4 * MiB // 8)
    frame, fills = _unfilled_frame(wrap_big_bytes(src.tobytes()) if kind == "bytes" else src, arena)
    before = _core.reads_while_filling()
    t, got = _read_in_thread(frame)
    wait_for(lambda: _core.reads_while_filling() > before, 30, "the reader waiting on the slot")
    assert t.is_alive()  # nothing there yet: it waits
    fill(fills)
    t.join(30)
    assert "error" not in got
    if kind == "bytes":
        assert got["x"] == src.tobytes()
    else:
        assert np.array_equal(got["x"], src)
    del got
    assert arena.in_use() == 0


def _place_unfilled_and_hang(ns: str, kind: str, out) -> None:
    a = Arena(ns, budget=8 * MiB)
    x = np.ones(MiB // 8)
    fills: list = []
    parts, _kind = encode_payload(wrap_big_bytes(x.tobytes()) if kind == "bytes" else x, "test", a, 0, 5.0, None, fills)
    out.put(b"".join(bytes(p) for p in parts))
    signal.pause()  # killed before it copies anything in


@pytest.mark.parametrize("kind", ["bytes", "numpy"])
def test_a_sender_killed_before_it_copied_in_is_a_typed_error_not_a_hang(kind):
    from sage_ray_comm._codec import decode_payload

    ns = _ns()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_place_unfilled_and_hang, args=(ns, kind, out))
    p.start()
    try:
        frame = out.get(timeout=60)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        with pytest.raises(DeserializationError, match="writer died before it finished"):
            decode_payload(frame, KIND_PICKLE_OOB, "test")
    finally:
        if p.is_alive():
            _kill(p)
        READERS.prune()  # this process lets go of the dead sender's slab, so gc can take it
        shm.gc(ns)
    assert shm.list_segments(ns) == []


def _release_in_fork_child(conn) -> None:
    frame = conn.recv_bytes()
    x = decode_oob(memoryview(frame))
    total = float(x.sum())
    del x  # lets go of the slot: its name must be this child's pid, not its parent's
    conn.send(total)
    conn.recv()  # lives on until told, so its pid cannot be reused meanwhile


def test_a_fork_child_takes_its_own_name_off_a_slot_when_it_lets_go(arena):
    """Letting go of a slot takes the reader's pid off the slot's holder list.
    The pid is cached (getpid is a system call), so a child forked after its
    parent cached it must still let go under its own pid: a name left behind
    would be taken for a holder while the child lives, and freed for it when
    it dies."""
    x = np.arange(MiB // 8, dtype=np.float64)
    mine = decode_oob(memoryview(_frame(x, arena, pid=os.getpid())))
    del mine  # let go of here: the parent's pid is cached now
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    p = ctx.Process(target=_release_in_fork_child, args=(theirs,))
    p.start()
    try:
        placed: list = []
        parts, _kind = encode_payload(x, "test", arena, p.pid, 5.0, placed)
        loc = placed[0][0]
        seg = READERS.segment(loc.slab)  # the same slab, mapped again
        word = loc.slot * shm.SLOT_WORDS
        names = lambda: [seg.word_load(word + 1 + i) for i in range(shm.SLOT_NAMES)]  # noqa: E731
        assert p.pid in names()
        ours.send_bytes(b"".join(bytes(q) for q in parts))
        assert ours.recv() == float(x.sum())
        assert p.pid not in names() and arena.in_use() == 0
    finally:
        ours.send(None)
        p.join(30)
    assert p.exitcode == 0


def test_the_unfilled_count_is_no_holder_name(arena):
    """A slot's last word counts the bytes still to come, not a holder: the
    taking back of dead holders skips it (a count read as a dead pid would
    free a slot in use), and holders past the names never write into it (a
    pid read as a count would make readers wait for bytes that never come)."""
    from sage_ray_comm.arena import fill

    frame, fills = _unfilled_frame(np.ones(MiB // 8), arena)
    whole, word, _buf, _offset = fills[0]
    seg = READERS.segment(whole.shm_name)  # the same slab, mapped again
    assert seg.word_load(word + shm.SLOT_UNFILLED) == MiB
    assert arena.stats()["reclaimed"] == 0
    assert sum(s.reclaim() for slabs in arena._slabs.values() for s in slabs) == 0  # nothing taken back
    assert arena.in_use() == 1
    fill(fills)
    gen = seg.word_load(word) >> 32
    dead = 2**22 + 17  # above any pid this machine hands out
    for i in range(shm.SLOT_NAMES + 2):  # more holders than names
        assert seg.slot_hold(word, gen, dead + i)
    assert seg.word_load(word + shm.SLOT_UNFILLED) == 0
    assert decode_oob(memoryview(frame)).sum() == MiB // 8  # readable at once: nothing is waited for


def test_an_interrupted_fill_still_fills_the_slots_after_it(arena):
    """A KeyboardInterrupt raised between two buffers' copies: the frame is
    out, so the copies after it are made before the interrupt goes on."""
    from sage_ray_comm.arena import fill

    class Interrupted:
        def fill_slot(self, word, buf, offset):
            raise KeyboardInterrupt

    x = np.arange(MiB // 8, dtype=np.float64)
    frame, fills = _unfilled_frame(x, arena)
    with pytest.raises(KeyboardInterrupt):
        fill([(Interrupted(), 0, b"", 0), *fills])
    assert np.array_equal(decode_oob(memoryview(frame)), x)


# Around csrc/slots.hpp's kFillChunk (64 KiB): fill_slot copies a buffer in
# chunks of it, counting the slot's unfilled word down after each; and around
# csrc/copy.hpp's kStreamMinBytes (8 MiB), from where copies stream past the
# caches, in 1 MiB chunks, 64 bytes a step, after an unaligned head.
_FILL_CHUNK = 64 * 1024
_STREAM_MIN = 8 * MiB


@pytest.mark.parametrize(
    "n", [1, 63, 65, _FILL_CHUNK - 1, _FILL_CHUNK, _FILL_CHUNK + 77, 3 * MiB + 13, _STREAM_MIN, _STREAM_MIN + 77]
)
@pytest.mark.parametrize("at", [0, 3, 16, 4096 + 9])
def test_a_copy_into_shared_memory_is_exact_at_any_size_and_alignment(n, at):
    """Both ways a buffer is copied into shared memory (SlotView.write: before
    the message is sent; fill_slot: after, counting its unfilled word down),
    from a source and to a destination that are not aligned: every byte where
    it belongs, and nothing written outside it."""
    ns = _ns()
    name = shm.segment_name(ns, "copy")
    size = _STREAM_MIN + MiB
    seg = shm.WordSegment(name, size, shm.CREATE_ONLY, "copy test")
    at += 8192  # past the slot words at the start (word SLOT_UNFILLED is counted down below)
    try:
        whole = shm.SlotView(seg, 0, size, False)
        raw = bytearray(os.urandom(n + 5))
        src = memoryview(raw)[5:]  # a source 5 bytes past its allocation: not aligned either
        for way in ("write", "fill_slot"):
            whole.write(b"\xee" * (n + 2 * 64), at)  # a guard pattern around where the copy goes
            if way == "write":
                whole.write(src[1:], at + 64 + 1)
                whole.write(src[:1], at + 64)
            else:
                seg.word_store(shm.SLOT_UNFILLED, n)
                whole.fill_slot(0, src, at + 64)
                assert seg.word_load(shm.SLOT_UNFILLED) == 0  # counted all the way down
            got = bytes(memoryview(whole)[at : at + n + 2 * 64])
            assert got[64 : 64 + n] == bytes(src), way
            assert got[:64] == b"\xee" * 64 and got[64 + n :] == b"\xee" * 64, way
    finally:
        shm.unlink(name)
