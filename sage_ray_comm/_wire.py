"""What travels between processes, in one place: codes, named tuples, the
versioned request header, the pickle codec, error encoding, and the names of
rings and actors. Change "how a request looks" here and nowhere else.

A request frame (ring kinds ``KIND_REQ`` and ``KIND_REQ_OOB``) is a fixed
binary header, three variable-length strings, padding to 16 bytes, then the
body: the pickled :class:`Request` tuple (``KIND_REQ``), or that pickle with
out-of-band buffers (``KIND_REQ_OOB``, see :func:`encode_payload`)::

    offset  size  field
         0     4  magic b"SQRQ"
         4     2  protocol version (PROTOCOL_VERSION)
         6     2  flags (FLAG_*; none defined yet)
         8     8  correlation id (unique per reply ring)
        16     8  deadline, epoch seconds as float64 (0.0: none)
        24     8  cancellation id (0: none)          reserved for cancellation
        32     8  stream id (0: not a stream)        reserved for streaming
        40     4  stream credit                      reserved for streaming
        44     2  length of reply_to (utf-8)
        46     2  length of function (utf-8)
        48     2  length of the trace context        reserved for tracing
        50     2  reserved (0)
        52        reply_to, function, trace context, zero padding, body

The header is readable without unpickling anything, so a replica can answer
a request whose arguments fail to unpickle (or that speaks another protocol
version, or whose deadline passed) with a typed error instead of leaving the
caller to time out. The same bytes travel on the Ray path.

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

from .errors import (
    CallTimeout,
    DeserializationError,
    FunctionNotFound,
    ProtocolMismatch,
    RemoteError,
    SerializationError,
    ServiceUnavailable,
    ValidationError,
)

__all__ = [
    "ERR_DESERIALIZATION",
    "ERR_FUNCTION",
    "ERR_PROTOCOL",
    "ERR_REMOTE",
    "ERR_SERIALIZATION",
    "ERR_TIMEOUT",
    "ERR_UNAVAILABLE",
    "ERR_VALIDATION",
    "KIND_PICKLE",
    "KIND_PICKLE_OOB",
    "KIND_RAW",
    "KIND_REQ",
    "KIND_REQ_OOB",
    "OP_CALL",
    "OP_EVENT",
    "OP_SEND",
    "PROTOCOL_VERSION",
    "ST_ERROR",
    "ST_OK",
    "ST_OK_BLOB",
    "BadRequest",
    "ErrorInfo",
    "Reply",
    "Request",
    "RequestHeader",
    "actor_name",
    "decode_payload",
    "decode_request",
    "dumps",
    "encode_error",
    "encode_payload",
    "encode_request",
    "event_ring_name",
    "gateway_name",
    "names_main",
    "outcome",
    "remote_error",
    "reply_ring_name",
    "reply_ring_pid",
    "request_ring_name",
    "unpickle_error",
]

# The protocol this build speaks. Bump it whenever the header or the body
# tuples change shape; a caller and a replica that differ get ProtocolMismatch.
PROTOCOL_VERSION = 1

# ---------------------------------------------------------------- frame kinds
# Stored in each ring frame's header. 1-3 are SageQueue's (the binding
# encodes 1 and 2 itself: queue.py checks they agree); 8-9 are requests.
KIND_RAW = 1  # put_bytes: the payload is the caller's bytes
KIND_PICKLE = 2  # pickle protocol 5, no out-of-band buffers
KIND_PICKLE_OOB = 3  # pickle protocol 5 plus out-of-band buffers (numpy...)
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
    trace: bytes


# -------------------------------------------------------------------- names
# Ring names are per bus (the bus is the segment namespace); actor names live
# in the router's Ray namespace.
def request_ring_name(service: str, instance_id: str) -> str:
    """The request ring of one replica."""
    return f"req.{service}.{instance_id}"


def reply_ring_name(pid: int, token: str) -> str:
    """A caller's reply ring: the owner's pid is part of the name, so a
    replica can tell a dead caller's ring without opening it."""
    return f"rep.{pid}.{token}"


def reply_ring_pid(name: str) -> int | None:
    """The pid in a :func:`reply_ring_name` (None for other names)."""
    try:
        kind, pid, _ = name.split(".", 2)
        return int(pid) if kind == "rep" else None
    except ValueError:
        return None


