"""What travels between processes, in one place: codes, named tuples, the
versioned request header, the pickle codec, error encoding, and stream
batches (the names of rings and actors are in ``names.py``). Change "how a
request looks" here and nowhere else.

A request frame (ring kinds ``KIND_REQ`` and ``KIND_REQ_OOB``) is a fixed
binary header, three variable-length strings, padding to 16 bytes, then the
body: the pickled :class:`Request` tuple (``KIND_REQ``), or that pickle with
out-of-band buffers (``KIND_REQ_OOB``, see :func:`encode_payload`)::

    offset  size  field
         0     4  magic b"SQRQ"
         4     2  protocol version (PROTOCOL_VERSION)
         6     2  flags (FLAG_OOB_BODY: the body is KIND_REQ_OOB's layout;
                  FLAG_ARGS_BESIDE: args and kwargs travel beside the frame)
         8     8  correlation id (unique per reply ring)
        16     8  deadline, epoch seconds as float64 (0.0: none)
        24     8  cancellation id (0: none): the call's ticket in its
                  caller's claim table (claims.py) on the ring path, a
                  key the caller can cancel by on the Ray path
        32     8  stream id (0: not a stream)        reserved for streaming
        40     4  stream credit                      reserved for streaming
        44     2  length of reply_to (utf-8)
        46     2  length of function (utf-8)
        48     2  length of the trace context (utf-8; see tracing.py)
        50     2  reserved (0)
        52        reply_to, function, trace context, zero padding, body

The trace context is W3C ``traceparent``/``tracestate`` as ``name:value``
lines (empty when the caller has none). The body repeats it, so the common
path reads no string out of the header.

The header is readable without unpickling anything, so a replica can answer
a request whose arguments fail to unpickle (or that speaks another protocol
version, or whose deadline passed) with a typed error instead of leaving the
caller to time out. The same bytes travel on the Ray path; there, a call
whose arguments hold a large buffer sends them beside the frame, for Ray to
serialize (see :func:`direct_payload`).

>>> req = Request(OP_CALL, 7, "add", (1, 2), None, "rep.1.x", None, None, None, "calc")
>>> parts, kind = encode_request(req, "example")
>>> decode_request(b"".join(bytes(p) for p in parts), kind).function
'add'
"""

from __future__ import annotations

import pickle
import struct
import traceback
from typing import Any, NamedTuple

from ._codec import (
    KIND_PICKLE,
    KIND_PICKLE_OOB,
    KIND_RAW,
    decode_oob,
    decode_payload,
    dumps,
    encode_payload,
    names_main,
    release_located,
    unpickle_error,
)
from .errors import (
    ProtocolMismatch,
)

__all__ = [
    "BESIDE_MIN_BYTES",
    "END_CLOSED",
    "END_CONSUMED",
    "END_DONE",
    "END_ERROR",
    "END_MORE",
    "ERR_CANCELLED",
    "ERR_DESERIALIZATION",
    "ERR_FUNCTION",
    "ERR_PROTOCOL",
    "ERR_REMOTE",
    "ERR_SERIALIZATION",
    "ERR_TIMEOUT",
    "ERR_UNAVAILABLE",
    "ERR_VALIDATION",
    "FLAG_ARGS_BESIDE",
    "FLAG_OOB_BODY",
    "KIND_PICKLE",
    "KIND_PICKLE_OOB",
    "KIND_RAW",
    "KIND_REQ",
    "KIND_REQ_OOB",
    "OP_CALL",
    "OP_EVENT",
    "OP_SEND",
    "PROTOCOL_VERSION",
    "STREAM_ACLOSE",
    "STREAM_ANEXT",
    "STREAM_CLOSE",
    "STREAM_NEXT",
    "ST_ERROR",
    "ST_OK",
    "ST_OK_BLOB",
    "BadRequest",
    "ErrorInfo",
    "Reply",
    "Request",
    "RequestHeader",
    "StreamBatch",
    "StreamOpened",
    "bad_request_reply",
    "cancel_ticket",
    "decode_payload",
    "decode_request",
    "direct_payload",
    "direct_reply",
    "dumps",
    "encode_error",
    "encode_payload",
    "encode_request",
    "error_reply",
    "frame_bytes",
    "frame_kind",
    "names_main",
    "read_direct_reply",
    "release_unread",
    "request_tuple",
    "unpickle_error",
]

