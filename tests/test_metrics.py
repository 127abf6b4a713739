"""The metrics recorder: what the call path records, and how it reaches Ray."""

from __future__ import annotations

from sage_ray_comm import metrics
from sage_ray_comm.metrics import METRICS, _Recorder


def test_calls_errors_and_sampled_latency_are_recorded_by_key():
    r = _Recorder()
    r._thread = object()  # no flusher thread: inspect the dictionaries
    for i in range(16):
        r.call("b", "svc", "fn", "shm", "request_response", 1e-5 * i)
    r.call("b", "svc", "fn", "shm", "request_response", None, "CallTimeout")
    r.call("b", "svc", "fn", "ray", "request_response", None, "ServiceUnavailable")
    assert r.counts[("sage_calls_total", ("b", "svc", "fn", "shm", "request_response"))] == 17
    assert r.counts[("sage_call_timeouts_total", ("b", "svc", "fn", "shm"))] == 1
    assert r.counts[("sage_call_errors_total", ("b", "svc", "fn", "ray", "ServiceUnavailable"))] == 1
    assert len(r.samples[("b", "svc", "fn", "shm")]) == 16 // metrics.SAMPLE_EVERY


def test_every_recorded_key_matches_its_metric_tags():
    r = _Recorder()
    r._thread = object()
    r.call("b", "s", "f", "shm", "load_balanced", 0.001, "RemoteError")
    r.count("sage_messages_delivered_total", ("b", "ray"))
    r.gauge("sage_ring_fill_ratio", ("b", "s", "s#1"), 0.5)
    for name, tags in list(r.counts) + list(r.gauges):
        assert len(tags) == len(METRICS[name][2]), name


def test_disabled_recording_records_nothing():
    r = _Recorder()
    r._thread = object()
    metrics.set_enabled(False)
    try:
        r.call("b", "s", "f", "shm", "request_response", 0.001)
        r.count("sage_messages_published_total", ("b",))
    finally:
        metrics.set_enabled(True)
    assert r.counts == {} and r.samples == {}


def test_env_switch_turns_recording_off_in_a_real_process():
    """SAGE_COMM_METRICS=0, as the README promises: a process that makes real
    calls records nothing and starts no flusher thread."""
    import os
    import subprocess
    import sys

    code = (
        "import json, threading, ray\n"
        "from sage_ray_comm import BaseService, FunctionClient, service_function, metrics\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "class S(BaseService):\n"
        "    @service_function\n"
        "    def f(self, x):\n"
        "        return x\n"
        "S('s').start(bus='metrics-off')\n"
        "c = FunctionClient(bus='metrics-off')\n"
        "assert [c.call('s', 'f', i) for i in range(50)] == list(range(50))\n"
        "print('RESULT ' + json.dumps({'enabled': metrics.enabled(), 'counts': len(metrics.recorder.counts),\n"
        "      'threads': sorted(t.name for t in threading.enumerate() if t.name == 'sage-metrics')}))\n"
    )
    out = {}
    for value in ("0", "1"):
        p = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, SAGE_COMM_METRICS=value),
        )
        assert p.returncode == 0, p.stderr[-3000:]
        import json

        out[value] = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert out["0"] == {"enabled": False, "counts": 0, "threads": []}
    assert out["1"]["enabled"] is True and out["1"]["counts"] > 0 and out["1"]["threads"] == ["sage-metrics"]
