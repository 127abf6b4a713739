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
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, cast

from . import _core, shm
from ._codec import (
    KIND_PICKLE,
    KIND_PICKLE_OOB,
    KIND_RAW,
    decode_payload,
    encode_payload,
    names_main,
    unpickle_error,
)
from .errors import (
    InvalidQueueArgument,
    QueueEmpty,
    QueueFull,
    QueueNotFound,
    WrongNode,
)

__all__ = ["DEFAULT_MAXSIZE", "SageQueue", "SageQueueRef", "destroy_queue"]

DEFAULT_MAXSIZE = 1 << 20  # bytes of ring, as in the original code

# The binding encodes and decodes these two kinds itself (Ring.put_object and
# get_object); the codes must agree with the wire module's.
if (_core.KIND_RAW, _core.KIND_PICKLE) != (KIND_RAW, KIND_PICKLE):
    raise ImportError(
        f"sage_ray_comm._core frame kinds {(_core.KIND_RAW, _core.KIND_PICKLE)} differ from "
        f"_wire's {(KIND_RAW, KIND_PICKLE)}: rebuild the extension (pip install -e .)"
    )
_Frame = _core.Frame  # a frame Ring.get_object leaves to Python


def _timeout_for(block: bool, timeout: float | None) -> float | None:
    if not block:
        return 0.0
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or timeout != timeout:
            raise InvalidQueueArgument(f"'timeout' must be a number of seconds or None, got {timeout!r}")
        if timeout < 0:
            raise InvalidQueueArgument("'timeout' must be a non-negative number")
    return timeout


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
    node_id: str | None
    host_id: str = ""

    @property
    def name(self) -> str:  # the original code's spelling
        return self.queue_name

    def get_queue(self) -> SageQueue:
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
        namespace: str | None = None,
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
        # The frame methods are the ring's own (same arguments): the service
        # layer calls them once per request and reply, and a Python method in
        # between costs about a tenth of a small call.
        self.put_frame = self._ring.put_parts  # type: ignore[method-assign]
        self.get_frame = self._ring.get  # type: ignore[method-assign]
        self.set_spin_ns = self._ring.set_spin_ns  # type: ignore[method-assign]
        self._ring.set_spin_ns(int(spin_us * 1000))
        self.maxsize = self._ring.capacity
        self.created = self._ring.created
        self._unlinked = False
        # Unlink at release time only if we created it and were asked to.
        self._finalizer = weakref.finalize(
            self, _release, self._ring, self.shm_name if (auto_cleanup and self.created) else None
        )

    # ------------------------------------------------------------- objects
    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Puts ``obj`` (pickled, protocol 5). Blocks while the ring is full.

        Raises QueueFull after ``timeout`` seconds (at once if ``block`` is
        False), MessageTooLarge if it can never fit, SerializationError if it
        cannot be pickled, QueueClosed after :meth:`close`.
        """
        t = None if (block and timeout is None) else _timeout_for(block, timeout)
        # The common case is one C call: bytes written raw, or a pickle with
        # no buffers and no globals. It hands back a pickle that names
        # globals, and False for everything else (see Ring.put_object).
        # (put_plain's first step, inlined: a method call more is a tenth of a small put.)
        left = self._put_object(obj, t)
        if left is None:
            return
        if isinstance(left, bytes) and not names_main(obj, left):
            self._ring.put(left, KIND_PICKLE, t)  # globals, none from __main__
            return
        parts, kind = encode_payload(obj, self._label)
        if kind == KIND_PICKLE:
            self._ring.put(parts[0], kind, t)
        else:
            self._ring.put_parts(parts, kind, t)

    def put_plain(self, obj: Any, timeout: float | None = None) -> bool:
        """Puts ``obj`` and returns True when it pickles with no out-of-band
        buffers and names no class of ``__main__`` (the common case: one C
        call); returns False, having put nothing, otherwise. The service
        layer then encodes it itself, its large buffers into its arena,
        wherever in the object they are. Blocks up to ``timeout`` for room.

        >>> q.put_plain({"label": "cat"})  # doctest: +SKIP
        True
        >>> q.put_plain([{"image": np.ones(1 << 20)}])  # doctest: +SKIP
        False
        """
        t = _timeout_for(True, timeout)
        left = self._put_object(obj, t)
        if left is None:
            return True
        if isinstance(left, bytes) and not names_main(obj, left):
            self._ring.put(left, KIND_PICKLE, t)
            return True
        return False

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
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
            raise unpickle_error(got.error, got.payload, self._label) from got.error
        return decode_payload(got.payload, got.kind, self._label)

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, block=False)``."""
        self.put(obj, block=False)

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(block=False)

    # --------------------------------------------------------------- bytes
    def put_bytes(self, data: Any, block: bool = True, timeout: float | None = None) -> None:
        """Puts a bytes-like object as one frame, unpickled (copied once)."""
        self._ring.put(data, KIND_RAW, _timeout_for(block, timeout))

    def get_bytes(self, block: bool = True, timeout: float | None = None) -> bytes:
        """Removes the next frame and returns its raw bytes, whatever put it."""
        payload, _kind = self._ring.get(_timeout_for(block, timeout))
        return cast(bytes, payload)  # bytes: no writable kind was asked for

    # -------------------------------------------------------------- frames
    # For protocols built on the ring (the service layer's request and reply
    # frames): the caller chooses the kind and does its own encoding.
    def put_frame(self, parts: Sequence[Any], kind: int, timeout: float | None = None) -> None:
        """Writes ``parts`` (bytes-like, back to back) as one frame of ``kind``.
        (Each instance binds this straight to its ring's method.)

        ``timeout`` None waits while the ring is full, 0 never waits. Raises
        as :meth:`put` does.

        >>> with SageQueue("frames", namespace="demo") as q:
        ...     q.put_frame([b"ab", b"cd"], 42)
        ...     q.get_frame(timeout=1)
        (b'abcd', 42)
        """
        self._ring.put_parts(parts, kind, timeout)

    def get_frame(self, timeout: float | None = None, writable_kind: int = -1) -> tuple[bytes | bytearray, int]:
        """Removes the next frame and returns ``(payload, kind)``, undecoded.
        Frames of ``writable_kind`` come back as a bytearray (so numpy arrays
        rebuilt on them are writable), others as bytes."""
        return self._ring.get(timeout, writable_kind)

    def set_spin_ns(self, ns: int) -> None:
        """How long a waiting ``get`` spins before it sleeps on the futex, in
        nanoseconds (``spin_us`` at creation). A replica retunes its request
        ring's to the gaps between requests, and a caller its reply ring's
        to how long replies take (spinning.SpinTuner). (Each
        instance binds this straight to its ring's method.)"""
        self._ring.set_spin_ns(ns)

    @property
    def label(self) -> str:
        """How errors name this queue: ``queue 'name' (namespace 'ns')``."""
        return self._label

    # --------------------------------------------------------------- batch
    def put_many(self, items: Iterable[Any], block: bool = True, timeout: float | None = None) -> int:
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

    def get_many(self, max_items: int, block: bool = True, timeout: float | None = None) -> list:
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
        s: dict[str, Any] = dict(self._ring.stats())
        msgs, nbytes = self._ring.count()
        s.update(name=self.name, namespace=self.namespace, qsize=msgs, queued_bytes=nbytes)
        return s

    def get_stats(self) -> dict:
        """The original code's statistics keys, plus everything in :meth:`stats`."""
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
        """The original code's cleanup: close, unlink and release."""
        if not self._ring.released:
            self._ring.close_queue()
        self.unlink()
        self.release()

    def __enter__(self) -> SageQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __reduce__(self):
        # Reattach, never recreate: the receiver joins the same segment.
        return (_reopen, (self.name, self.maxsize, self.namespace))

    def __repr__(self) -> str:
        state = "released" if self._ring.released else ("closed" if self._ring.closed else "open")
        return f"SageQueue({self.name!r}, namespace={self.namespace!r}, maxsize={self.maxsize}, {state})"


def _release(ring: _core.Ring, unlink_name: str | None) -> None:
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


def destroy_queue(name: str, namespace: str | None = None) -> bool:
    """Unlinks the named queue's segment; returns False if it did not exist."""
    return _core.unlink(shm.segment_name(namespace or shm.default_namespace(), name))
