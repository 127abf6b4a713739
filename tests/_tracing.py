"""Test hook: an in-memory span exporter in this process (the driver, or a
replica through a service function), and the finished spans as plain dicts
that travel back to the test."""

from __future__ import annotations

import threading

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sage_ray_comm import tracing

_exporter = InMemorySpanExporter()
_ended = threading.Condition()


class _Notify(SpanProcessor):
    """Wakes collect() each time a span ends (after the exporter has it)."""

    def on_end(self, span) -> None:
        with _ended:
            _ended.notify_all()


def install(how: str) -> TracerProvider | None:
    """``global``: OpenTelemetry's global provider (once per process);
    ``sage``: only this library's spans, through tracing.configure();
    ``none``: no provider (the process only passes trace context on)."""
    if how == "none":
        return None
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_exporter))
    provider.add_span_processor(_Notify())
    if how == "global":
        trace.set_tracer_provider(provider)
    else:
        tracing.configure(provider)
    return provider


def _as_dict(s) -> dict:
    return {
        "name": s.name,
        "kind": s.kind.name,
        "trace_id": s.context.trace_id,
        "span_id": s.context.span_id,
        "parent": s.parent.span_id if s.parent is not None else None,
        "links": [(ln.context.trace_id, ln.context.span_id) for ln in s.links],
        "attributes": dict(s.attributes or {}),
        "status": s.status.status_code.name,
        "description": s.status.description,
    }


def collect(count: int, timeout: float = 20.0) -> list[dict]:
    """The spans finished in this process, once there are ``count`` of them
    (fewer after ``timeout``: the test then names what is missing)."""
    with _ended:
        _ended.wait_for(lambda: len(_exporter.get_finished_spans()) >= count, timeout)
    return [_as_dict(s) for s in _exporter.get_finished_spans()]


def clear() -> None:
    _exporter.clear()