# The protocol this build speaks. Bump it whenever the header or the body
# tuples change shape; a caller and a replica that differ get ProtocolMismatch.
# 2: Request gained ``trace``, and the header's trace field is filled.
# 3: the cancellation id is filled (claims.py), and an out-of-band body may
#    carry arena locations instead of buffers (csrc/oob.hpp).
# 4: an arena slot's words name its holders (arena.py): a receiver of
#    version 3 would let go of slots of version 4 at the wrong words.
# 5: numpy arrays pickle as arrays.rebuild_array (a version 4 receiver has no
#    such function).
# 6: a slot's last word counts the bytes its sender has still to copy in
#    (arena.fill): a version 5 receiver would read a slot before it is filled,
#    and take that count for a holder's pid. Large bytes pickle over a
#    shm.BytesBuffer (a version 5 receiver gets them as a bytearray when in-band).
# 7: a call over Ray that its caller cancelled first is answered ERR_CANCELLED
#    (a version 6 caller would fail it with a RemoteError, not cancel it).
PROTOCOL_VERSION = 7

# ---------------------------------------------------------------- frame kinds
# Stored in each ring frame's header. 1-3 are SageQueue's, defined with the
# codec (_codec.py); 8-9 are requests.
KIND_REQ = 8  # request header + pickle
KIND_REQ_OOB = 9  # request header + pickle with out-of-band buffers

# ----------------------------------------------------------- ops and statuses
OP_CALL = 1  # request-response
OP_SEND = 2  # point-to-point, no reply
OP_EVENT = 3  # a published event for a subscriber method

ST_OK = 0
ST_OK_BLOB = 1  # value is a SegmentBlob of the result
ST_ERROR = 2  # value is an ErrorInfo tuple

ERR_REMOTE = "remote"  # the handler raised
ERR_FUNCTION = "function_not_found"
ERR_VALIDATION = "validation"
ERR_TIMEOUT = "timeout"
ERR_SERIALIZATION = "serialization"  # the result could not be pickled
ERR_DESERIALIZATION = "deserialization"  # the arguments could not be unpickled by the replica
ERR_UNAVAILABLE = "unavailable"
ERR_PROTOCOL = "protocol"  # caller and replica speak different PROTOCOL_VERSIONs
ERR_CANCELLED = "cancelled"  # its caller's cancel() came first: never run (the reply of a call over Ray)


# ---------------------------------------------------------------- the tuples
class Request(NamedTuple):
    """A call or event as it travels: one pickled tuple, no pydantic."""

    op: int  # OP_*
    cid: int  # correlation id, unique per reply ring
    function: str
    args: Any  # tuple, or a SegmentBlob holding (args, kwargs)
    kwargs: dict | None
    reply_to: str | None  # reply ring name (same bus namespace), None for send/event
    deadline: float | None  # epoch seconds
    sender: str | None
    headers: dict | None
    service: str
    trace: str | None = None  # W3C trace context, as tracing.encode_carrier writes it


class Reply(NamedTuple):
    """A replica's answer: ``value`` is the result (ST_OK), a SegmentBlob of
    it (ST_OK_BLOB) or an :class:`ErrorInfo` tuple (ST_ERROR)."""

    cid: int
    status: int  # ST_*
    value: Any


class ErrorInfo(NamedTuple):
    """Why a call failed, as the replica saw it."""

    code: str  # ERR_*
    type_name: str
    message: str
    traceback: str
    exc_pickle: bytes | None  # the original exception, if it pickled
    extra: Any = None


class RequestHeader(NamedTuple):
    """The fixed part of a request frame (see the module docstring)."""

    version: int
    flags: int
    cid: int
    deadline: float | None
    cancel_id: int
    stream_id: int
    credit: int
    reply_to: str | None
    function: str
    trace: str | None


# ------------------------------------------------------------------ streams
# A generator function's call opens a stream: the replica answers with a
# StreamOpened, runs nothing yet, and serves fetches of it through these
# reserved functions (the a- forms run on its event loop, for async generators).
STREAM_NEXT = "@stream.next"
STREAM_ANEXT = "@stream.anext"
STREAM_CLOSE = "@stream.close"
STREAM_ACLOSE = "@stream.aclose"
END_MORE = 0  # more may come
END_DONE = 1  # the generator returned
END_ERROR = 2  # it raised: ``error`` is the ErrorInfo
END_CLOSED = 3  # the replica has no such stream (closed, reaped, restarted)
END_CONSUMED = 4  # another consumer holds it


class StreamOpened(NamedTuple):
    """The reply to a generator function's call: where its stream lives."""

    stream_id: str
    instance_id: str
    is_async: bool


class StreamBatch(NamedTuple):
    """The reply to a fetch: the items made, and whether (and how) the stream ended."""

    items: list
    end: int  # END_*
    error: Any = None  # the ErrorInfo tuple (END_ERROR) or a message (END_CLOSED, END_CONSUMED)


