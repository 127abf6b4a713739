"""Segment names, process liveness and gc helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from _wait import wait_for

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


# ---------------------------------------------------------------- collection
_HOLDER = """
import sys, time
from sage_ray_comm import SageQueue
q = SageQueue(sys.argv[2], 4096, auto_cleanup=False, namespace=sys.argv[1], create={create})
print("ready", flush=True)
sys.stdin.read()  # holds the segment until the test closes stdin
"""


def _holder(ns: str, name: str, create: bool) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(create=create), ns, name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "ready"
    return p


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_gc_never_removes_a_segment_a_live_process_uses():
    ns = f"bus.gc-live-{os.getpid()}"
    creator = _holder(ns, "req.svc", True)
    user = _holder(ns, "req.svc", False)  # a caller that attached
    try:
        _kill(creator)
        assert shm.gc(ns) == [], "the creator died, but a live process still uses it"
        assert shm.segment_name(ns, "req.svc") not in {s.shm_name for s in shm.gc_buses(dry_run=True)}
        user.stdin.close()
        user.wait()
        assert [s.shm_name for s in shm.gc(ns)] == [shm.segment_name(ns, "req.svc")]
    finally:
        for p in (creator, user):
            if p.poll() is None:
                _kill(p)
        shm.gc(ns, keep_legacy=False)


def test_legacy_queues_outlive_their_creator_until_their_bus_ends():
    ns = f"bus.gc-legacy-{os.getpid()}"
    p = _holder(ns, "legacy.jobs", True)
    _kill(p)
    (seg,) = shm.list_segments(ns)
    assert seg.legacy and seg.stale
    assert shm.gc(ns) == [] and seg.shm_name not in {s.shm_name for s in shm.gc_buses(dry_run=True)}
    assert [s.shm_name for s in shm.gc(ns, keep_legacy=False)] == [seg.shm_name]  # what bus.shutdown() runs


_ATTACHER = """
import os, sys
from sage_ray_comm import SageQueue
ns, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
kids = []
for i in range(n):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        q = SageQueue(name, namespace=ns, auto_cleanup=False, create=False)
        os.write(w, b"x")
        os.read(0, 1)  # parent's stdin closes: exit
        os._exit(0)
    os.read(r, 1)
    kids.append(pid)
print("attached", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_attach_table_overflow_never_leads_to_a_wrong_removal():
    """65 processes attach to a table of 64 slots. The one left out still
    uses the segment after every listed process and the creator are gone:
    gc must see it (through its mapping), and remove the segment only after."""
    ns = f"bus.gc-overflow-{os.getpid()}"
    creator = _holder(ns, "req.big", True)
    listed = subprocess.Popen(
        [sys.executable, "-c", _ATTACHER, ns, "req.big", "63"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert listed.stdout.readline().strip() == "attached"
    unlisted = _holder(ns, "req.big", False)  # the 65th: no slot left
    try:
        (seg,) = shm.list_segments(ns)
        assert seg.attach_overflow and seg.live_attached == 64
        _kill(creator)
        listed.stdin.close()
        listed.wait()
        wait_for(lambda: shm.list_segments(ns)[0].live_attached == 0, 30, "the listed processes to exit")
        (seg,) = shm.list_segments(ns)
        assert seg.live_attached == 0 and not seg.creator_alive
        assert shm.gc(ns) == [], "an unlisted live user must keep the segment"
        unlisted.stdin.close()
        unlisted.wait()
        assert [s.shm_name for s in shm.gc(ns)] == [seg.shm_name]
    finally:
        for p in (creator, listed, unlisted):
            if p.poll() is None:
                p.kill()
                p.wait()
        shm.gc(ns, keep_legacy=False)