def event_ring_name(pid: int, token: str) -> str:
    """A process's ring for events to its ``subscribe`` callbacks."""
    return f"evt.{pid}.{token}"


def actor_name(bus: str, service: str, index: int) -> str:
    """The Ray actor name of replica ``index`` (1-based, as the dashboard shows it)."""
    return f"sage:{bus}:{service}#{index}"


def gateway_name(node_id: str) -> str:
    """The Ray actor name of a node's gateway."""
    return f"sage:gateway:{node_id}"


# ------------------------------------------------------------- pickle codec
# KIND_PICKLE_OOB payload: header, buffer lengths, pickle, then each buffer at
# a 16-byte aligned offset (so numpy views of it are aligned).
_OOB_HEAD = struct.Struct("<4sIQ")  # magic, buffer count, pickle length
_OOB_MAGIC = b"SQ5B"
_ALIGN = 16
_ZEROS = bytes(_ALIGN)
# Out-of-band buffers totalling less than this are cheaper in-band.
_OOB_MIN = 1024


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


def dumps(obj: Any, bufs: list | None = None) -> bytes:
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
        if _STACK_GLOBAL not in data or not names_main(obj, data):
            return data
    except (pickle.PicklingError, AttributeError, TypeError):
        pass  # a lambda, a local function: cloudpickle may still do it
    return _dumps_by_value(obj, bufs)


def _dumps_by_value(obj: Any, bufs: list | None) -> bytes:
    from ray import cloudpickle  # ray is a dependency; imported only when needed

    if bufs is not None:
        bufs.clear()  # the plain attempt may have handed out buffers already
    return cloudpickle.dumps(obj, protocol=5, buffer_callback=None if bufs is None else bufs.append)


def encode_payload(obj: Any, label: str) -> tuple[list, int]:
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


