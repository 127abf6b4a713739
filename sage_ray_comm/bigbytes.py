"""Large ``bytes`` in a message: found, wrapped so that they travel
out-of-band (into the arena, not through the pickle), and copied out again
on arrival, since a ``bytes`` owns its memory.

Pickle never asks about an exact ``bytes`` (no reducer, no dispatch table),
so the ones a message holds are found before it is pickled, as deep as
nested.py looks: in lists, tuples and dicts of up to nested.WIDTH items,
and in the fields of models and dataclasses that pickle the plain way and
are typed to hold ``bytes`` (or typed loosely, as ``Any``).

>>> from sage_ray_comm.bigbytes import BigBytes, wrap_big_bytes
>>> type(wrap_big_bytes({"img": bytes(1 << 20)})["img"]) is BigBytes
True
"""

from __future__ import annotations

import pickle
import types
import typing
from typing import Any

import pydantic

from . import loans, shm
from .arena import ARENA_MIN_BYTES
from .nested import DEPTH, PLAIN, TYPES_MAX, WIDTH, all_fields, any_nested, replace_nested

__all__ = ["BigBytes", "bytes_out_of", "holds_big_bytes", "wrap_big_bytes"]


class BigBytes:
    """A ``bytes`` argument or result of ARENA_MIN_BYTES or more, wrapped so
    that it pickles out-of-band (into the arena) and unpickles as ``bytes``
    again: a ``bytes`` owns its memory, so the receiver copies it out once."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple:
        # Over a BytesBuffer, not the bytes: a buffer pickle sees as read-only
        # would make the receiver wait for all of it before copying any out.
        buf: Any = shm.BytesBuffer(self.data)  # (the stub cannot say it is a Buffer: pybind11's exports only)
        return bytes_out_of, (pickle.PickleBuffer(buf),)


def bytes_out_of(buf: Any) -> bytes:
    """The receiving side of :class:`BigBytes`: ``buf``'s bytes, copied out
    (a ``bytes`` owns its memory), or, when this thread sent those very bytes
    in the call it is making, its own object (loans.py). Read out of a slot,
    they are kept with it (loans.keep_slots), to be sent on without a copy."""
    in_slot = type(buf) is shm.SlotView  # (a flag: a narrowed SlotView is no Buffer to the type checker)
    if not in_slot:
        return bytes(buf)
    own = loans.own_bytes(buf)
    if own is not None:
        return own
    data = buf.read_bytes()  # copied out as its sender copies it in (arena.fill)
    loans.keep(data, buf)
    return data


def wrap_big_bytes(values: Any) -> Any:
    """``values`` (a tuple or list of arguments, a dict of keyword arguments,
    or one value) with each ``bytes`` of ARENA_MIN_BYTES or more in it
    wrapped in :class:`BigBytes`, looked for as deep as nested.py looks: in
    containers of up to nested.WIDTH items, and in the fields of models and
    dataclasses that pickle the plain way and are typed to hold ``bytes``
    (or typed loosely); the same object when there is none."""
    # Looked for first without rebuilding anything: most messages hold none,
    # and most arguments are a few plain values (answered without a call).
    t = type(values)
    if t is tuple or t is list or t is dict:
        for v in values.values() if t is dict else values:
            if type(v) not in PLAIN:
                break
        else:
            return values
    if holds_big_bytes(values):
        return replace_nested(values, _big_bytes, width=WIDTH, fields=_bytes_fields)
    return values


def holds_big_bytes(value: Any) -> bool:
    """Whether ``value`` holds a ``bytes`` of ARENA_MIN_BYTES or more where
    wrap_big_bytes would wrap it."""
    return any_nested(value, _is_big_bytes, DEPTH, WIDTH, _bytes_fields)


def _is_big_bytes(v: Any) -> bool:
    return type(v) is bytes and len(v) >= ARENA_MIN_BYTES


def _big_bytes(v: Any) -> Any:
    return BigBytes(v) if type(v) is bytes and len(v) >= ARENA_MIN_BYTES else v


_BYTES_FIELDS: dict[type, tuple] = {}
_OBJECT_GETSTATE = getattr(object, "__getstate__", None)  # Python 3.11+; absent before


def _bytes_fields(t: type) -> tuple:
    """The fields of a model or dataclass class that may hold ``bytes`` to
    wrap; none when the class pickles itself (a reducer or __getstate__ of
    its own would see the wrapper, not the ``bytes``). Worked out once per class."""
    names = _BYTES_FIELDS.get(t)
    if names is None:
        getstate = getattr(t, "__getstate__", None)
        plain = (
            t.__reduce_ex__ is object.__reduce_ex__
            and t.__reduce__ is object.__reduce__
            and (getstate is _OBJECT_GETSTATE or getstate is pydantic.BaseModel.__getstate__)
        )
        names = tuple(n for n in all_fields(t) if _may_hold_bytes(t, n)) if plain else ()
        if len(_BYTES_FIELDS) < TYPES_MAX:
            _BYTES_FIELDS[t] = names
    return names


def _may_hold_bytes(t: type, name: str) -> bool:
    pyd = getattr(t, "__pydantic_fields__", None)
    if pyd is not None:
        hint = pyd[name].annotation
    else:
        try:
            hint = typing.get_type_hints(t).get(name, Any)
        except Exception:  # an annotation that cannot be resolved: look into it
            return True
    return _hint_may_hold_bytes(hint)


def _hint_may_hold_bytes(hint: Any) -> bool:
    if hint in PLAIN:  # (pydantic turns bytes given for a str into a str)
        return False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_hint_may_hold_bytes(a) for a in typing.get_args(hint))
    return True