# ------------------------------------------------------------ request frames
_REQ_HEAD = struct.Struct("<4sHHQdQQIHHHH")  # see the module docstring
_REQ_MAGIC = b"SQRQ"
_FLAGS = struct.Struct("<H")
FLAG_OOB_BODY = 1  # the body has out-of-band buffers (KIND_REQ_OOB)
FLAG_ARGS_BESIDE = 2  # args and kwargs came beside the frame, for Ray to serialize (see direct_payload)
# An argument this large (bytes, or anything with ``nbytes``: arrays, memoryviews)
# sends a call's arguments over Ray beside the frame, and a reply of bytes this
# large goes to Ray as it is: Ray then serializes them once, not our pickle.
# Ray's own limit for objects it inlines in the call (100 KiB): below it our
# pickle measured faster (64 KiB p50 1.14x a plain Ray call, 1.22x beside).
BESIDE_MIN_BYTES = 100 << 10
_ALIGN_BODY = 16  # the body starts 16-byte aligned, so out-of-band buffers stay aligned
_REQUEST_FIELDS = len(Request._fields)
_make_request = Request._make


class BadRequest(Exception):
    """A request frame whose header decoded but whose body did not (or that
    speaks another protocol version): the replica can still answer it."""

    def __init__(self, header: RequestHeader, error: BaseException, code: str = ERR_DESERIALIZATION) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.header, self.error, self.code = header, error, code
        self.cid, self.reply_to, self.function = header.cid, header.reply_to, header.function


def request_tuple(req: Request, cid: int, reply_to: str | None, args: Any = None, kwargs: Any = None) -> tuple:
    """What is pickled for ``req``: a plain tuple (4x faster to pickle than the
    NamedTuple, and building it beats ``_replace`` 5x), with this attempt's
    correlation id and reply ring, and ``args``/``kwargs`` replaced when given
    (an oversize payload parked in a segment)."""
    return (
        req.op,
        cid,
        req.function,
        req.args if args is None else args,
        req.kwargs if args is None else kwargs,
        reply_to,
        req.deadline,
        req.sender,
        req.headers,
        req.service,
        req.trace,
    )


def encode_request(
    req: Request | tuple,
    label: str,
    beside: bool = False,
    cancel_id: int = 0,
    arena: Any = None,
    reader_pid: int = 0,
    timeout: float | None = None,
    placed: list | None = None,
    fills: list | None = None,
) -> tuple[list, int]:
    """The parts (buffers to write back to back) and ring kind of a request
    frame; ``req`` is a Request or its :func:`request_tuple`. ``beside``:
    its args travel beside the frame (FLAG_ARGS_BESIDE); ``cancel_id``: the
    header's cancellation id; ``arena`` and the rest: large buffers go into
    the arena (see _codec.encode_payload)."""
    if type(req) is not tuple:
        req = tuple(req)  # the body is a plain tuple: it pickles 4x faster than the NamedTuple
    parts, kind = encode_payload(req, label, arena, reader_pid, timeout, placed, fills)
    _op, cid, function, _args, _kwargs, reply_to, deadline, _sender, _headers, _service, trace = req
    rt = (reply_to or "").encode()
    fn = (function or "").encode()[:65535]
    tr = trace.encode()[:65535] if trace else b""
    oob = kind != KIND_PICKLE
    flags = (FLAG_OOB_BODY if oob else 0) | (FLAG_ARGS_BESIDE if beside else 0)
    head = _REQ_HEAD.pack(
        _REQ_MAGIC, PROTOCOL_VERSION, flags, cid, deadline or 0.0, cancel_id, 0, 0, len(rt), len(fn), len(tr), 0
    )
    head += rt + fn + tr
    head += bytes((-len(head)) % _ALIGN_BODY)
    return [head, *parts], (KIND_REQ_OOB if oob else KIND_REQ)


def _fixed_fields(payload: Any, kind: int) -> tuple[tuple, int]:
    """The header's fixed fields (``_REQ_HEAD``'s order) and where its strings
    end, checked. Raises ValueError for a frame that is not a request."""
    if (kind != KIND_REQ and kind != KIND_REQ_OOB) or len(payload) < _REQ_HEAD.size:
        raise ValueError(f"not a request frame (kind {kind}, {len(payload)} bytes)")
    fields = _REQ_HEAD.unpack_from(payload, 0)
    if fields[0] != _REQ_MAGIC:
        raise ValueError("bad request header")
    end = _REQ_HEAD.size + fields[8] + fields[9] + fields[10]  # + the lengths of the three strings
    if end > len(payload):
        raise ValueError(f"request header overruns the {len(payload)}-byte frame")
    return fields, end


