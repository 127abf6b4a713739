"""SageQueue: a named multi-producer, multi-consumer queue in shared memory.

Processes on one node that open the same (namespace, name) share one ring in
``/dev/shm``. Waits sleep on futexes in the segment (no polling), the GIL is
released in every wait and copy, and a process SIGKILLed mid-put or mid-get
does not wedge the others.

>>> from sage_ray_comm import SageQueue
>>> with SageQueue("jobs", namespace="demo") as q:
...     q.put({"id": 1})
...     q.get(timeout=1)
{'id': 1}

Any process on the node reopens it by name, from a pickled SageQueue, or from
a :class:`SageQueueRef` (small and picklable, e.g. for a Ray actor)::

    ref = q.get_reference()
    actor.consume.remote(ref)        # inside: q = ref.get_queue()

The interface follows ``queue.Queue``: ``put``/``get`` with ``block`` and
``timeout``, ``*_nowait``, ``qsize``, ``empty``, ``full``; ``QueueEmpty`` and
``QueueFull`` subclass ``queue.Empty`` and ``queue.Full``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import struct
import time
import weakref
from typing import Any, Iterable, Optional

from . import _core, shm
from .errors import (
    DeserializationError,
    InvalidQueueArgument,
    QueueEmpty,
    QueueFull,
    QueueNotFound,
    SerializationError,
    WrongNode,
)

__all__ = ["SageQueue", "SageQueueRef", "DEFAULT_MAXSIZE", "destroy_queue"]

DEFAULT_MAXSIZE = 1 << 20  # bytes of ring, as in the seed

# Frame kinds (stored in the ring's frame header).
KIND_RAW = _core.KIND_RAW  # put_bytes: the payload is the caller's bytes
KIND_PICKLE = _core.KIND_PICKLE  # pickle protocol 5, no out-of-band buffers
KIND_PICKLE_OOB = 3  # pickle protocol 5 plus out-of-band buffers (numpy...)

# KIND_PICKLE_OOB payload: header, buffer lengths, pickle, then each buffer at
# a 16-byte aligned offset (so numpy views of it are aligned).
_OOB_HEAD = struct.Struct("<4sIQ")  # magic, buffer count, pickle length
_OOB_MAGIC = b"SQ5B"
_ALIGN = 16
_ZEROS = bytes(_ALIGN)
# Out-of-band buffers totalling less than this are cheaper in-band.
_OOB_MIN = 1024


def _timeout_for(block: bool, timeout: Optional[float]) -> Optional[float]:
    if not block:
        return 0.0
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or timeout != timeout:
            raise InvalidQueueArgument(f"'timeout' must be a number of seconds or None, got {timeout!r}")
        if timeout < 0:
            raise InvalidQueueArgument("'timeout' must be a non-negative number")
    return timeout


def _pad(n: int) -> int:
    return (-n) % _ALIGN


# Plain pickle names classes and functions by module; one defined in a script
# or a notebook is "__main__", which in the receiving process is another file
# (Ray's default_worker.py). Such a pickle contains these bytes, after a
# STACK_GLOBAL opcode (protocol 4+ writes every reference to a module-level
# name with it). Looking for that one byte first is a memchr: the full search
# runs only for pickles that name some global (measured: +0.04 us for a
# request frame, against +0.24 us for `b"__main__" in data` on every one).
_MAIN = b"__main__"
_STACK_GLOBAL = pickle.STACK_GLOBAL[0]
_Frame = _core.Frame  # a frame Ring.get_object leaves to Python
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


def _names_main(obj: Any, data: bytes) -> bool:
    """Whether the plain pickle ``data`` of ``obj`` refers to ``__main__``
    (the caller has seen a STACK_GLOBAL byte in it)."""
    if len(data) > _SCAN_MAX and _builtin_only(obj):
        return False
    return _MAIN in data


def dumps(obj: Any, bufs: Optional[list] = None) -> bytes:
    """Pickles ``obj`` as Ray would: by reference where the receiver can import
    it (plain ``pickle``, the fast path), by value (Ray's cloudpickle) where it
    cannot: classes, models and dataclasses defined in ``__main__`` (a script
    or a notebook), lambdas, closures and local functions.

    The receiver always uses plain ``pickle.loads``. ``bufs``, if given,
    collects the out-of-band buffers (pickle protocol 5).

    >>> import pickle
    >>> pickle.loads(dumps(lambda x: x + 1))(1)
    2
    """
    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=None if bufs is None else bufs.append)
        if _STACK_GLOBAL not in data or not _names_main(obj, data):
            return data
    except (pickle.PicklingError, AttributeError, TypeError):
        pass  # a lambda, a local function: cloudpickle may still do it
    return _dumps_by_value(obj, bufs)


def _dumps_by_value(obj: Any, bufs: Optional[list]) -> bytes:
    from ray import cloudpickle  # ray is a dependency; imported only when needed

    if bufs is not None:
        bufs.clear()  # the plain attempt may have handed out buffers already
    return cloudpickle.dumps(obj, protocol=5, buffer_callback=None if bufs is None else bufs.append)


def _encode(obj: Any, label: str) -> tuple[list, int]:
    """Pickles ``obj`` (protocol 5, see :func:`dumps`). Contiguous buffers (numpy arrays,
    bytearrays, PickleBuffers) stay out-of-band, so they are copied once,
    straight into the ring."""
    bufs: list = []
    try:
        # dumps() inlined: this runs twice per call (request and reply).
        try:
            data = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
        except (pickle.PicklingError, AttributeError, TypeError):
            data = _dumps_by_value(obj, bufs)
        else:
            if _STACK_GLOBAL in data and _names_main(obj, data):
                data = _dumps_by_value(obj, bufs)
    except Exception as e:  # pickling runs user code: anything can come out
        raise SerializationError(
            f"cannot pickle a {type(obj).__module__}.{type(obj).__qualname__} for {label}: "
            f"{type(e).__name__}: {e}"
        ) from e
    if not bufs:
        return [data], KIND_PICKLE
    try:
        raws = [b.raw() for b in bufs]
    except BufferError:
        # A non-contiguous buffer: let pickle copy everything in-band.
        return [dumps(obj)], KIND_PICKLE
    if sum(r.nbytes for r in raws) < _OOB_MIN:
        return [dumps(obj)], KIND_PICKLE  # tiny: the frame header costs more
    head = _OOB_HEAD.pack(_OOB_MAGIC, len(raws), len(data))
    lens = struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    parts: list = [head, lens, data]
    offset = len(head) + len(lens) + len(data)
    for r in raws:
        p = _pad(offset)
        if p:
            parts.append(_ZEROS[:p])
            offset += p
        parts.append(r)
        offset += r.nbytes
    return parts, KIND_PICKLE_OOB


def _unpickle_error(e: Exception, payload: Any, label: str) -> DeserializationError:
    return DeserializationError(
        f"could not unpickle a {len(payload)}-byte message from {label}: {type(e).__name__}: {e} "
        "(the message was consumed; the queue is still usable)"
    )


def _decode(payload: Any, kind: int, label: str) -> Any:
    try:
        if kind == KIND_PICKLE:
            return pickle.loads(payload)
        if kind == KIND_RAW:
            return payload  # already a bytes object
        if kind == KIND_PICKLE_OOB:
            return _decode_oob(memoryview(payload))
    except Exception as e:  # unpickling runs user code: anything can come out
        raise _unpickle_error(e, payload, label) from e
    raise DeserializationError(f"message of unknown kind {kind} ({len(payload)} bytes) from {label}")


def _decode_oob(view: memoryview) -> Any:
    n = len(view)
    if n < _OOB_HEAD.size:
        raise ValueError(f"truncated header ({n} bytes)")
    magic, nbufs, plen = _OOB_HEAD.unpack_from(view, 0)
    if magic != _OOB_MAGIC or nbufs > n // 8:
        raise ValueError("bad out-of-band header")
    pos = _OOB_HEAD.size
    lens = struct.unpack_from(f"<{nbufs}Q", view, pos)
    pos += 8 * nbufs
    if pos + plen > n:
        raise ValueError(f"pickle of {plen} bytes overruns the {n}-byte message")
    data = view[pos : pos + plen]
    pos += plen
    buffers = []
    for ln in lens:
        pos += _pad(pos)
        if pos + ln > n:
            raise ValueError(f"buffer of {ln} bytes overruns the {n}-byte message")
        buffers.append(view[pos : pos + ln])
        pos += ln
    return pickle.loads(data, buffers=buffers)


@dataclasses.dataclass(frozen=True)
class SageQueueRef:
    """A small picklable handle to a :class:`SageQueue`.

    Send it to a Ray actor or any process on the same node; there,
    ``ref.get_queue()`` reopens the queue.

    >>> q = SageQueue("results", namespace="demo")
    >>> ref = q.get_reference()
    >>> ref.get_queue().put("hello"); q.get(timeout=1)
    'hello'
    """

    queue_name: str
    namespace: str
    maxsize: int
    creator_pid: int
    node_id: Optional[str]
    host_id: str = ""

    @property
    def name(self) -> str:  # the seed's spelling
        return self.queue_name

    def get_queue(self) -> "SageQueue":
        """Opens the referenced queue in this process (it must still exist)."""
        if self.host_id and self.host_id != shm.host_id():
            raise WrongNode(
                f"queue '{self.queue_name}' (namespace '{self.namespace}') lives on node "
                f"{self.node_id or self.host_id}, not on this one ({shm.current_node_id() or shm.host_id()}): "
                "shared memory does not cross machines"
            )
        return SageQueue(self.queue_name, self.maxsize, auto_cleanup=False, namespace=self.namespace, create=False)


class SageQueue:
    """A named MPMC queue of Python objects or raw bytes in shared memory.

    Args:
        name: the queue's name. Every process on the node that opens the same
            ``name`` in the same ``namespace`` gets the same queue.
        maxsize: bytes of ring (default 1 MiB). One message may use at most
            half of it (``max_message_size``); larger puts raise
            :class:`~sage_ray_comm.MessageTooLarge`. Ignored when the queue
            exists already.
        auto_cleanup: if this handle created the segment, unlink it when the
            handle is released (``close``/``destroy``, context exit, garbage
            collection or interpreter exit).
        namespace: isolates queues of different jobs or buses; default
            ``$SAGE_COMM_NAMESPACE`` or ``"default"``.
        create: if False, open an existing queue only (raise
            :class:`~sage_ray_comm.QueueNotFound` otherwise).
        spin_us: microseconds to spin before sleeping on a futex.

    >>> q = SageQueue("frames", maxsize=8 << 20, namespace="demo")
    >>> import numpy as np
    >>> q.put(np.zeros(1 << 20, dtype=np.uint8))     # copied once into the ring
    >>> q.get().nbytes
    1048576
    """

    def __init__(
        self,
        name: str,
        maxsize: int = DEFAULT_MAXSIZE,
        auto_cleanup: bool = True,
        namespace: Optional[str] = None,
        *,
        create: bool = True,
        spin_us: float = 20.0,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidQueueArgument(f"queue name must be a non-empty string, got {name!r}")
        if namespace is None:
            namespace = shm.default_namespace()
        if not isinstance(maxsize, int) or maxsize <= 0:
            raise InvalidQueueArgument(
                f"maxsize of queue '{name}' must be a positive number of ring bytes, got {maxsize!r}"
            )
        if maxsize > _core.MAX_CAPACITY:
            raise InvalidQueueArgument(
                f"maxsize of queue '{name}' is {maxsize} bytes; the largest ring is {_core.MAX_CAPACITY} bytes"
            )
        self.name = name
        self.namespace = namespace
        self.auto_cleanup = auto_cleanup
        self.shm_name = shm.segment_name(namespace, name)
        self._label = f"queue '{name}' (namespace '{namespace}')"
        mode = _core.OPEN_OR_CREATE if create else _core.OPEN_ONLY
        self._ring = _core.Ring(self.shm_name, maxsize, mode, self._label)
        # put's and get's common cases, callable without pybind11's dispatch.
        self._put_object, self._get_object = self._ring.fast_methods()
        self._ring.set_spin_ns(int(spin_us * 1000))
        self.maxsize = self._ring.capacity
        self.created = self._ring.created
        self._unlinked = False
        # Unlink at release time only if we created it and were asked to.
        self._finalizer = weakref.finalize(
            self, _release, self._ring, self.shm_name if (auto_cleanup and self.created) else None
        )

    # ------------------------------------------------------------- objects
    def put(self, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Puts ``obj`` (pickled, protocol 5). Blocks while the ring is full.

        Raises QueueFull after ``timeout`` seconds (at once if ``block`` is
        False), MessageTooLarge if it can never fit, SerializationError if it
        cannot be pickled, QueueClosed after :meth:`close`.
        """
        t = None if (block and timeout is None) else _timeout_for(block, timeout)
        # The common case is one C call: bytes written raw, or a pickle with
        # no buffers and no globals. It hands back a pickle that names
        # globals, and False for everything else (see Ring.put_object).
        left = self._put_object(obj, t)
        if left is None:
            return
        if left is not False and not _names_main(obj, left):
            self._ring.put(left, KIND_PICKLE, t)  # globals, none from __main__
            return
        parts, kind = _encode(obj, self._label)
        if kind == KIND_PICKLE:
            self._ring.put(parts[0], kind, t)
        else:
            self._ring.put_parts(parts, kind, t)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Removes and returns the next object. Blocks while the queue is empty.

        Raises QueueEmpty after ``timeout`` seconds (at once if ``block`` is
        False), DeserializationError if the message cannot be unpickled (the
        message is consumed and the queue stays usable), QueueClosed once a
        closed queue is drained.
        """
        t = None if (block and timeout is None) else _timeout_for(block, timeout)
        got = self._get_object(t, KIND_PICKLE_OOB)  # pickles are loaded in C
        if type(got) is not _Frame:
            return got
        if got.error is not None:  # never unpickle twice: user code may have side effects
            raise _unpickle_error(got.error, got.payload, self._label) from got.error
        return _decode(got.payload, got.kind, self._label)

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, block=False)``."""
        self.put(obj, block=False)

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(block=False)

    # --------------------------------------------------------------- bytes
    def put_bytes(self, data: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Puts a bytes-like object as one frame, unpickled (copied once)."""
        self._ring.put(data, KIND_RAW, _timeout_for(block, timeout))

    def get_bytes(self, block: bool = True, timeout: Optional[float] = None) -> bytes:
        """Removes the next frame and returns its raw bytes, whatever put it."""
        payload, _kind = self._ring.get(_timeout_for(block, timeout))
        return payload

    # --------------------------------------------------------------- batch
    def put_many(self, items: Iterable[Any], block: bool = True, timeout: Optional[float] = None) -> int:
        """Puts every item in order within one overall ``timeout``; returns the count.

        On QueueFull the items before the failing one are in the queue; the
        exception's ``put_count`` attribute says how many.
        """
        t = _timeout_for(block, timeout)
        deadline = None if t is None else time.monotonic() + t
        n = 0
        for item in items:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self.put(item, True, left)
            except QueueFull as e:
                e.put_count = n  # type: ignore[attr-defined]
                raise
            n += 1
        return n

    def get_many(self, max_items: int, block: bool = True, timeout: Optional[float] = None) -> list:
        """Waits (as :meth:`get`) for the first item, then takes up to
        ``max_items`` in all without waiting again."""
        if max_items < 1:
            raise InvalidQueueArgument(f"max_items must be at least 1, got {max_items}")
        out = [self.get(block, timeout)]
        while len(out) < max_items:
            try:
                out.append(self.get(block=False))
            except QueueEmpty:
                break
        return out

    # -------------------------------------------------------------- status
    def qsize(self) -> int:
        """Messages in the queue, counted in shared memory (all processes' puts)."""
        return self._ring.count()[0]

    def empty(self) -> bool:
        """True if no committed message is waiting."""
        return self.qsize() == 0

    def full(self) -> bool:
        """True if not even a minimal message would fit right now."""
        return self._ring.would_block_put(0)

    @property
    def max_message_size(self) -> int:
        """The largest message (bytes after pickling) this ring accepts."""
        return self._ring.max_message_size

    @property
    def closed(self) -> bool:
        """True once any process called :meth:`close` on this queue."""
        return self._ring.released or self._ring.closed

    def stats(self) -> dict:
        """Counters kept in shared memory: messages and bytes in and out, and more."""
        s = self._ring.stats()
        msgs, nbytes = self._ring.count()
        s.update(name=self.name, namespace=self.namespace, qsize=msgs, queued_bytes=nbytes)
        return s

    def get_stats(self) -> dict:
        """The seed's statistics keys, plus everything in :meth:`stats`."""
        s = self.stats()
        used = s["tail"] - s["head"]
        s.update(
            buffer_size=s["capacity"],
            available_read=used,
            available_write=s["capacity"] - used,
            total_bytes_written=s["bytes_in"],
            total_bytes_read=s["bytes_out"],
            utilization=used / s["capacity"],
            readers=None,
            writers=None,
            ref_count=None,
        )
        return s

    def reset_stats(self) -> None:
        """Zeroes the shared counters (for every process using the queue)."""
        self._ring.reset_stats()

    def get_shared_memory_info(self) -> dict:
        """Where the queue lives: names, path, size, creator."""
        return {
            "original_name": self.name,
            "namespaced_name": self.shm_name.lstrip("/"),
            "namespace": self.namespace,
            "multi_tenant_enabled": True,
            "auto_cleanup": self.auto_cleanup,
            "shm_path": shm.SHM_DIR + self.shm_name,
            "size_bytes": self.maxsize + _core.HEADER_SIZE,
            "capacity": self.maxsize,
            "max_message_size": self.max_message_size,
            "creator_pid": self._ring.stats()["creator_pid"],
            "created_here": self.created,
        }

    def get_reference(self) -> SageQueueRef:
        """A small picklable handle for reopening this queue elsewhere on the node."""
        return SageQueueRef(
            queue_name=self.name,
            namespace=self.namespace,
            maxsize=self.maxsize,
            creator_pid=self._ring.stats()["creator_pid"],
            node_id=shm.current_node_id(),
            host_id=shm.host_id(),
        )

    def unblock(self) -> bool:
        """Skips a frame at the head claimed by a dead producer; True if one was.

        Consumers do this on their own while they wait; this is for tools.
        """
        return self._ring.unblock()

    # ----------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Closes the queue for every process: waiters wake, puts raise
        QueueClosed, gets return what is left and then raise QueueClosed.

        This handle stays mapped (so it can drain); :meth:`release` drops it.
        """
        if not self._ring.released:
            self._ring.close_queue()

    def release(self) -> None:
        """Unmaps this handle (unlinking the segment if ``auto_cleanup`` and we created it)."""
        self._finalizer()

    def unlink(self) -> None:
        """Removes the segment's name: new opens fail, open handles keep working."""
        _core.unlink(self.shm_name)
        self._unlinked = True

    def destroy(self) -> None:
        """The seed's cleanup: close, unlink and release."""
        if not self._ring.released:
            self._ring.close_queue()
        self.unlink()
        self.release()

    def __enter__(self) -> "SageQueue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __reduce__(self):
        # Reattach, never recreate: the receiver joins the same segment.
        return (_reopen, (self.name, self.maxsize, self.namespace))

    def __repr__(self) -> str:
        state = "released" if self._ring.released else ("closed" if self._ring.closed else "open")
        return f"SageQueue({self.name!r}, namespace={self.namespace!r}, maxsize={self.maxsize}, {state})"


def _release(ring: "_core.Ring", unlink_name: Optional[str]) -> None:
    ring.release()
    if unlink_name:
        try:
            _core.unlink(unlink_name)
        except Exception:  # already gone, or interpreter shutting down
            pass


def _reopen(name: str, maxsize: int, namespace: str) -> SageQueue:
    try:
        return SageQueue(name, maxsize, auto_cleanup=False, namespace=namespace, create=False)
    except QueueNotFound as e:
        raise QueueNotFound(
            f"{e} (pid {os.getpid()} received a pickled SageQueue whose segment was already removed)"
        ) from None


def destroy_queue(name: str, namespace: Optional[str] = None) -> bool:
    """Unlinks the named queue's segment; returns False if it did not exist."""
    return _core.unlink(shm.segment_name(namespace or shm.default_namespace(), name))
