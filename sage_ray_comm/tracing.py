"""OpenTelemetry spans and W3C trace context for calls, sends and events.

Every request frame has room for trace context in its header (``_wire.py``):
the W3C ``traceparent`` and ``tracestate`` (and whatever else the process's
propagator writes, e.g. ``baggage``), as ``name:value`` lines. What a process
does with it depends on whether it has a tracer provider:

- **A provider is configured** (``opentelemetry.trace.set_tracer_provider``,
  ``OTEL_PYTHON_TRACER_PROVIDER``, ``opentelemetry-instrument``, or Ray's
  ``_tracing_startup_hook``): the process records spans, following
  OpenTelemetry's RPC and messaging conventions:

  ========================  =========  =====================================
  what                      kind       name
  ========================  =========  =====================================
  ``call``/``call_async``   CLIENT     ``{service}/{function}``
  a handled call            SERVER     ``{service}/{function}``
  ``send``                  PRODUCER   ``send {service}/{function}``
  a handled send            CONSUMER   ``process {service}/{function}``
  ``publish``               PRODUCER   ``publish {topic}``
  a delivered event         CONSUMER   ``process {topic}`` (linked to the
                                       PRODUCER span, and its child)
  ========================  =========  =====================================

  A SERVER or CONSUMER span is the child of the span that sent the request,
  so a call chain across processes is one trace.
- **No provider**: nothing is recorded, and nothing is added to a request
  except the trace context of the request being handled, passed on as is
  (so a process without tracing does not break a trace through it). The
  cost is a few attribute reads per call (see ``benchmarks/``).

``SAGE_COMM_TRACING=0`` (or :func:`set_enabled`) bypasses all of it.

>>> enabled()
True
>>> decode_carrier(encode_carrier({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}))["traceparent"][:5]
'00-11'
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from . import context

try:  # the tracing extra (opentelemetry-api), also installed with ray[default]
    from opentelemetry import context as otel_context
    from opentelemetry import propagate
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - tracing is off without it
    otel_trace = None  # type: ignore[assignment]

__all__ = [
    "ENABLED",
    "OK",
    "SYSTEM",
    "UNTRACED",
    "configure",
    "decode_carrier",
    "enabled",
    "encode_carrier",
    "finish",
    "finish_with",
    "recording",
    "set_enabled",
    "set_route",
    "start_call",
    "start_handling",
    "start_publish",
    "start_send",
]

SYSTEM = "sage_ray_comm"  # rpc.system.name and messaging.system
OK = "ok"  # rpc.response.status_code of a call that succeeded
_SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"
_OFF_VALUES = ("0", "false", "off", "no")

# What a start_* call would give when tracing is off: no span, no trace context.
UNTRACED = (None, None)

ENABLED = otel_trace is not None and os.environ.get("SAGE_COMM_TRACING", "1").strip().lower() not in _OFF_VALUES
_tracer: Any = None  # set once a provider is configured: a global provider can be set only once
# get_tracer_provider() reads os.environ on every call while none is set
# (0.6 us, twice the budget of a whole call's tracing); the global it returns
# is one attribute read. When the API loads a provider named by an
# environment variable, or a future API renames that global, ask properly.
_PROVIDER_BY_ENV = bool(os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"))
_READ_GLOBAL = otel_trace is not None and hasattr(otel_trace, "_TRACER_PROVIDER") and not _PROVIDER_BY_ENV
_handling = context.current  # the request being handled (a ContextVar's get: one C call)
_NOTHING: tuple[Any, str | None] = (None, None)


def enabled() -> bool:
    """Whether tracing code runs at all (``SAGE_COMM_TRACING``, :func:`set_enabled`).

    The call path reads :data:`ENABLED` itself: with it False, a call skips
    every function of this module."""
    return ENABLED


def set_enabled(on: bool) -> None:
    """Turns tracing on or off in this process (overrides ``SAGE_COMM_TRACING``).

    >>> set_enabled(False); enabled()
    False
    >>> set_enabled(True)
    """
    global ENABLED
    ENABLED = bool(on) and otel_trace is not None


def configure(tracer_provider: Any = None) -> None:
    """Records this library's spans with ``tracer_provider`` instead of the
    global one (as OpenTelemetry's instrumentations take ``tracer_provider=``);
    ``None`` goes back to the global provider. Trace context still follows
    OpenTelemetry's current context and global propagator.

    >>> configure(None)
    """
    global _tracer
    _tracer = None if tracer_provider is None else _make_tracer(tracer_provider)


def _make_tracer(provider: Any) -> Any:
    return provider.get_tracer(__name__, metadata.version("sage_ray_comm"), schema_url=_SCHEMA_URL)


def _get_tracer() -> Any:
    """This process's tracer, or None while no provider is configured (the
    caller checked ``_tracer`` and the global first: this is the slow path)."""
    global _tracer
    if _tracer is None and otel_trace is not None:
        if _READ_GLOBAL and otel_trace._TRACER_PROVIDER is None:
            return None
        provider = otel_trace.get_tracer_provider()
        if isinstance(provider, otel_trace.ProxyTracerProvider):
            return None
        _tracer = _make_tracer(provider)
    return _tracer


def recording() -> bool:
    """Whether this process records spans (tracing enabled and a provider configured)."""
    if _tracer is None and _READ_GLOBAL and otel_trace._TRACER_PROVIDER is None:
        return False  # the common case, in two reads
    return ENABLED and _get_tracer() is not None


# ------------------------------------------------------------- the carrier
def encode_carrier(carrier: dict[str, str]) -> str | None:
    """The header's trace field for a propagator's carrier (None if empty)."""
    return "\n".join(f"{k}:{v}" for k, v in carrier.items()) or None


def decode_carrier(text: str | None) -> dict[str, str]:
    """The carrier of a header's trace field (malformed lines are skipped)."""
    out: dict[str, str] = {}
    for line in (text or "").split("\n"):
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip().lower()] = v.strip()
    return out


