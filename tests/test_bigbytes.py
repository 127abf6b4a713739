"""bigbytes: large bytes anywhere a message holds them are found and wrapped
to travel out-of-band, and arrive as equal bytes (pure logic and pickling;
the real path, through a service and its arena, is in test_zero_copy.py)."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pydantic
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_ray_comm.arena import ARENA_MIN_BYTES
from sage_ray_comm.bigbytes import BigBytes, holds_big_bytes, wrap_big_bytes

BIG = bytes(range(256)) * (ARENA_MIN_BYTES // 256)
SMALL = b"small"


class Frame(pydantic.BaseModel):
    data: bytes
    label: str


class Loose(pydantic.BaseModel):
    payload: Any = None


class Typed(pydantic.BaseModel):
    """Fields typed never to hold bytes: not looked into."""

    label: str
    n: int | None = None


class OwnState(pydantic.BaseModel):
    data: bytes

    def __getstate__(self):  # its own pickling would see a wrapper, not bytes: left alone
        return super().__getstate__()


@dataclasses.dataclass
class Blob:
    data: bytes


def _wrapped(value) -> list:
    """The BigBytes in a wrapped value, found the slow way (a pickler that
    reports every object it saves)."""
    found = []

    class Spy(pickle.Pickler):
        def reducer_override(self, obj):
            if type(obj) is BigBytes:
                found.append(obj)
            return NotImplemented

    import io

    Spy(io.BytesIO(), protocol=5).dump(value)
    return found


def test_large_bytes_are_wrapped_wherever_a_message_holds_them():
    for value in [
        BIG,
        (BIG,),
        {"k": BIG},
        ({"a": [BIG, SMALL]},),
        (Frame(data=BIG, label="x"),),
        (Loose(payload={"x": [BIG]}),),
        (Blob(BIG),),
    ]:
        out = wrap_big_bytes(value)
        assert len(_wrapped(out)) == 1, value if not isinstance(value, bytes) else "BIG"
        assert holds_big_bytes(value)
        assert pickle.loads(pickle.dumps(out, protocol=5)) == value


def test_values_without_large_bytes_come_back_as_the_same_object():
    for value in [
        (1, 2),
        {},
        ({"a": [SMALL, 1.5]},),
        (Frame(data=SMALL, label="x"),),
        (Typed(label="a"),),
        (OwnState(data=BIG),),
        ([BIG] * 40,),  # a container too long to look into
        ([[[[[BIG]]]]],),  # deeper than nested.DEPTH
        bytearray(BIG),  # pickles out-of-band by itself
    ]:
        assert wrap_big_bytes(value) is value
        assert not holds_big_bytes(value)


# Messages of containers, models and dataclasses, with large and small bytes
# here and there: the cheap search and the rewrite must always agree.
_LEAVES = st.sampled_from([BIG, SMALL, 1, "s", None, 2.5])
_MESSAGES = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.sampled_from("abcd"), inner, max_size=4),
        inner.map(lambda v: Loose(payload=v)),
        st.sampled_from([BIG, SMALL]).map(lambda b: Frame(data=b, label="l")),
        st.sampled_from([BIG, SMALL]).map(Blob),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_MESSAGES)
def test_the_search_agrees_with_the_rewrite_and_the_round_trip_is_exact(value):
    before = pickle.dumps(value, protocol=5)
    out = wrap_big_bytes(value)
    assert (out is not value) == holds_big_bytes(value)
    assert (len(_wrapped(out)) > 0) == holds_big_bytes(value)
    assert pickle.loads(pickle.dumps(out, protocol=5)) == value
    assert pickle.dumps(value, protocol=5) == before  # the message given is left as it was
