"""Every error sage_ray_comm raises, in one hierarchy.

::

    SageCommError
     ├── QueueError                      a shared-memory queue could not do what was asked
     │    ├── QueueEmpty                 (also queue.Empty)  nothing to get before the timeout
     │    ├── QueueFull                  (also queue.Full)   no room to put before the timeout
     │    ├── QueueClosed                close() was called; puts fail, gets drain then fail
     │    ├── QueueNotFound              no segment by that name on this node
     │    ├── QueueExists                create-only open of a name that is taken
     │    ├── WrongNode                  a SageQueueRef used on another machine
     │    ├── QueueCorrupted             the segment's header or a frame failed validation
     │    ├── IncompatibleSegment        not a ring, or another layout version
     │    ├── InvalidQueueArgument       (also ValueError)  bad name, size or timeout
     │    └── SharedMemoryError          (also OSError)     a system call failed
     ├── MessageTooLarge                 (also ValueError)  can never fit; names both sizes
     └── SerializationError              a payload could not be pickled
          └── DeserializationError       a received payload could not be unpickled

Each message says what went wrong and where: the queue, the namespace, the
sizes. Catch :class:`SageCommError` to catch them all; catch ``queue.Empty`` /
``queue.Full`` to treat a :class:`~sage_ray_comm.SageQueue` like any queue.
"""

from __future__ import annotations

import queue as _stdlib_queue

__all__ = [
    "SageCommError",
    "QueueError",
    "QueueEmpty",
    "QueueFull",
    "QueueClosed",
    "QueueNotFound",
    "QueueExists",
    "WrongNode",
    "QueueCorrupted",
    "IncompatibleSegment",
    "InvalidQueueArgument",
    "SharedMemoryError",
    "MessageTooLarge",
    "SerializationError",
    "DeserializationError",
]


class SageCommError(Exception):
    """Root of every error raised by sage_ray_comm.

    >>> from sage_ray_comm import SageQueue, SageCommError
    >>> try:
    ...     SageQueue("jobs").get(timeout=0.1)
    ... except SageCommError as e:
    ...     print(type(e).__name__)
    QueueEmpty
    """


class QueueError(SageCommError):
    """A shared-memory queue could not do what was asked."""


class QueueEmpty(QueueError, _stdlib_queue.Empty):
    """Nothing arrived before the timeout (or ``block=False`` and the queue is empty)."""


class QueueFull(QueueError, _stdlib_queue.Full):
    """No room for the message before the timeout (or ``block=False`` and no room)."""


class QueueClosed(QueueError):
    """The queue was closed: puts are refused, gets return what is left, then raise this."""


class QueueNotFound(QueueError):
    """No shared-memory segment with that name exists on this node."""


class QueueExists(QueueError):
    """A create-only open found the name taken."""


class WrongNode(QueueError):
    """A :class:`~sage_ray_comm.SageQueueRef` was opened on a machine other than its own."""


class QueueCorrupted(QueueError):
    """The segment's header or a frame failed validation (random bytes, a foreign writer)."""


class IncompatibleSegment(QueueError):
    """The segment is not a sage_ray_comm ring, or uses another layout version."""


class InvalidQueueArgument(QueueError, ValueError):
    """A queue name, size or timeout that can never work."""


class SharedMemoryError(QueueError, OSError):
    """A system call on the shared-memory segment failed."""


class MessageTooLarge(SageCommError, ValueError):
    """The message can never fit: its size exceeds the largest frame the ring takes."""


class SerializationError(SageCommError):
    """A payload could not be pickled."""


class DeserializationError(SerializationError):
    """A received payload could not be unpickled. The frame is consumed; the queue stays usable."""
