"""Property tests of the ring's framing: every size, every wrap-around offset.

A small ring (4 KiB) is driven against an exact model of the byte positions:
frames are 16-byte aligned with a 16-byte header, and a frame that does not
fit before the end of the ring is preceded by a padding record.
"""

from __future__ import annotations

import os
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sage_ray_comm import MessageTooLarge, QueueFull, SageQueue

CAP = 4096
HDR = 16


def need(n: int) -> int:
    return (HDR + n + 15) // 16 * 16


class Model:
    """Where head and tail must be after each operation."""

    def __init__(self) -> None:
        self.head = self.tail = 0
        self.frames: deque = deque()  # (start position, payload)

    def put(self, data: bytes) -> bool:
        nd = need(len(data))
        off = self.tail % CAP
        pad = CAP - off if off + nd > CAP else 0
        if self.tail + pad + nd - self.head > CAP:
            return False
        self.frames.append((self.tail + pad, data))
        self.tail += pad + nd
        return True

    def get(self) -> bytes:
        start, data = self.frames.popleft()
        self.head = start + need(len(data))
        return data


def move_tail_to(q: SageQueue, model: Model, offset: int) -> None:
    """Puts and gets filler frames until the tail sits at `offset` in the ring."""
    while model.tail % CAP != offset:
        cur = model.tail % CAP
        # Never wrap with a filler: stop at the ring's end at the latest.
        d = min((offset - cur) % CAP, CAP - cur, need(q.max_message_size))
        filler = b"f" * (d - HDR)
        assert model.put(filler)
        q.put_bytes(filler, block=False)
        assert q.get_bytes(block=False) == model.get()


settings_ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("offset", range(0, CAP, 16))
def test_wrap_around_at_every_offset(ns, offset):
    with SageQueue("ring", maxsize=CAP, namespace=ns) as q:
        maxp = q.max_message_size
        assert maxp == CAP // 2 - HDR
        model = Model()
        room_to_end = CAP - offset - HDR
        sizes = {0, 1, 15, 16, 17, maxp - 1, maxp}
        sizes |= {s for s in (room_to_end - 1, room_to_end, room_to_end + 1) if 0 <= s <= maxp}
        for size in sorted(sizes):
            move_tail_to(q, model, offset)
            data = os.urandom(size)
            assert model.put(data)
            q.put_bytes(data, block=False)
            st_ = q.stats()
            assert (st_["head"], st_["tail"]) == (model.head, model.tail)
            assert q.get_bytes(block=False) == model.get()


@settings_
@given(offset=st.integers(0, CAP // 16 - 1), size=st.integers(0, CAP // 2 - HDR))
def test_any_size_at_any_offset_round_trips(ns, offset, size):
    with SageQueue(f"r{offset}-{size}", maxsize=CAP, namespace=ns) as q:
        model = Model()
        move_tail_to(q, model, offset * 16)
        data = os.urandom(size)
        q.put_bytes(data, block=False)
        model.put(data)
        assert q.get_bytes(block=False) == model.get()
        st_ = q.stats()
        assert (st_["head"], st_["tail"]) == (model.head, model.tail)


ops = st.lists(
    st.one_of(st.tuples(st.just("put"), st.integers(0, CAP // 2 - HDR)), st.tuples(st.just("get"), st.just(0))),
    min_size=1,
    max_size=60,
)


@settings_
@given(seq=ops)
def test_operation_sequences_match_the_model(ns, seq):
    """put_nowait succeeds exactly when the model says the frame fits; gets
    return exactly what the model holds, in order; counters agree."""
    with SageQueue("seq", maxsize=CAP, namespace=ns) as q:
        model = Model()
        for i, (op, size) in enumerate(seq):
            if op == "put":
                data = bytes([i % 256]) * size
                fits = model.put(data)
                try:
                    q.put_bytes(data, block=False)
                    assert fits, f"put of {size} succeeded but the model has no room"
                except QueueFull:
                    assert not fits, f"put of {size} refused but the model has room"
            elif model.frames:
                assert q.get_bytes(block=False) == model.get()
            st_ = q.stats()
            assert (st_["head"], st_["tail"]) == (model.head, model.tail)
            assert q.qsize() == len(model.frames)


@settings_
@given(size=st.integers(CAP // 2 - HDR + 1, 1 << 16))
def test_oversize_always_refused_without_side_effects(ns, size):
    with SageQueue("big", maxsize=CAP, namespace=ns) as q:
        with pytest.raises(MessageTooLarge):
            q.put_bytes(b"o" * size)
        assert q.stats()["tail"] == 0
