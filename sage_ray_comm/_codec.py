"""The payload codec: pickle protocol 5, with out-of-band buffers, as Ray
pickles. Part of the wire format (``_wire`` re-exports it): SageQueue frames
and the bodies of request and reply frames are encoded here.

A payload is plain ``pickle`` where the receiver can import what it names,
and Ray's cloudpickle (by value) where it cannot: classes, models and
dataclasses defined in ``__main__``, lambdas, closures. Contiguous buffers
(numpy arrays, bytearrays) travel out-of-band, aligned, copied once.

>>> parts, kind = encode_payload({"a": 1}, "example")
>>> kind == KIND_PICKLE, decode_payload(parts[0], kind, "example")
(True, {'a': 1})
"""

from __future__ import annotations

import copyreg
import io
import itertools
import pickle
import sys
import threading
from typing import Any

from . import arena, arrays, byvalue, loans, shm, tensors
from .arena import ARENA_MIN_BYTES, HELD_MIN_BYTES
from .errors import DeserializationError, SerializationError

__all__ = [
    "ARENA_MIN_BYTES",
    "KIND_PICKLE",
    "KIND_PICKLE_OOB",
    "KIND_RAW",
    "abandon",
    "big_buffers",
    "decode_oob",
    "decode_payload",
    "dumps",
    "encode_payload",
    "holds_no_buffers",
    "names_main",
    "release_located",
    "unpickle_error",
]

# Ring frame kinds of SageQueue payloads (the binding encodes 1 and 2 itself:
# queue.py checks it agrees).
KIND_RAW = 1  # put_bytes: the payload is the caller's bytes
KIND_PICKLE = 2  # pickle protocol 5, no out-of-band buffers
KIND_PICKLE_OOB = 3  # pickle protocol 5 plus out-of-band buffers (numpy...)


# KIND_PICKLE_OOB payload: header, buffer lengths, pickle, then each buffer at
# a 16-byte aligned offset (so numpy views of it are aligned), or in its
# place the record of an arena slot that holds it. csrc/oob.hpp alone lays it
# out (shm.oob_frame, shm.hold_slot, shm.location_record) and reads it
# (shm.oob_buffers).
# Out-of-band buffers totalling less than this are cheaper in-band.
_OOB_MIN = 1024


# Plain pickle names classes and functions by module; one defined in a script
# or a notebook is "__main__", which in the receiving process is another file
# (Ray's default_worker.py). Such a pickle contains these bytes, after a
# STACK_GLOBAL opcode (protocol 4+ writes every reference to a module-level
# name with it). Looking for that one byte first is a memchr: the full search
# runs only for pickles that name some global (measured: +0.04 us for a
# request frame, against +0.24 us for `b"__main__" in data` on every one).
_MAIN = b"__main__"
_STACK_GLOBAL = pickle.STACK_GLOBAL[0]
# Above this size, searching the pickle costs more than looking at the object
# (measured: 340 us to search a 1 MiB pickle for __main__): a graph of builtin
# types only cannot name __main__, and needs no search at all.
_SCAN_MAX = 4096
_ATOMS = frozenset({bytes, str, int, float, bool, type(None), bytearray, complex, memoryview})
_CONTAINERS = frozenset({tuple, list, set, frozenset})
_WALK_BUDGET = 10_000  # objects looked at before giving up and searching the bytes


def _builtin_only(obj: Any) -> bool:
    """Whether ``obj`` is made of builtin types only (exact types, so a
    subclass defined anywhere does not pass), within a budget of objects."""
    todo, seen = [obj], 0
    while todo:
        x = todo.pop()
        seen += 1
        if seen > _WALK_BUDGET:
            return False
        t = type(x)
        if t in _ATOMS:
            continue
        if t in _CONTAINERS:
            todo.extend(x)
        elif t is dict:
            todo.extend(x.keys())
            todo.extend(x.values())
        else:
            return False
    return True


def names_main(obj: Any, data: bytes) -> bool:
    """Whether the plain pickle ``data`` of ``obj`` refers to ``__main__``
    (the caller has seen a STACK_GLOBAL byte in it)."""
    if len(data) > _SCAN_MAX and _builtin_only(obj):
        return False
    return _MAIN in data


