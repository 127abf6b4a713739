"""Metrics for the Ray dashboard, through ``ray.util.metrics``.

Every process that calls or serves records into plain dictionaries on the
call path (a counter increment, and a latency sample for one call in
``SAMPLE_EVERY``). A background thread turns them into Ray metrics once a
second, so the call path never touches Ray's metric machinery. Ray exports
them (prefixed ``ray_``) at each node's metrics-agent port, which the
dashboard's Metrics page and Prometheus read.

| metric | kind | tags |
|---|---|---|
| ``sage_calls_total`` | counter | bus, service, function, transport, pattern |
| ``sage_call_errors_total`` | counter | bus, service, function, transport, error |
| ``sage_call_timeouts_total`` | counter | bus, service, function, transport |
| ``sage_call_latency_seconds`` | histogram (10 us .. 10 s) | bus, service, function, transport |
| ``sage_messages_published_total`` | counter | bus |
| ``sage_messages_delivered_total`` | counter | bus, transport |
| ``sage_frames_dropped_total`` | counter | bus, where (``subscriber_buffer``, ``ring``) |
| ``sage_replica_in_flight`` | gauge | bus, service, replica |
| ``sage_ring_fill_ratio`` | gauge | bus, service, replica |
| ``sage_arena_fill_ratio`` | gauge | bus, service, replica |
| ``sage_streams_active`` | gauge | bus, service, replica |
| ``sage_stream_items_total`` | counter | bus, service, replica |
| ``sage_calls_cancelled_total`` | counter | bus, service, replica |

``SAGE_COMM_METRICS=0`` turns recording off. ``sage-comm metrics`` prints
the current values from the node's export endpoint.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from . import lifecycle

__all__ = ["LATENCY_BOUNDARIES", "METRICS", "enabled", "recorder", "set_enabled"]

log = logging.getLogger(__name__)

LATENCY_BOUNDARIES = [
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
]
SAMPLE_EVERY = 8  # one call in 8 contributes a latency sample
FLUSH_SECONDS = 1.0

_CALL_TAGS = ("bus", "service", "function", "transport", "pattern")
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sage_calls_total": ("counter", "Calls made, by caller-side outcome-independent count", _CALL_TAGS),
    "sage_call_errors_total": (
        "counter",
        "Calls that raised a typed error",
        ("bus", "service", "function", "transport", "error"),
    ),
    "sage_call_timeouts_total": ("counter", "Calls that timed out", ("bus", "service", "function", "transport")),
    "sage_call_latency_seconds": (
        "histogram",
        "Round-trip latency of calls (sampled)",
        ("bus", "service", "function", "transport"),
    ),
    "sage_messages_published_total": ("counter", "Events published", ("bus",)),
    "sage_messages_delivered_total": ("counter", "Events delivered to subscribers", ("bus", "transport")),
    "sage_frames_dropped_total": ("counter", "Frames or events dropped", ("bus", "where")),
    "sage_replica_in_flight": ("gauge", "Requests running in a replica", ("bus", "service", "replica")),
    "sage_ring_fill_ratio": ("gauge", "Fill level of a replica's request ring (0..1)", ("bus", "service", "replica")),
    "sage_arena_fill_ratio": (
        "gauge",
        "Share of a replica's arena budget in slots its callers still hold (0..1)",
        ("bus", "service", "replica"),
    ),
    "sage_streams_active": ("gauge", "Streams open in a replica", ("bus", "service", "replica")),
    "sage_stream_items_total": ("counter", "Stream items a replica sent", ("bus", "service", "replica")),
    "sage_calls_cancelled_total": (
        "counter",
        "Calls a replica never ran: cancelled before they started",
        ("bus", "service", "replica"),
    ),
}

_enabled = os.environ.get("SAGE_COMM_METRICS", "1") != "0"


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    """Turns recording on or off in this process (the benchmark measures the difference)."""
    global _enabled
    _enabled = bool(on)


class _Recorder:
    """Per process: counts and samples on the call path, flushed to Ray by a thread."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, tuple[str, ...]], float] = {}
        self.samples: dict[tuple[str, ...], list[float]] = {}
        self.gauges: dict[tuple[str, tuple[str, ...]], float] = {}
        self._tick = 0
        self._metrics: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- the call path: dictionary updates only
    def call(
        self,
        bus: str,
        service: str,
        function: str,
        transport: str,
        pattern: str,
        seconds: float | None,
        error: str | None = None,
    ) -> None:
        if not _enabled:
            return
        key = ("sage_calls_total", (bus, service, function, transport, pattern))
        c = self.counts
        c[key] = c.get(key, 0) + 1
        if error is not None:
            k2: tuple[str, tuple[str, ...]]
            if error == "CallTimeout":
                k2 = ("sage_call_timeouts_total", (bus, service, function, transport))
            else:
                k2 = ("sage_call_errors_total", (bus, service, function, transport, error))
            c[k2] = c.get(k2, 0) + 1
        if seconds is not None:
            self._tick += 1
            if self._tick % SAMPLE_EVERY == 0:
                s = self.samples.setdefault((bus, service, function, transport), [])
                if len(s) < 1000:
                    s.append(seconds)
        if self._thread is None:
            self._start()

    def count(self, name: str, tags: tuple[str, ...], n: float = 1) -> None:
        if not _enabled or not n:
            return
        key = (name, tags)
        self.counts[key] = self.counts.get(key, 0) + n
        if self._thread is None:
            self._start()

    def gauge(self, name: str, tags: tuple[str, ...], value: float) -> None:
        if not _enabled:
            return
        self.gauges[(name, tags)] = value
        if self._thread is None:
            self._start()

    # -- off the call path
    def _start(self) -> None:

        if not lifecycle.ray_alive():
            return  # nothing to flush to; the next record after ray.init() starts it
        with self._lock:
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="sage-metrics", daemon=True)
                self._thread.start()
                lifecycle.register(self, "metrics", _Recorder.close)

    def close(self) -> None:
        """Flushes what is pending and stops the flusher thread (at exit, before Ray stops)."""
        with self._lock:
            t, self._thread = self._thread, None
        self._stop.set()
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        try:
            self.flush()
        except Exception as e:  # metrics must never break an exit
            log.debug("last metrics flush failed: %s", e)
        self._metrics = None  # Ray objects of this Ray session: never kept past it

    def _make(self) -> dict[str, Any]:
        from ray.util import metrics as rm

        out: dict[str, Any] = {}
        for name, (kind, desc, tags) in METRICS.items():
            if kind == "counter":
                out[name] = rm.Counter(name, description=desc, tag_keys=tags)
            elif kind == "gauge":
                out[name] = rm.Gauge(name, description=desc, tag_keys=tags)
            else:
                out[name] = rm.Histogram(name, description=desc, boundaries=LATENCY_BOUNDARIES, tag_keys=tags)
        return out

    def flush(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        if self._metrics is None:
            self._metrics = self._make()
        m = self._metrics
        counts, self.counts = self.counts, {}
        samples, self.samples = self.samples, {}
        for (name, tags), n in counts.items():
            m[name].inc(n, tags=dict(zip(METRICS[name][2], tags, strict=True)))
        lat_tags = METRICS["sage_call_latency_seconds"][2]
        for tags, values in samples.items():
            t = dict(zip(lat_tags, tags, strict=True))
            for v in values:
                m["sage_call_latency_seconds"].observe(v, tags=t)
        for (name, tags), v in list(self.gauges.items()):
            m[name].set(v, tags=dict(zip(METRICS[name][2], tags, strict=True)))

    def _run(self) -> None:

        while not self._stop.wait(FLUSH_SECONDS):
            if not lifecycle.ray_alive():
                # ray.shutdown(): drop this session's metric objects and stop;
                # recording after a new ray.init() starts a new thread.
                with self._lock:
                    if self._thread is threading.current_thread():
                        self._thread = None
                self._metrics = None
                return
            try:
                self.flush()
            except Exception as e:  # metrics must never break calls
                log.debug("metrics flush failed: %s", e)


recorder = _Recorder()
