"""The sage-comm command, run as a user runs it."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys

import _workers
import pytest

from sage_ray_comm import shm


def run(*args, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_pipeline_runs_and_checks_itself():
    # Its own embedded Ray, as on a fresh machine.
    r = run("sage-comm", "demo", "--records", "2000", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "check             OK" in out
    assert "ray               a local Ray started for the demo, bus demo-" in out
    assert re.search(r"throughput\s+[\d,]+ records/s", out)
    assert re.search(r"p50 [\d,]+ us\s+p99 [\d,]+ us", out)
    m = re.search(r"transports\s+(\d+) calls over shared memory, (\d+) over Ray", out)
    assert m and int(m.group(1)) == 2 * 2000 + 5 and int(m.group(2)) == 0  # one node: all shm
    loads = [int(x) for x in re.findall(r"featurize#\d: (\d+)", out)]
    assert len(loads) == 3 and sum(loads) == 2000 and min(loads) > 0
    assert "streaming [" in r.stderr


def test_queue_demo_runs_and_checks_its_result():
    r = run("sage-comm", "queue-demo", "--messages", "5000")
    assert r.returncode == 0, r.stderr
    assert "expected 12497500): OK" in r.stdout
    assert "0 dropped" in r.stdout


def test_status_shows_a_live_bus(bus, ray_session):
    from sage_ray_comm import BaseService, create_queue_adapter, get_communication_bus, service_function

    class Shown(BaseService):
        @service_function
        def ping(self):
            return "pong"

        @service_function
        def other(self):
            return 1

    svc = Shown("shown").start(bus=bus)
    get_communication_bus(bus).start().subscribe("status.*", lambda p: None)
    q = create_queue_adapter("legacy_q", bus=bus)
    address = ray_session.get_runtime_context().gcs_address
    r = run("sage-comm", "status", "--bus", bus, "--address", address)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"bus '{bus}'" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("shown "))
    assert "other, ping" in row and " yes " in row and str(os.getpid()) in row
    assert "status.*" in r.stdout and "legacy_q" in r.stdout
    r = run("sage-comm", "status", "--bus", "no-such-bus-xyz", "--address", address)
    assert r.returncode == 1 and "no bus 'no-such-bus-xyz'" in r.stderr and bus in r.stderr
    q.close()
    svc.stop()


def test_status_without_a_cluster_says_so():
    r = run("sage-comm", "status", "--address", "127.0.0.1:1", timeout=120)
    assert r.returncode != 0 and "no running Ray cluster at 127.0.0.1:1" in r.stderr


def test_module_entry_point_matches_console_script():
    r = run(sys.executable, "-m", "sage_ray_comm", "--help")
    assert r.returncode == 0 and "demo" in r.stdout and "gc" in r.stdout


def test_gc_command_removes_only_stale_segments(ns):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_workers.create_and_linger, args=(ns, "orphan", child))
    p.start()
    assert parent.recv() == "created"
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    orphan = shm.segment_name(ns, "orphan")

    r = run("sage-comm", "segments", "--namespace", ns)
    assert r.returncode == 0 and orphan in r.stdout and "True" in r.stdout

    r = run("sage-comm", "gc", "--namespace", ns, "--dry-run")
    assert r.returncode == 0 and f"would remove {orphan}" in r.stdout
    assert os.path.exists(shm.SHM_DIR + orphan)

    r = run("sage-comm", "gc", "--namespace", ns)
    assert r.returncode == 0 and "removed 1 stale segment(s)" in r.stdout
    assert not os.path.exists(shm.SHM_DIR + orphan)


def test_unknown_command_fails_with_usage():
    r = run("sage-comm", "frobnicate")
    assert r.returncode == 2 and "usage" in r.stderr