def _inject(span: Any) -> str | None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=otel_trace.set_span_in_context(span))
    return encode_carrier(carrier)


# ----------------------------------------------------------- caller's side
def start_call(service: str, function: str, bus: str) -> tuple[Any, str | None]:
    """A CLIENT span for a call (None when not recording) and the trace
    field its request carries."""
    tracer = _tracer
    if (tracer is None and _READ_GLOBAL and otel_trace._TRACER_PROVIDER is None) or not ENABLED:
        # Not recording (the common case: a few reads). Inside a handler of
        # a traced request, its context goes on as it came.
        h = _handling()
        return _NOTHING if h is None or not ENABLED else (None, h.trace)
    if tracer is None and (tracer := _get_tracer()) is None:
        h = _handling()
        return _NOTHING if h is None else (None, h.trace)
    span = tracer.start_span(
        f"{service}/{function}",
        kind=SpanKind.CLIENT,
        attributes={
            "rpc.system.name": SYSTEM,
            "rpc.method": f"{service}/{function}",
            "rpc.service": service,
            "sage.bus": bus,
        },
    )
    return span, _inject(span)


def start_send(service: str, function: str, bus: str) -> tuple[Any, str | None]:
    """A PRODUCER span for a one-way send, and the trace field it carries."""
    return _start_producer(f"{service}/{function}", "send", bus, None)


def start_publish(topic: str, bus: str, client_id: str) -> tuple[Any, str | None]:
    """A PRODUCER span for a publish, and the trace field its events carry."""
    return _start_producer(topic, "publish", bus, client_id)


def _start_producer(destination: str, operation: str, bus: str, client_id: str | None) -> tuple[Any, str | None]:
    if not ENABLED:
        return _NOTHING
    tracer = _tracer or _get_tracer()
    if tracer is None:
        h = _handling()
        return _NOTHING if h is None else (None, h.trace)
    attributes = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": operation,
        "messaging.destination.name": destination,
        "sage.bus": bus,
    }
    if client_id:
        attributes["messaging.client.id"] = client_id
    span = tracer.start_span(f"{operation} {destination}", kind=SpanKind.PRODUCER, attributes=attributes)
    return span, _inject(span)


