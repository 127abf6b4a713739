"""One request through three services, traced across processes with OpenTelemetry.

    python examples/traced_pipeline.py

``frontend`` calls ``featurize``, which calls ``model``; each is a Ray actor
in its own process. Ray's tracing startup hook (``setup_tracing`` below) sets
up the OpenTelemetry SDK in every worker process, as it would for an OTLP
collector; here each process writes its finished spans to a JSON-lines file,
and the driver prints them as one tree.

To send the spans to a collector instead, install
``opentelemetry-exporter-otlp`` and use its ``OTLPSpanExporter`` in the hook.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time

SPANS_DIR_ENV = "TRACED_PIPELINE_SPANS"


def setup_tracing() -> None:
    """Ray runs this in every worker process (and in the driver) at start."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class JsonLines(SpanExporter):
        def __init__(self, path: str) -> None:
            self.path = path

        def export(self, spans) -> SpanExportResult:
            with open(self.path, "a") as out:  # each span is on disk when it ends
                self._write(spans, out)
            return SpanExportResult.SUCCESS

        def _write(self, spans, out) -> None:
            for s in spans:
                row = {
                    "scope": s.instrumentation_scope.name if s.instrumentation_scope else "",
                    "name": s.name,
                    "kind": s.kind.name,
                    "trace": f"{s.context.trace_id:032x}",
                    "span": f"{s.context.span_id:016x}",
                    "parent": f"{s.parent.span_id:016x}" if s.parent else None,
                    "pid": os.getpid(),
                    "start": s.start_time,
                    "end": s.end_time,
                    "status": s.status.status_code.name,
                    "attributes": dict(s.attributes or {}),
                }
                out.write(json.dumps(row) + "\n")

    provider = TracerProvider(resource=Resource.create({"service.name": "traced_pipeline"}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLines(f"{os.environ[SPANS_DIR_ENV]}/{os.getpid()}.jsonl")))
    trace.set_tracer_provider(provider)


def main() -> int:
    import ray

    from sage_ray_comm import BaseService, FunctionClient, get_communication_bus, sage_service, service_function

    @sage_service(name="model", replicas=1, num_cpus=0.25)
    class Model(BaseService):
        @service_function
        def predict(self, features: list) -> float:
            return sum(features) / len(features)

    @sage_service(name="featurize", replicas=1, num_cpus=0.25)
    class Featurize(BaseService):
        @service_function
        def score(self, text: str) -> float:
            features = [float(len(w)) for w in text.split()]
            return self.call_function("model", "predict", features)

    @sage_service(name="frontend", replicas=1, num_cpus=0.25)
    class Frontend(BaseService):
        @service_function
        async def handle(self, text: str) -> dict:  # async handlers carry the trace too
            return {"text": text, "score": await self.client.acall("featurize", "score", text)}

    spans_dir = tempfile.mkdtemp(prefix="sage-spans-")
    os.environ[SPANS_DIR_ENV] = spans_dir  # workers inherit the driver's environment
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",  # its own Ray: the workers must inherit this driver's environment and tracing hook
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _tracing_startup_hook="traced_pipeline:setup_tracing",
    )
    bus = get_communication_bus("traced")
    for cls in (Model, Featurize, Frontend):
        cls.deploy(bus="traced")
    with FunctionClient(bus="traced") as client:
        client.call("frontend", "handle", "warm up")  # first calls make rings and connections
        print("result:", client.call("frontend", "handle", "zero copy shared memory rings"))

    ours = _read_spans(spans_dir, want_servers=3)
    bus.shutdown()
    ray.shutdown()
    _print_tree(ours)
    traces = {s["trace"] for s in ours}
    servers = [s for s in ours if s["kind"] == "SERVER"]
    pids = {s["pid"] for s in servers}
    print(f"\n{len(ours)} spans in {len(traces)} trace, SERVER spans in {len(pids)} processes")
    ok = len(traces) == 1 and len(servers) == 3 and len(pids) == 3
    print("OK" if ok else "MISSING SPANS")
    return 0 if ok else 1


def _read_spans(spans_dir: str, want_servers: int, timeout: float = 30.0) -> list:
    """This library's spans of the last request, from every process's file,
    once the last replica has ended its SERVER span (it ends just after the
    reply is sent)."""
    end = time.monotonic() + timeout
    while True:
        rows = []
        for path in glob.glob(os.path.join(spans_dir, "*.jsonl")):
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        ours = [r for r in rows if r["scope"] == "sage_ray_comm.tracing"]
        handle = sorted((r for r in ours if r["name"] == "frontend/handle"), key=lambda r: r["start"])
        trace = handle[-1]["trace"] if handle else None  # the second request's
        ours = [r for r in ours if r["trace"] == trace]
        if sum(r["kind"] == "SERVER" for r in ours) >= want_servers or time.monotonic() > end:
            return ours
        time.sleep(0.05)  # polling files another process writes


def _print_tree(spans: list) -> None:
    by_parent: dict = {}
    for s in spans:
        by_parent.setdefault(s["parent"], []).append(s)
    ids = {s["span"] for s in spans}
    roots = [s for s in spans if s["parent"] not in ids]
    t0 = min(s["start"] for s in spans)

    def show(s: dict, depth: int) -> None:
        a = s["attributes"]
        where = f"pid {s['pid']}"
        extra = ", ".join(
            f"{k}={a[k]}"
            for k in ("sage.transport", "sage.replica", "sage.request.size", "rpc.response.status_code")
            if k in a
        )
        print(
            f"{'  ' * depth}{s['kind']:<6} {s['name']:<18} {where:<10} "
            f"+{(s['start'] - t0) / 1e3:7.0f} us  {(s['end'] - s['start']) / 1e3:7.0f} us  {extra}"
        )
        for child in sorted(by_parent.get(s["span"], []), key=lambda c: c["start"]):
            show(child, depth + 1)

    print(f"\ntrace {spans[0]['trace']}")
    for r in roots:
        show(r, 0)


if __name__ == "__main__":
    sys.exit(main())
