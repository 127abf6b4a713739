"""Segment names, process liveness and gc helpers."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from sage_ray_comm import SageQueue, _core, shm


def test_segment_names_are_deterministic_scoped_and_safe():
    a = shm.segment_name("job-1", "ingest")
    assert a == shm.segment_name("job-1", "ingest")
    assert a != shm.segment_name("job-2", "ingest")
    assert a != shm.segment_name("job-1", "ingest2")
    weird = shm.segment_name("ns with spaces/and/slashes" * 10, "q\x00/..\n" * 40)
    assert weird.startswith("/" + shm.PREFIX) and "/" not in weird[1:] and len(weird) < 200
    # Sanitising maps both to the same text; the digest keeps them apart.
    assert shm.segment_name("a.b", "q") != shm.segment_name("a_b", "q")
    with pytest.raises(ValueError):
        shm.segment_name("", "q")
    with pytest.raises(ValueError):
        shm.segment_name("ns", "")


def test_default_namespace_comes_from_environment(monkeypatch):
    monkeypatch.setenv("SAGE_COMM_NAMESPACE", "from-env")
    assert shm.default_namespace() == "from-env"
    monkeypatch.delenv("SAGE_COMM_NAMESPACE")
    assert shm.default_namespace() == "default"


def test_process_liveness_sees_dead_and_zombie_processes():
    assert _core.process_alive(os.getpid())
    start = _core.process_start_time(os.getpid())
    assert start > 0
    assert not _core.process_alive(os.getpid(), start + 1)  # same pid, other start: reused pid
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert _core.process_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        # Not reaped yet: a zombie, which must count as dead (a claim it held
        # will never be committed).
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert not _core.process_alive(child.pid)
    finally:
        child.wait()
    assert not _core.process_alive(child.pid)


def test_list_segments_filters_by_namespace(ns):
    with SageQueue("a", namespace=ns), SageQueue("b", namespace=ns), SageQueue("c", namespace=ns + "x"):
        names = {s.shm_name for s in shm.list_segments(ns)}
        assert names == {shm.segment_name(ns, "a"), shm.segment_name(ns, "b")}
        seg = shm.list_segments(ns)[0]
        assert seg.valid and seg.creator_alive and seg.live_attached >= 1 and not seg.stale
        assert seg.size == _core.HEADER_SIZE + (1 << 20)