def set_route(span: Any, replica: str, transport: str) -> None:
    """Records which replica and transport a call or send went to (the last
    attempt's, when it was retried)."""
    if span is not None:
        span.set_attribute("sage.replica", replica)
        span.set_attribute("sage.transport", transport)


def finish(span: Any, error: BaseException | None = None, *, delivered: int | None = None) -> None:
    """Ends a span: its outcome, and the error's type when it failed."""
    if span is None:
        return
    if not span.is_recording():  # a no-op provider's span (e.g. OTEL_SDK_DISABLED): nothing to add
        span.end()
        return
    if delivered is not None:
        span.set_attribute("sage.delivered", delivered)
    rpc = getattr(span, "kind", None) in (SpanKind.CLIENT, SpanKind.SERVER)
    if error is None:
        if rpc:
            span.set_attribute("rpc.response.status_code", OK)
    else:
        kind = type(error).__name__
        span.set_attribute("error.type", kind)
        if rpc:
            span.set_attribute("rpc.response.status_code", kind)
        span.set_status(Status(StatusCode.ERROR, f"{kind}: {error}"[:512]))
    span.end()


def finish_with(span: Any, fut: Any) -> Any:
    """Ends ``span`` when the future ``fut`` completes (its outcome, or its
    cancellation); returns ``fut``."""
    if span is not None:
        fut.add_done_callback(lambda f: finish(span, _CANCELLED if f.cancelled() else f.exception()))
    return fut


class _Cancelled(Exception):
    """Stands for a cancelled future's outcome in its span."""


_CANCELLED = _Cancelled("the caller cancelled the call")


# ---------------------------------------------------------- replica's side
class _Handling:
    """A SERVER/CONSUMER span made current for a handler; :meth:`close` ends it."""

    __slots__ = ("span", "token")

    def __init__(self, span: Any, token: Any) -> None:
        self.span, self.token = span, token

    def detach(self) -> None:
        """Leaves the span's context (in the thread that entered it); the span goes on."""
        if self.token is not None:
            otel_context.detach(self.token)
            self.token = None

    def close(self, error: BaseException | None = None) -> None:
        finish(self.span, error)


def start_handling(
    op_is_call: bool,
    service: str,
    function: str,
    trace: str | None,
    *,
    replica: str,
    transport: str,
    nbytes: int,
    topic: str | None = None,
    group: str | None = None,
) -> _Handling | None:
    """Starts the SERVER span (a call) or CONSUMER span (a send or event) of
    a request about to be handled, child of the sender's span, and makes it
    current (in this thread and in tasks scheduled from it), so the
    handler's own calls are its children. None when not recording."""
    if not ENABLED:
        return None
    tracer = _tracer or _get_tracer()
    if tracer is None:
        return None
    parent = propagate.extract(decode_carrier(trace)) if trace else None
    if op_is_call:
        name = f"{service}/{function}"
        span = tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system.name": SYSTEM,
                "rpc.method": name,
                "rpc.service": service,
                "sage.replica": replica,
                "sage.transport": transport,
                "sage.request.size": nbytes,
            },
        )
    else:
        destination = topic or f"{service}/{function}"
        links = []
        if parent is not None:
            sc = otel_trace.get_current_span(parent).get_span_context()
            if sc.is_valid:
                links.append(Link(sc))  # messaging convention: a consumer links its message's creation
        attributes = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": destination,
            "messaging.message.body.size": nbytes,
            "sage.replica": replica,
            "sage.transport": transport,
        }
        if group:
            attributes["messaging.consumer.group.name"] = group
        span = tracer.start_span(
            f"process {destination}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes, links=links
        )
    token = otel_context.attach(otel_trace.set_span_in_context(span))
    return _Handling(span, token)