def dumps(obj: Any, bufs: list | None = None, table: Any = None) -> bytes:
    """Pickles ``obj`` as Ray would: by reference where the receiver can import
    it (plain ``pickle``, the fast path), by value (Ray's cloudpickle) where it
    cannot: classes, models and dataclasses defined in ``__main__`` (a script
    or a notebook), lambdas, closures and local functions.

    The receiver always uses plain ``pickle.loads``. ``bufs``, if given,
    collects the out-of-band buffers (pickle protocol 5). ``table``, if given
    (:func:`dispatch_table`), pickles by this library's reducers (arrays.py,
    tensors.py): a small array whose bytes go inside the pickle took 1.6 us
    to pickle and 1.7 to unpickle by them, 4.5 and 2.8 by numpy's own.

    >>> import pickle
    >>> pickle.loads(dumps(lambda x: x + 1))(1)
    2
    """
    try:
        if table is None:
            data = pickle.dumps(obj, protocol=5, buffer_callback=None if bufs is None else bufs.append)
        else:
            data = _dumps_with(table, obj, bufs)
        if _STACK_GLOBAL not in data or not names_main(obj, data):
            return data
    except (pickle.PicklingError, AttributeError, TypeError):
        pass  # a lambda, a local function: cloudpickle may still do it
    return _dumps_by_value(obj, bufs)


_TABLE: dict | None = None
_TABLE_FOR: tuple = (False, False, -1)  # (numpy, torch) reducers in _TABLE; the size of copyreg's table


def dispatch_table() -> dict | None:
    """This library's pickler's dispatch table: copyreg's reducers, then
    numpy's and torch's (arrays.py, tensors.py). None while neither module
    is imported (then plain ``pickle.dumps`` does). Nothing is registered
    with ``copyreg``: other picklers in the process are untouched.

    One plain dict, made again when copyreg's table grows: the pickler
    looks up in it the type of every object it has no code of its own for,
    and a ChainMap over copyreg's answered in Python, a miss (the common
    case) in about 1 us (a dict: 0.1). (A reducer copyreg replaces for a
    type it already had is not seen.)

    >>> import numpy as np
    >>> dispatch_table()[np.ndarray] is arrays.reduce_array
    True
    """
    global _TABLE, _TABLE_FOR
    modules = sys.modules
    now = ("numpy" in modules, "torch" in modules, len(copyreg.dispatch_table))
    if now != _TABLE_FOR:
        mine, torch = arrays.reducers(), tensors.reducers()
        own = {**mine, **torch}
        _TABLE = {**copyreg.dispatch_table, **own} if own else None
        # A module another thread is still importing has no types yet: look again next time.
        _TABLE_FOR = (bool(mine), bool(torch), now[2])
    return _TABLE


class _Kept:
    """A thread's pickler with a dispatch table (arrays.py, tensors.py), kept: making a
    Pickler and its BytesIO per message cost more than pickling a small one
    (1.1 us against 0.4)."""

    __slots__ = ("bufs", "busy", "out", "pickler", "table")

    def __init__(self, table: Any, in_band: bool) -> None:
        self.table = table
        self.busy = False
        self.bufs: list = []
        self.out = io.BytesIO()
        self.pickler = pickle.Pickler(self.out, protocol=5, buffer_callback=None if in_band else self.bufs.append)
        self.pickler.dispatch_table = table


_KEPT = threading.local()
# A kept pickler is made anew after a pickle larger than this (its BytesIO
# keeps its largest size).
_KEEP_OUT_BYTES = 1 << 20


def _dumps_with(table: Any, obj: Any, bufs: list | None) -> bytes:
    """``obj`` pickled with ``table`` by this thread's kept pickler; its
    buffers out-of-band into ``bufs``, or, with ``bufs`` None, into the
    pickle (each kind has a pickler of its own)."""
    kind = "in_band" if bufs is None else "oob"  # this thread's kept pickler of that kind
    k = getattr(_KEPT, kind, None)
    if k is None or k.table is not table:
        k = _Kept(table, bufs is None)
        setattr(_KEPT, kind, k)
    elif k.busy:  # pickling runs user code, which may pickle: a fresh pickler then
        out = io.BytesIO()
        p = pickle.Pickler(out, protocol=5, buffer_callback=None if bufs is None else bufs.append)
        p.dispatch_table = table
        p.dump(obj)
        return out.getvalue()
    k.busy = True
    out = k.out
    try:
        out.seek(0)
        out.truncate()
        k.pickler.dump(obj)
        if bufs is not None:
            bufs += k.bufs
        data = out.getvalue()
    finally:
        k.bufs.clear()
        k.pickler.clear_memo()  # the memo holds what it pickled: arrays, and their slots
        k.busy = False
    if len(data) > _KEEP_OUT_BYTES:
        setattr(_KEPT, kind, None)
    return data