_CANCEL_ID = struct.Struct("<Q")
_CANCEL_AT = 24  # the cancellation id's offset in the header


def cancel_ticket(payload: Any, kind: int) -> tuple[int, str | None]:
    """A request frame's cancellation id and reply ring, read before anything
    is unpickled (so a cancelled request costs no unpickling); ``(0, None)``
    without one, or for a frame too short to be a request."""
    if len(payload) < _REQ_HEAD.size or (kind != KIND_REQ and kind != KIND_REQ_OOB):
        return 0, None
    ticket = _CANCEL_ID.unpack_from(payload, _CANCEL_AT)[0]
    if not ticket:
        return 0, None
    try:
        fields, _end = _fixed_fields(payload, kind)
    except ValueError:  # not a request: decode_request says so
        return 0, None
    pos = _REQ_HEAD.size
    return ticket, bytes(memoryview(payload)[pos : pos + fields[8]]).decode(errors="replace") or None


def release_unread(payload: Any, kind: int) -> int:
    """Lets go of the arena slots a request frame's body names, without
    unpickling anything: for a request skipped unread (its claim lost), whose
    sender gave this process a holder of each. How many."""
    if kind != KIND_REQ_OOB:
        return 0
    try:
        _fields, end = _fixed_fields(payload, kind)
        return release_located(memoryview(payload)[end + (-end) % _ALIGN_BODY :])
    except ValueError:  # not a request, or a body that is not out-of-band: nothing located
        return 0


def decode_header(payload: Any, kind: int) -> tuple[RequestHeader, int]:
    """The header of a request frame and the body's offset. Raises ValueError
    for a frame that is not a request at all."""
    fields, end = _fixed_fields(payload, kind)
    _magic, version, flags, cid, deadline, cancel_id, stream_id, credit, nrt, nfn, _ntr, _ = fields
    pos = _REQ_HEAD.size
    view = memoryview(payload)
    reply_to = bytes(view[pos : pos + nrt]).decode(errors="replace") or None
    function = bytes(view[pos + nrt : pos + nrt + nfn]).decode(errors="replace")
    trace = bytes(view[pos + nrt + nfn : end]).decode(errors="replace") or None
    header = RequestHeader(
        version, flags, cid, deadline or None, cancel_id, stream_id, credit, reply_to, function, trace
    )
    return header, end + (-end) % _ALIGN_BODY


def decode_request(payload: Any, kind: int, beside: tuple | None = None) -> Request:
    """The request of a frame. Raises BadRequest (header known: the replica
    can answer) or ValueError (not a request). ``beside``: the (args,
    kwargs) that came beside the frame (see :func:`direct_payload`).

    The common case reads only the fixed fields: building the whole
    :class:`RequestHeader` costs as much as unpickling a small body, so that
    is done only for a request that cannot be run.
    """
    fields, end = _fixed_fields(payload, kind)
    version = fields[1]
    if version != PROTOCOL_VERSION:
        header, _ = decode_header(payload, kind)
        raise BadRequest(
            header,
            ProtocolMismatch(
                f"the caller speaks protocol version {version}, this replica speaks "
                f"{PROTOCOL_VERSION} (upgrade or redeploy one side)",
                caller_version=version,
                replica_version=PROTOCOL_VERSION,
            ),
            ERR_PROTOCOL,
        )
    body = memoryview(payload)[end + (-end) % _ALIGN_BODY :]
    try:
        frame = pickle.loads(body) if kind == KIND_REQ else decode_oob(body)
        if not isinstance(frame, tuple) or len(frame) != _REQUEST_FIELDS:
            raise ValueError(f"a request must be a {_REQUEST_FIELDS}-tuple, got {type(frame).__name__}")
        if (fields[2] & FLAG_ARGS_BESIDE) != (0 if beside is None else FLAG_ARGS_BESIDE):
            raise ValueError("the frame's flags and the arguments sent beside it disagree")
        if beside is not None:
            args, kwargs = beside
            frame = (*frame[:3], args, kwargs, *frame[5:])
        return _make_request(frame)
    except Exception as e:  # unpickling runs user code: anything can come out
        raise BadRequest(decode_header(payload, kind)[0], e) from None


def frame_bytes(req: Request, cancel_id: int = 0) -> bytes:
    """The whole request frame of ``req`` as one bytes: what a call over Ray
    carries (the same header as the ring path; the header's flags give its
    kind, see :func:`frame_kind`). One argument: Ray charges per argument."""
    parts, _kind = encode_request(req, f"a call to {req.service}.{req.function} over Ray", cancel_id=cancel_id)
    return b"".join(parts)


