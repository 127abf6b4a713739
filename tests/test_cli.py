"""The sage-comm command, run as a user runs it."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import _workers
from sage_ray_comm import shm


def run(*args, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_and_checks_its_result():
    r = run("sage-comm", "demo", "--messages", "5000")
    assert r.returncode == 0, r.stderr
    assert "expected 12497500): OK" in r.stdout
    assert "0 dropped" in r.stdout


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
