"""nested.replace_nested: the walk into a message's containers, models and
dataclasses (pure logic; its two users are tested on real services in
test_zero_copy.py)."""

from __future__ import annotations

import dataclasses

import pydantic
import pytest

from sage_ray_comm.nested import DEPTH, any_nested, replace_nested


def _upper(v):
    return v.upper() if type(v) is bytes else v


class Msg(pydantic.BaseModel, frozen=True):
    name: str
    body: bytes


@dataclasses.dataclass(frozen=True)
class Box:
    body: bytes
    tags: tuple = ()


def test_replaces_leaves_in_containers_and_rebuilds_only_what_holds_them():
    kept = [b"y", 1]
    value = ({"a": [b"x", 2], "k": kept}, "s")
    out = replace_nested(value, _upper)
    assert out == ({"a": [b"X", 2], "k": [b"Y", 1]}, "s")
    assert value == ({"a": [b"x", 2], "k": [b"y", 1]}, "s") and kept == [b"y", 1]  # nothing given was changed
    unchanged = {"n": [1, 2], "t": (3.0, None)}
    assert replace_nested(unchanged, _upper) is unchanged


def test_frozen_models_and_dataclasses_get_a_shallow_copy():
    m = Msg(name="n", body=b"b")
    box = Box(b"c", tags=(b"t",))
    out_m, out_box = replace_nested([m, box], _upper)
    assert out_m == Msg(name="n", body=b"B") and m.body == b"b"
    assert out_box == Box(b"C", tags=(b"T",)) and box == Box(b"c", tags=(b"t",))
    assert type(out_m) is Msg and type(out_box) is Box


def test_depth_width_and_field_choice_limit_the_walk():
    deep = b"x"
    for _ in range(DEPTH):
        deep = [deep]
    assert replace_nested(deep, _upper) == [[[[b"X"]]]]
    assert replace_nested([deep], _upper) == [deep]  # one level too deep: passed by
    wide = [b"x"] * 40
    assert replace_nested(wide, _upper, width=32) is wide
    assert replace_nested(wide, _upper, width=40) == [b"X"] * 40
    m = Msg(name="n", body=b"b")
    assert replace_nested(m, _upper, fields=lambda t: ()) is m
    assert replace_nested(m, _upper, fields=lambda t: ("body",)).body == b"B"


@pytest.mark.parametrize("value", [1, "s", None, 2.5])
def test_plain_values_are_never_given_to_the_leaf_function(value):
    assert replace_nested(value, lambda v: ("seen", v)) is value
    assert replace_nested([value], lambda v: ("seen", v)) == [value]


def test_a_leaf_at_the_top_is_given_to_the_leaf_function():
    assert replace_nested(b"x", _upper) == b"X"
    assert replace_nested(bytearray(b"x"), lambda v: ("seen", bytes(v))) == ("seen", b"x")


def test_the_search_sees_exactly_the_leaves_the_rewrite_replaces():
    deep = b"x"
    for _ in range(DEPTH):
        deep = [deep]
    m = Msg(name="n", body=b"b")
    for value, kw in [
        (deep, {}),  # at the depth limit: found
        ([deep], {}),  # one level too deep: not
        ([b"x"] * 40, {"width": 32}),  # too wide: not
        ([b"x"] * 40, {"width": 40}),
        (m, {"fields": lambda t: ()}),  # its fields not looked into
        ({"m": m, "n": [1, 2]}, {}),
        ({"n": [1, 2], "s": "text"}, {}),  # no leaf at all
    ]:
        found = any_nested(value, lambda v: type(v) is bytes, **kw)
        assert found == (replace_nested(value, _upper, **kw) is not value), value