def _dumps_by_value(obj: Any, bufs: list | None) -> bytes:
    if bufs is not None:
        bufs.clear()  # the plain attempt may have handed out buffers already
    return byvalue.dumps_by_value(obj, bufs)


# How many items of a value big_buffers looks at (a long list is not walked per message).
_BIG_LOOK = 32


def big_buffers(value: Any, least: int = HELD_MIN_BYTES) -> bool:
    """Whether a value has a buffer for the arena: itself, or one of its
    items (a tuple, list or dict of them), of ``least`` bytes or more (by
    default HELD_MIN_BYTES: from there one that is a whole slot goes by its
    location)."""
    items = value.values() if type(value) is dict else value if type(value) in (tuple, list) else (value,)
    for v in itertools.islice(items, _BIG_LOOK):
        n = len(v) if type(v) is bytes else getattr(v, "nbytes", 0)
        if type(n) is int and n >= least:
            return True
    return False


# Types that hold no buffer a pickle would hand out-of-band (bytes pickle in-band).
_SCALARS = frozenset({str, int, float, bool, bytes, type(None)})


def holds_no_buffers(value: Any, depth: int = 3) -> bool:
    """Whether ``value`` surely holds no array or other out-of-band buffer:
    a plain scalar (str, int, float, bool, bytes, None), or a short tuple,
    list or dict, a message model or a dataclass made of such values, looked
    into up to ``depth`` levels. False means "perhaps": the caller then
    pickles to find out. This is the cheap answer that saves that pickling
    for the usual small event."""
    t = type(value)
    if t in _SCALARS:
        return True
    if depth == 0:
        return False
    if t is dict:
        items: Any = value.values()
    elif t is tuple or t is list:
        items = value
    elif hasattr(t, "__pydantic_fields__") or hasattr(t, "__dataclass_fields__"):
        items = getattr(value, "__dict__", None)
        # Extra and private values of a model pickle with it; slotted dataclasses have no __dict__.
        if (
            type(items) is not dict
            or getattr(value, "__pydantic_extra__", None)
            or getattr(value, "__pydantic_private__", None)
        ):
            return False
        items = items.values()
    else:
        return False
    if len(items) > _BIG_LOOK:
        return False
    return all(holds_no_buffers(v, depth - 1) for v in items)


def encode_payload(
    obj: Any,
    label: str,
    arena: Any = None,
    reader_pid: int = 0,
    timeout: float | None = None,
    placed: list | None = None,
    fills: list | None = None,
) -> tuple[list, int]:
    """Pickles ``obj`` (protocol 5, see :func:`dumps`). Contiguous buffers (numpy arrays,
    bytearrays, PickleBuffers) stay out-of-band, so they are copied once,
    straight into the ring; or, with an ``arena`` (arena.py), those of
    ARENA_MIN_BYTES or more go into a slot of it, and the payload carries
    their location: once into the arena, and read in place by the receiver
    (``reader_pid``: who lets go of them; ``timeout``: how long to wait for a
    slot). A buffer that already is a whole slot (HELD_MIN_BYTES or more)
    is not copied at all.
    ``placed`` collects the locations, for the caller to abandon if the
    payload is never sent (:func:`abandon`). ``fills``, if given, collects
    the copies into slots instead of making them: the caller makes them
    (arena.fill) right after it sent the payload, while its reader already
    reads them."""
    bufs: list = []
    try:
        # dumps() inlined: this runs twice per call (request and reply).
        try:
            table = dispatch_table()
            if table is None:
                data = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
            else:  # numpy or torch is imported: our reducers (arrays.py, tensors.py)
                data = _dumps_with(table, obj, bufs)
        except (pickle.PicklingError, AttributeError, TypeError):
            data = _dumps_by_value(obj, bufs)
        else:
            if _STACK_GLOBAL in data and names_main(obj, data):
                data = _dumps_by_value(obj, bufs)
    except Exception as e:  # pickling runs user code: anything can come out
        raise SerializationError(
            f"cannot pickle a {type(obj).__module__}.{type(obj).__qualname__} for {label}: {type(e).__name__}: {e}"
        ) from e
    if not bufs:
        return [data], KIND_PICKLE
    try:
        raws = [b.raw() for b in bufs]
    except BufferError:
        # A non-contiguous buffer: let pickle copy everything in-band.
        return [dumps(obj)], KIND_PICKLE
    total = biggest = 0
    for r in raws:
        n = r.nbytes
        total += n
        if n > biggest:
            biggest = n
    if total < _OOB_MIN:  # tiny: the frame header costs more
        return [dumps(obj, table=table)], KIND_PICKLE
    if arena is not None and biggest >= HELD_MIN_BYTES:
        raws = _locate(raws, arena, reader_pid, timeout, placed, fills)
    return shm.oob_frame(data, raws), KIND_PICKLE_OOB