def unpickle_error(e: BaseException, payload: Any, label: str) -> DeserializationError:
    return DeserializationError(
        f"could not unpickle a {len(payload)}-byte message from {label}: {type(e).__name__}: {e} "
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


# ------------------------------------------------------------ request frames
_REQ_HEAD = struct.Struct("<4sHHQdQQIHHHH")  # see the module docstring
_REQ_MAGIC = b"SQRQ"
_ALIGN_BODY = 16  # the body starts 16-byte aligned, so out-of-band buffers stay aligned


class BadRequest(Exception):
    """A request frame whose header decoded but whose body did not (or that
    speaks another protocol version): the replica can still answer it."""

    def __init__(self, header: RequestHeader, error: BaseException, code: str = ERR_DESERIALIZATION) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.header, self.error, self.code = header, error, code
        self.cid, self.reply_to, self.function = header.cid, header.reply_to, header.function


def encode_request(req: Request | tuple, label: str) -> tuple[list, int]:
    """The parts (buffers to write back to back) and ring kind of a request frame."""
    parts, kind = encode_payload(req, label)
    rt = (req[5] or "").encode()
    fn = (req[2] or "").encode()[:65535]
    deadline = req[6] or 0.0
    head = _REQ_HEAD.pack(_REQ_MAGIC, PROTOCOL_VERSION, 0, req[1], deadline, 0, 0, 0, len(rt), len(fn), 0, 0)
    head += rt + fn
    head += bytes((-len(head)) % _ALIGN_BODY)
    return [head, *parts], (KIND_REQ if kind == KIND_PICKLE else KIND_REQ_OOB)


def decode_header(payload: Any, kind: int) -> tuple[RequestHeader, int]:
    """The header of a request frame and the body's offset. Raises ValueError
    for a frame that is not a request at all."""
    if kind not in (KIND_REQ, KIND_REQ_OOB) or len(payload) < _REQ_HEAD.size:
        raise ValueError(f"not a request frame (kind {kind}, {len(payload)} bytes)")
    magic, version, flags, cid, deadline, cancel_id, stream_id, credit, nrt, nfn, ntr, _ = _REQ_HEAD.unpack_from(
        payload, 0
    )
    if magic != _REQ_MAGIC:
        raise ValueError("bad request header")
    pos = _REQ_HEAD.size
    end = pos + nrt + nfn + ntr
    if end > len(payload):
        raise ValueError(f"request header overruns the {len(payload)}-byte frame")
    view = memoryview(payload)
    reply_to = bytes(view[pos : pos + nrt]).decode(errors="replace") or None
    function = bytes(view[pos + nrt : pos + nrt + nfn]).decode(errors="replace")
    trace = bytes(view[pos + nrt + nfn : end])
    header = RequestHeader(
        version, flags, cid, deadline or None, cancel_id, stream_id, credit, reply_to, function, trace
    )
    return header, end + (-end) % _ALIGN_BODY


def decode_request(payload: Any, kind: int) -> Request:
    """The request of a frame. Raises BadRequest (header known: the replica
    can answer) or ValueError (not a request)."""
    header, body_at = decode_header(payload, kind)
    if header.version != PROTOCOL_VERSION:
        raise BadRequest(
            header,
            ProtocolMismatch(
                f"the caller speaks protocol version {header.version}, this replica speaks "
                f"{PROTOCOL_VERSION} (upgrade or redeploy one side)",
                caller_version=header.version,
                replica_version=PROTOCOL_VERSION,
            ),
            ERR_PROTOCOL,
        )
    body = memoryview(payload)[body_at:]
    try:
        frame = pickle.loads(body) if kind == KIND_REQ else decode_oob(body)
        if not isinstance(frame, tuple) or len(frame) != len(Request._fields):
            raise ValueError(f"a request must be a {len(Request._fields)}-tuple, got {type(frame).__name__}")
        return Request._make(frame)
    except Exception as e:  # unpickling runs user code: anything can come out
        raise BadRequest(header, e) from None


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


def remote_error(info: ErrorInfo, service: str, function: str) -> BaseException:
    """The exception a caller sees for a handler that raised."""
    original = None
    if info.exc_pickle is not None:
        try:
            original = pickle.loads(info.exc_pickle)
        except Exception:
            original = None
    cls: type[RemoteError] = RemoteError
    if isinstance(original, Exception) and not isinstance(original, RemoteError):
        cls = _dual_class(type(original))
    try:
        err = cls.__new__(cls)
        Exception.__init__(err, *(original.args if original is not None else (info.message,)))
        if original is not None:
            err.__dict__.update(getattr(original, "__dict__", {}))
    except Exception:
        err = RemoteError(info.message)
    err.remote_type = info.type_name
    err.remote_message = info.message
    err.remote_traceback = info.traceback
    err.service = service
    err.function = function
    return err


_DUALS: dict[type, type[RemoteError]] = {}


def _dual_class(t: type) -> type[RemoteError]:
    """A subclass of both RemoteError and ``t``, so ``except t`` still catches it."""
    d = _DUALS.get(t)
    if d is None:
        try:
            d = type(f"RemoteError[{t.__name__}]", (RemoteError, t), {"__str__": RemoteError.__str__})
        except TypeError:  # layout conflict (a C type with its own fields): plain RemoteError
            d = RemoteError
        _DUALS[t] = d
    return d


def outcome(rep: Reply, service: str, function: str) -> Any:
    """The value of a reply, or its typed exception raised."""
    if rep[1] == ST_OK:
        return rep[2]
    info = ErrorInfo(*rep[2])
    code = info.code
    if code == ERR_REMOTE:
        raise remote_error(info, service, function)
    if code == ERR_FUNCTION:
        raise FunctionNotFound(info.message)
    if code == ERR_VALIDATION:
        raise ValidationError(info.message, info.extra)
    if code == ERR_TIMEOUT:
        raise CallTimeout(info.message)
    if code == ERR_SERIALIZATION:
        raise SerializationError(info.message)
    if code == ERR_DESERIALIZATION:
        raise DeserializationError(info.message)
    if code == ERR_UNAVAILABLE:
        raise ServiceUnavailable(info.message)
    if code == ERR_PROTOCOL:
        theirs, ours = info.extra if isinstance(info.extra, tuple) else (None, None)
        raise ProtocolMismatch(
            f"call to {service}.{function}: {info.message}", caller_version=theirs, replica_version=ours
        )
    raise RemoteError(f"{service}.{function} failed: {info.message}")
