"""Values nested in a message, replaced a few levels down.

One walk serves two jobs that must look into the same shapes: a handler's
writable copies of the read-only arrays it received (handlers.py), and the
large ``bytes`` a message carries, wrapped so that they travel out-of-band
(bigbytes.py; pickle never asks about an exact ``bytes``, so they cannot
be caught while pickling, and the search for them, :func:`any_nested`,
runs on every message). Both look into lists, tuples, dicts and the fields
of pydantic models and dataclasses, and both leave the value they were
given alone: a container or model that holds a replaced value is rebuilt
(a shallow copy for a model), the rest is shared.

The walk runs on every call's arguments and result, so what a type is
(plain, container, model, leaf) is worked out once per type.

>>> from sage_ray_comm.nested import replace_nested
>>> replace_nested({"a": [1, b"x"]}, lambda v: v.upper() if type(v) is bytes else v)
{'a': [1, b'X']}
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = [
    "DEPTH",
    "FIELDS",
    "LEAF",
    "MAPPING",
    "PLAIN",
    "PLAIN_KIND",
    "SEQUENCE",
    "TYPES_MAX",
    "WIDTH",
    "all_fields",
    "any_nested",
    "kind",
    "replace_nested",
]

DEPTH = 4  # levels looked into: an argument's dict, its list, the model in it, the model's field
WIDTH = 32  # where given: longer containers are passed by (a long list is not walked per message)
PLAIN: frozenset[type] = frozenset({str, int, float, bool, complex, type(None)})  # hold nothing to replace

# What a type is to the walk.
PLAIN_KIND, SEQUENCE, MAPPING, FIELDS, LEAF = range(5)
_KINDS: dict[type, int] = {**dict.fromkeys(PLAIN, PLAIN_KIND), list: SEQUENCE, tuple: SEQUENCE, dict: MAPPING}
TYPES_MAX = 4096  # types remembered (classes made per cell in a notebook must not grow it without bound)
_FIELD_NAMES: dict[type, tuple] = {}


def kind(t: type) -> int:
    """What ``t`` is to the walk: PLAIN_KIND, SEQUENCE (exact list or
    tuple), MAPPING (exact dict), FIELDS (a pydantic model or dataclass) or
    LEAF (anything else, given to the leaf function)."""
    k = _KINDS.get(t)
    if k is None:
        k = FIELDS if dataclasses.is_dataclass(t) or hasattr(t, "__pydantic_fields__") else LEAF
        if len(_KINDS) < TYPES_MAX:
            _KINDS[t] = k
    return k


def all_fields(t: type) -> tuple:
    """The field names of a dataclass or pydantic model class (a model's
    extra values are not fields)."""
    names = _FIELD_NAMES.get(t)
    if names is None:
        if dataclasses.is_dataclass(t):
            names = tuple(f.name for f in dataclasses.fields(t))
        else:
            names = tuple(getattr(t, "__pydantic_fields__", ()))
        if len(_FIELD_NAMES) < TYPES_MAX:
            _FIELD_NAMES[t] = names
    return names


def replace_nested(
    value: Any,
    leaf: Callable[[Any], Any],
    depth: int = DEPTH,
    width: int | None = None,
    fields: Callable[[type], tuple] = all_fields,
) -> Any:
    """``value`` with ``leaf(x)`` in place of each leaf ``x`` in it (a value
    that is no plain scalar, container, model or dataclass) for which
    ``leaf`` returns another object, looked for up to ``depth`` levels down;
    ``value`` itself when nothing was replaced. Containers longer than
    ``width`` (if given) are not looked into, and of a model or dataclass
    only the fields ``fields(its class)`` names."""
    k = kind(type(value))
    if k == LEAF:
        return leaf(value)
    if k == PLAIN_KIND or depth == 0 or (width is not None and k != FIELDS and len(value) > width):
        return value
    if k == SEQUENCE:
        pairs: Any = enumerate(value)
    elif k == MAPPING:
        pairs = value.items()
    else:  # (a model made with model_construct may lack a field)
        pairs = ((name, getattr(value, name, None)) for name in fields(type(value)))
    changed = {}
    for key, x in pairs:
        if type(x) not in PLAIN:
            n = replace_nested(x, leaf, depth - 1, width, fields)
            if n is not x:
                changed[key] = n
    if not changed:
        return value
    if k == SEQUENCE:
        items = list(value)
        for i, n in changed.items():
            items[i] = n
        return type(value)(items)
    if k == MAPPING:
        return {**value, **changed}
    out = copy.copy(value)
    for name, n in changed.items():
        object.__setattr__(out, name, n)  # past a frozen dataclass's or model's guard: it is our own copy
    return out


def any_nested(
    value: Any,
    test: Callable[[Any], bool],
    depth: int = DEPTH,
    width: int | None = None,
    fields: Callable[[type], tuple] = all_fields,
) -> bool:
    """Whether ``test(x)`` holds for a leaf ``x`` of ``value`` that
    :func:`replace_nested`, given the same limits, would give its leaf
    function: the search before a rewrite, which rebuilds nothing."""
    t = type(value)
    k = _KINDS.get(t)  # kind() inlined for the types seen before: this runs on every message
    if k is None:
        k = kind(t)
    if k == LEAF:
        return test(value)
    if k == PLAIN_KIND or depth == 0:
        return False
    if k == SEQUENCE:
        items: Any = value
    elif k == MAPPING:
        items = value.values()
    else:
        items = [getattr(value, name, None) for name in fields(t)]
    if width is not None and k != FIELDS and len(items) > width:
        return False
    for x in items:  # noqa: SIM110 (a plain loop: any(<generator>) costs more on this per-message path)
        if type(x) not in PLAIN and any_nested(x, test, depth - 1, width, fields):
            return True
    return False
