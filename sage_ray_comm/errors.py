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
     │         └── SharedMemoryFull                          /dev/shm has no room for the segment (ENOSPC)
     ├── ServiceError                    a call to a service failed
     │    ├── ServiceNotFound            (also LookupError) no such service on the bus; lists the known ones
     │    ├── FunctionNotFound           (also LookupError) the service has no such function; lists its functions
     │    ├── ServiceUnavailable         no live replica could take the call (died, stopped, unreachable)
     │    ├── CallTimeout                (also TimeoutError) no reply before the call's timeout or deadline
     │    ├── ValidationError            (also ValueError)  arguments failed the handler's type annotations
     │    ├── InvalidCallArgument        (also ValueError)  a call, send or route_message that can never work:
     │    │                              a bad timeout, a name that is not a string, a message with no receiver
     │    ├── InvalidServiceDefinition   (also ValueError)  a service declared wrong: bad name, timeout,
     │    │                              policy or replica count
     │    ├── ProtocolMismatch           caller and replica run library versions whose wire protocols
     │    │                              differ; names both versions
     │    ├── StreamClosed               the stream was closed, reaped, or its replica restarted
     │    ├── StreamConsumed             another handle is consuming that stream (one consumer at a time)
     │    └── RemoteError                the handler raised; carries the remote type, message and traceback.
     │                                   Where the original type unpickles, the raised error is also an
     │                                   instance of it: ``except ValueError`` still works.
     ├── BusError                        the bus itself could not do what was asked
     │    ├── NameConflict               a different service class is registered under that name
     │    ├── InvalidBusName             (also ValueError)  not 1-100 letters, digits, '_', '.', '-'
     │    ├── InvalidSubscription        (also ValueError)  a bad topic or pattern, a callback that is not
     │    │                              callable, a subscription with nothing to deliver to
     │    └── RouterUnavailable          the bus's router actor cannot be reached or created
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
    "BusError",
    "CallTimeout",
    "DeserializationError",
    "FunctionNotFound",
    "IncompatibleSegment",
    "InvalidBusName",
    "InvalidCallArgument",
    "InvalidQueueArgument",
    "InvalidServiceDefinition",
    "InvalidSubscription",
    "MessageTooLarge",
    "NameConflict",
    "ProtocolMismatch",
    "QueueClosed",
    "QueueCorrupted",
    "QueueEmpty",
    "QueueError",
    "QueueExists",
    "QueueFull",
    "QueueNotFound",
    "RemoteError",
    "RouterUnavailable",
    "SageCommError",
    "SerializationError",
    "ServiceError",
    "ServiceNotFound",
    "ServiceUnavailable",
    "SharedMemoryError",
    "SharedMemoryFull",
    "StreamClosed",
    "StreamConsumed",
    "ValidationError",
    "WrongNode",
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


class SharedMemoryFull(SharedMemoryError):
    """``/dev/shm`` has no room for a new segment (a container's 64 MiB default,
    say). Services fall back to the Ray path for what does not fit."""


class ServiceError(SageCommError):
    """A call to a service failed. Subclasses say how; each names the service and function."""


class ServiceNotFound(ServiceError, LookupError):
    """No service of that name is registered on the bus. The message lists the known services."""


class FunctionNotFound(ServiceError, LookupError):
    """The service exposes no function of that name. The message lists the functions it has."""


class ServiceUnavailable(ServiceError):
    """No live replica could take the call: it died, was stopped, or its node is unreachable."""


class CallTimeout(ServiceError, TimeoutError):
    """No reply arrived before the call's timeout (or the message's deadline passed first)."""


class ValidationError(ServiceError, ValueError):
    """The arguments do not match the handler's type annotations. The message names the field.

    ``errors`` holds pydantic's list of error dicts (``loc``, ``msg``, ``type``).
    """

    def __init__(self, message: str, errors: list | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []

    def __reduce__(self):
        return (type(self), (str(self), self.errors))


class InvalidCallArgument(ServiceError, ValueError):
    """A call, send or ``route_message`` whose arguments can never work: a bad
    timeout, a service or function name that is not a string, an unknown
    pattern, a message with no receiver. Raised before anything is sent."""


class InvalidServiceDefinition(ServiceError, ValueError):
    """A service declared wrong: a bad name, function timeout, policy or
    replica count, or an object ``migrate_service`` cannot serve."""


class ProtocolMismatch(ServiceError):
    """The caller and the replica speak different wire protocol versions (a
    detached service kept running while a caller upgraded the library, or the
    reverse). ``caller_version`` and ``replica_version`` say which."""

    def __init__(self, message: str, caller_version: int | None = None, replica_version: int | None = None) -> None:
        super().__init__(message)
        self.caller_version = caller_version
        self.replica_version = replica_version

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.caller_version, self.replica_version))


class StreamClosed(ServiceError):
    """The replica no longer has this stream: it was closed, reaped after
    its consumer died or went idle, or the replica restarted."""


class StreamConsumed(ServiceError):
    """Another handle is already consuming this stream. A stream has one
    consumer at a time: the first handle that reads from it."""


class RemoteError(ServiceError):
    """The handler raised. ``remote_type``, ``remote_message`` and ``remote_traceback``
    describe the original exception; ``service`` and ``function`` say where.

    When the original exception could be pickled back, the error raised at the
    caller is an instance of both RemoteError and the original type, with the
    original's ``args`` and attributes:

    >>> try:
    ...     client.call("calc", "div", 1, 0)          # doctest: +SKIP
    ... except ZeroDivisionError as e:                # also a RemoteError
    ...     print(e.remote_traceback)
    """

    remote_type: str = ""
    remote_message: str = ""
    remote_traceback: str = ""
    service: str = ""
    function: str = ""

    def __str__(self) -> str:
        if self.remote_type:
            return (
                f"{self.remote_type}: {self.remote_message} "
                f"(raised by {self.service}.{self.function}; remote traceback in .remote_traceback)"
            )
        return super().__str__()


class BusError(SageCommError):
    """The bus itself (its router or registry) could not do what was asked."""


class NameConflict(BusError):
    """A different service class is already registered under that name on this bus."""


class InvalidBusName(BusError, ValueError):
    """A bus name that is not 1-100 letters, digits, '_', '.' or '-'."""


class InvalidSubscription(BusError, ValueError):
    """A bad topic or subscription pattern, a callback that is not callable,
    or a subscription with nothing to deliver its events to."""


class RouterUnavailable(BusError):
    """The bus's router actor could not be reached or created (is Ray running?)."""


class MessageTooLarge(SageCommError, ValueError):
    """The message can never fit: its size exceeds the largest frame the ring takes."""


class SerializationError(SageCommError):
    """A payload could not be pickled."""


class DeserializationError(SerializationError):
    """A received payload could not be unpickled. The frame is consumed; the queue stays usable."""