def _locate(
    raws: list, arena: Any, reader_pid: int, timeout: float | None, placed: list | None, fills: list | None
) -> list:
    """``raws`` with each large buffer replaced by its location record (bytes)."""
    out = []
    done: list = []
    try:
        for r in raws:
            n = r.nbytes
            if n < HELD_MIN_BYTES:
                out.append(r)
                continue
            held = shm.hold_slot(r, reader_pid)  # an array received, or made in an arena: its own slot
            if held is not None:
                record, fields = held
                done.append(fields)
                out.append(record)
                # Sent without a copy: the sender's array must not change what the receiver sees.
                flags = getattr(r.obj, "flags", None)
                if flags is not None and getattr(flags, "writeable", False):
                    flags.writeable = False
                continue
            if n < ARENA_MIN_BYTES or not arena.fits(n):
                if n >= ARENA_MIN_BYTES:
                    arena.too_big(n)
                out.append(r)  # copied with the frame
                continue
            sent = r.obj.data if type(r.obj) is shm.BytesBuffer else r.obj if type(r.obj) is bytes else None
            view = loans.kept_view(sent) if sent is not None else None  # large bytes received and sent on
            loc = arena.hold(view, reader_pid) if view is not None else None
            if loc is None:
                loc = arena.place(r, reader_pid, timeout, fills)
            done.append(loc)
            if sent is not None:
                loans.note_sent(loc.slab, loc.slot, loc.gen, sent)  # a reply naming this slot gets them back
            out.append(shm.location_record(*loc))
    except BaseException:
        abandon([(loc, reader_pid) for loc in done])
        raise
    if placed is not None:
        placed.extend((loc, reader_pid) for loc in done)
    return out


def abandon(placed: list) -> None:
    """Lets go of the holders taken for a payload that was never sent:
    ``placed`` as :func:`encode_payload` filled it: (location, or its fields
    as shm.hold_slot gives them; receiver pid)."""
    for loc, reader_pid in placed:
        arena.READERS.let_go(loc, reader_pid)


def unpickle_error(e: BaseException, payload: Any, label: str) -> DeserializationError:
    # A buffer that cannot be read surfaces as numpy's vague BufferError; say its cause too.
    cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
    return DeserializationError(
        f"could not unpickle a {len(payload)}-byte message from {label}: {type(e).__name__}: {e}{cause} "
        "(the message was consumed; the queue is still usable)"
    )


def decode_payload(payload: Any, kind: int, label: str) -> Any:
    try:
        if kind == KIND_PICKLE:
            return pickle.loads(payload)
        if kind == KIND_RAW:
            return payload  # already a bytes object
        if kind == KIND_PICKLE_OOB:
            return decode_oob(memoryview(payload))
    except Exception as e:  # unpickling runs user code: anything can come out
        raise unpickle_error(e, payload, label) from e
    raise DeserializationError(f"message of unknown kind {kind} ({len(payload)} bytes) from {label}")


def decode_oob(view: memoryview) -> Any:
    data, buffers = shm.oob_buffers(view, arena.READERS.known)
    return pickle.loads(data, buffers=[_in_slot(b) if type(b) is tuple else b for b in buffers])


def release_located(view: memoryview) -> int:
    """Lets go of the arena slots an out-of-band payload names, without
    unpickling anything: for a request skipped unread (its caller cancelled
    it first). How many it let go of; bad records are counted by the reader."""
    n = 0
    for b in shm.oob_buffers(view, arena.READERS.known)[1]:
        if type(b) is tuple:
            try:
                b = _in_slot(b)
            except DeserializationError:
                continue
        n += type(b) is shm.SlotView  # dropping the view lets go of its holder
    return n


def _in_slot(fields: tuple) -> Any:
    """The view of the arena slot a location record names, given by its
    fields (slab, slot, generation, offset, length): a slab not read from
    before, or a record that does not check out (arena.READERS says why)."""
    return arena.READERS.view_at(*fields)
