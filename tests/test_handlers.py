"""``@service_function(writable=True)``'s copies (handlers.py), as pure
logic: which arrays are copied, and what is left as it came. The real path
(arrays read in place from another process's arena) is tested in
test_zero_copy.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydantic

from sage_ray_comm.handlers import WRITABLE_DEPTH, _writable


def _received(n: int = 4) -> np.ndarray:
    a = np.arange(n, dtype=np.float64)
    a.flags.writeable = False  # as an array read in place from a slot arrives
    return a


class Frozen(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True, frozen=True)
    image: np.ndarray
    label: str


@dataclasses.dataclass(frozen=True, slots=True)
class Slotted:
    image: np.ndarray
    n: int


def test_read_only_arrays_are_copied_wherever_a_message_holds_them():
    a = _received()
    msg = {"batch": [Frozen(image=a, label="x"), Slotted(a, 1)], "pair": (a, 2)}
    out = _writable(msg)
    arrays = [out["batch"][0].image, out["batch"][1].image, out["pair"][0]]
    for got in arrays:
        assert got.flags.writeable and np.array_equal(got, a) and not np.shares_memory(got, a)
    assert type(out["batch"][0]) is Frozen and out["batch"][0].label == "x"
    assert type(out["batch"][1]) is Slotted and out["batch"][1].n == 1
    assert type(out["pair"]) is tuple
    # The message received is left as it came: its model still holds the read-only view.
    assert msg["batch"][0].image is a and msg["batch"][1].image is a


def test_a_message_with_nothing_to_copy_is_passed_as_it_is():
    writable = np.ones(3)
    msg = [{"a": writable, "b": "s"}, Frozen(image=writable, label="y")]
    assert _writable(msg) is msg
    assert _writable(msg[1]) is msg[1]


def test_the_search_ends_at_its_depth():
    """A structure that refers to itself ends the walk instead of recursing."""
    loop: list = [_received()]
    loop.append(loop)
    out = _writable(loop)
    assert out[0].flags.writeable
    deep: list = [_received()]
    for _ in range(WRITABLE_DEPTH):
        deep = [deep]
    assert _writable(deep) is deep  # below WRITABLE_DEPTH levels: left read-only