def _buffer_bytes(x: Any) -> int:
    """The size of ``x`` if it is a buffer of at least BESIDE_MIN_BYTES, else 0."""
    n = len(x) if isinstance(x, (bytes, bytearray)) else getattr(x, "nbytes", None)
    return n if isinstance(n, int) and n >= BESIDE_MIN_BYTES else 0


def direct_payload(req: Request, cancel_id: int = 0) -> tuple[bytes | tuple, int]:
    """The one Ray argument of a call straight to a replica's actor (Ray
    charges per argument), and about how many bytes it carries: the frame
    (:func:`frame_bytes`); or, when an argument or keyword value is a buffer
    of ``BESIDE_MIN_BYTES`` or more, ``(frame, args, kwargs)`` with the
    frame's own args left empty (FLAG_ARGS_BESIDE), which Ray serializes
    once (arrays without a copy) instead of copying our pickle of them."""
    args, kwargs = req.args, req.kwargs
    big = sum(map(_buffer_bytes, args)) if isinstance(args, tuple) else 0
    if kwargs:
        big += sum(map(_buffer_bytes, kwargs.values()))
    if not big:
        frame = frame_bytes(req, cancel_id)
        return frame, len(frame)
    label = f"a call to {req.service}.{req.function} over Ray"
    parts, _kind = encode_request(
        request_tuple(req, req.cid, req.reply_to, (), None), label, beside=True, cancel_id=cancel_id
    )
    frame = b"".join(parts)
    return (frame, args, kwargs), len(frame) + big


def frame_kind(frame: Any) -> int:
    """The ring kind of a request frame that travelled without one (over Ray),
    from its header's flags; ``KIND_REQ`` for anything too short to say."""
    if len(frame) >= _REQ_HEAD.size and _FLAGS.unpack_from(frame, 6)[0] & FLAG_OOB_BODY:
        return KIND_REQ_OOB
    return KIND_REQ


def direct_reply(rep: Reply | tuple) -> bytes | tuple:
    """What a replica's actor returns for a call over Ray: the reply pickled
    by us (Ray passes bytes through its cheapest path: ~40 us less per call
    here than a tuple), or the tuple itself when it holds out-of-band buffers
    (numpy arrays), which Ray's own pickling puts in its object store without
    a copy."""
    value = rep[2]
    if isinstance(value, (bytes, bytearray)) and len(value) >= BESIDE_MIN_BYTES:
        return tuple(rep)  # large: one copy by Ray into its object store, not ours and then Ray's
    parts, kind = encode_payload(tuple(rep), "the reply of a call over Ray")
    return parts[0] if kind == KIND_PICKLE else tuple(rep)


def read_direct_reply(out: bytes | tuple) -> Reply:
    """The Reply of what :func:`direct_reply` made."""
    return Reply(*(pickle.loads(out) if isinstance(out, bytes) else out))


def error_reply(cid: int, code: str, message: str, extra: Any = None) -> tuple:
    """A reply frame for an error the library itself found (no exception to carry)."""
    return (cid, ST_ERROR, tuple(ErrorInfo(code, "", message, "", None, extra)))


def bad_request_reply(e: BadRequest, service: str, by: str) -> Reply:
    """The error reply to a request that cannot be run (see BadRequest), from
    ``by`` (which process read it: "replica <id>", a node's gateway)."""
    if e.code == ERR_PROTOCOL:
        extra = (e.header.version, PROTOCOL_VERSION)
        return Reply(e.cid, ST_ERROR, encode_error(e.code, e.error, str(e.error), extra))
    message = f"the arguments of the call to {service}.{e.function} could not be unpickled by {by}: {e}"
    return Reply(e.cid, ST_ERROR, encode_error(e.code, e.error, message))


# -------------------------------------------------------------- errors
def encode_error(code: str, e: BaseException, message: str | None = None, extra: Any = None) -> tuple:
    """The ErrorInfo tuple a replica sends for ``e`` (the exception travels pickled, when it can)."""
    try:
        exc_pickle = dumps(e)  # an exception class from __main__ travels by value
        pickle.loads(exc_pickle)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        exc_pickle = None
    return tuple(
        ErrorInfo(
            code=code,
            type_name=f"{type(e).__module__}.{type(e).__qualname__}",
            message=message if message is not None else str(e),
            traceback="".join(traceback.format_exception(type(e), e, e.__traceback__)),
            exc_pickle=exc_pickle,
            extra=extra,
        )
    )
