"""Messages: the envelope users see, and the compact frames that travel.

:class:`Message` is a pydantic v2 model. It is validated where it enters the
system from user code (``Message(...)``, ``bus.route_message``). A handler
that declares a ``message`` parameter receives one built from the frame.

>>> from sage_ray_comm import Message, MessageType
>>> m = Message(type=MessageType.REQUEST, receiver="calculator", function="add", payload=[1, 2])
>>> m.type, m.receiver
(<MessageType.REQUEST: 'request'>, 'calculator')
>>> Message(type="nonsense")                         # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
pydantic_core._pydantic_core.ValidationError: 1 validation error for Message

On the wire a call is a plain tuple (see ``Request``), pickled once; the
envelope is built only for handlers that ask for it.
"""

from __future__ import annotations

import enum
import itertools
import os
import time
import uuid
from typing import Any, Dict, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Message", "MessageType", "CommunicationPattern"]


class MessageType(str, enum.Enum):
    """What a message is for."""

    REQUEST = "request"
    RESPONSE = "response"
    ERROR = "error"
    EVENT = "event"
    COMMAND = "command"
    HEARTBEAT = "heartbeat"
    # The seed's names for two of the above.
    NOTIFICATION = "notification"
    BROADCAST = "broadcast"


class CommunicationPattern(str, enum.Enum):
    """How a message is routed."""

    REQUEST_RESPONSE = "request_response"
    POINT_TO_POINT = "point_to_point"
    PUBLISH_SUBSCRIBE = "publish_subscribe"
    LOAD_BALANCED = "load_balanced"


# Message ids: a per-process prefix plus a counter is unique and ~20x cheaper
# than uuid4() per message.
_ID_PREFIX = f"{uuid.uuid4().hex[:12]}-{os.getpid():x}-"
_ids = itertools.count(1)


def new_message_id() -> str:
    """A process-unique, cluster-unique (random prefix) message id."""
    return _ID_PREFIX + str(next(_ids))


class Message(BaseModel):
    """The message envelope.

    Fields: ``id``, ``type``, ``sender``, ``receiver`` (service name),
    ``function``, ``payload`` (any picklable object), ``correlation_id`` (the
    request a response answers), ``timestamp`` (epoch seconds), ``headers``,
    ``ttl`` (seconds from ``timestamp``) and ``deadline`` (epoch seconds; the
    earlier of the two wins, see :attr:`expires_at`).

    >>> Message(type="event", sender="sensor-1", payload={"t": 21.5}).type
    <MessageType.EVENT: 'event'>
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", use_enum_values=False)

    id: str = Field(default_factory=new_message_id)
    type: MessageType = MessageType.REQUEST
    sender: Optional[str] = None
    receiver: Optional[str] = None
    function: Optional[str] = None
    payload: Any = None
    correlation_id: Optional[str] = None
    timestamp: float = Field(default_factory=time.time)
    headers: Dict[str, str] = Field(default_factory=dict)
    ttl: Optional[float] = Field(default=None, gt=0)
    deadline: Optional[float] = None
    # The seed kept the payload's routing topic on events.
    topic: Optional[str] = None

    @property
    def expires_at(self) -> Optional[float]:
        """Epoch seconds after which the message is dropped unhandled (None: never)."""
        ends = [d for d in (self.deadline, self.timestamp + self.ttl if self.ttl else None) if d is not None]
        return min(ends) if ends else None

    def is_expired(self, now: Optional[float] = None) -> bool:
        """True once :attr:`expires_at` has passed."""
        exp = self.expires_at
        return exp is not None and (now if now is not None else time.time()) > exp


class Request(NamedTuple):
    """A call or event as it travels: one pickled tuple, no pydantic."""

    op: int  # OP_* below
    cid: int  # correlation id, unique per reply ring
    function: str
    args: Any  # tuple, or a SegmentBlob holding (args, kwargs)
    kwargs: Optional[dict]
    reply_to: Optional[str]  # reply ring name (same bus namespace), None for send/event
    deadline: Optional[float]  # epoch seconds
    sender: Optional[str]
    headers: Optional[dict]
    service: str


class Reply(NamedTuple):
    cid: int
    status: int  # ST_* below
    value: Any


OP_CALL = 1  # request-response
OP_SEND = 2  # point-to-point, no reply
OP_EVENT = 3  # a published event for a subscriber method

ST_OK = 0
ST_OK_BLOB = 1  # value is a SegmentBlob of the result
ST_ERROR = 2  # value is an ErrorInfo tuple


class ErrorInfo(NamedTuple):
    code: str  # one of the ERR_* below
    type_name: str
    message: str
    traceback: str
    exc_pickle: Optional[bytes]  # the original exception, if it pickled
    extra: Any = None


ERR_REMOTE = "remote"  # the handler raised
ERR_FUNCTION = "function_not_found"
ERR_VALIDATION = "validation"
ERR_TIMEOUT = "timeout"
ERR_SERIALIZATION = "serialization"  # the result could not be pickled
ERR_DESERIALIZATION = "deserialization"  # the arguments could not be unpickled by the replica
ERR_UNAVAILABLE = "unavailable"


def envelope(req: Request, now: Optional[float] = None) -> Message:
    """The Message a handler's ``message`` parameter receives.

    Built with validation: pydantic's Rust validator (about 2 us) is an order
    of magnitude cheaper than ``model_construct`` (about 30 us, pure Python),
    as ``benchmarks/service_bench.py`` measures.
    """
    payload = req.args[0] if isinstance(req.args, tuple) and len(req.args) == 1 else req.args
    return Message(
        id=new_message_id(),
        type=MessageType.EVENT if req.op == OP_EVENT else MessageType.REQUEST,
        sender=req.sender,
        receiver=req.service,
        function=req.function,
        payload=payload,
        correlation_id=str(req.cid),
        timestamp=now if now is not None else time.time(),
        headers={str(k): str(v) for k, v in (req.headers or {}).items()},
        ttl=None,
        deadline=req.deadline,
        topic=(req.headers or {}).get("topic"),
    )
