"""Every script in examples/ runs as a user would run it (each starts its own Ray)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str, timeout: int = 180) -> str:
    r = subprocess.run([sys.executable, f"examples/{name}"], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_queue_workers_example():
    out = run_example("queue_workers.py", 120)
    assert "300 jobs done by 3 workers" in out
    assert "another namespace saw 0 jobs" in out


@pytest.mark.slow
def test_data_pipeline_example():
    out = run_example("data_pipeline.py")
    assert "cleaned 1000 orders" in out and "large orders announced: 100" in out and out.rstrip().endswith("OK")


@pytest.mark.slow
def test_event_broadcast_example():
    out = run_example("event_broadcast.py")
    assert "published motor.pump.rpm               -> 0 subscriber(s)" in out
    assert "published sensor.kitchen.temperature   -> 3 subscriber(s)" in out
    assert out.rstrip().endswith("OK")


@pytest.mark.slow
def test_load_balanced_service_example():
    out = run_example("load_balanced_service.py")
    assert "600 calls, all correct: True" in out and "replicas in the registry now: 2" in out
    assert out.rstrip().endswith("OK")


@pytest.mark.slow
def test_legacy_migration_example():
    out = run_example("legacy_migration.py")
    assert "stage 1 (adapter only): consumed 100" in out
    assert "stage 2 (mixed): consumed 300" in out
    assert "stage 3 (migrated): consumed 400, total 1000" in out
    assert out.rstrip().endswith("OK")


@pytest.mark.slow
def test_ray_job_example_as_a_plain_script():
    # As a job it is tested in test_ray_jobs.py; run plainly it starts its own Ray.
    out = run_example("ray_job.py")
    assert "'Ray actor calls': 3 words, 2 known (Tokens)" in out
    assert "'a shared memory ring per service': 6 words, 4 known (Tokens)" in out
    assert "services: dictionary, tokenizer" in out


@pytest.mark.slow
def test_traced_pipeline_example():
    """Ray's tracing startup hook sets up OpenTelemetry in every worker; one
    request through three services is one trace."""
    out = run_example("traced_pipeline.py")
    assert "6 spans in 1 trace, SERVER spans in 3 processes" in out and out.rstrip().endswith("OK")
