"""sage_ray_comm: communication for services that run as Ray actors.

Same-node traffic goes through a C++ ring buffer in shared memory
(:class:`SageQueue`); everything raises subclasses of :class:`SageCommError`.

>>> from sage_ray_comm import SageQueue
>>> q = SageQueue("jobs", namespace="demo")
>>> q.put([1, 2, 3]); q.get(timeout=1)
[1, 2, 3]
"""

from . import shm
from .errors import (
    DeserializationError,
    IncompatibleSegment,
    InvalidQueueArgument,
    MessageTooLarge,
    QueueClosed,
    QueueCorrupted,
    QueueEmpty,
    QueueError,
    QueueExists,
    QueueFull,
    QueueNotFound,
    SageCommError,
    SerializationError,
    SharedMemoryError,
    WrongNode,
)
from .queue import DEFAULT_MAXSIZE, SageQueue, SageQueueRef, destroy_queue

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "shm",
    "SageQueue",
    "SageQueueRef",
    "DEFAULT_MAXSIZE",
    "destroy_queue",
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
