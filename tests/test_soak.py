"""The soak run of benchmarks/soak.py in CI: random SIGKILLs of replicas and
of caller processes, then of the stateful stage, and the same zeros the
README reports: 0 failed, 0 wrong, 0 lost in the first phase; only typed
failures, no hang and recovery after each kill in the second; 0 segments
leaked after the library's own collection."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_soak(tmp_path, *flags: str) -> tuple[dict, subprocess.CompletedProcess]:
    """benchmarks/soak.py with ``flags``, as a user runs it: its JSON report and the process."""
    out = tmp_path / "soak.json"
    r = subprocess.run(
        [sys.executable, "benchmarks/soak.py", *flags, "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=560,
    )
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak(tmp_path):
    report, r = _run_soak(tmp_path, "--minutes", "2")
    p1, p2 = report["phase1"], report["phase2"]
    # phase 1: replicas of the stateless stage and callers killed
    assert p1["replica_kills"] >= 5 and p1["caller_kills"] >= 5, p1
    assert p1["calls_ok"] > 1000 and p1["acknowledged"] > 1000, p1
    assert (p1["calls_failed"], p1["wrong_replies"], p1["lost"]) == (0, 0, 0), p1
    # phase 2: the stateful stage killed
    assert p2["aggregate_kills"] >= 1, p2
    assert p2["calls_failed_untyped"] == 0 and p2["wrong_replies"] == 0, p2
    assert p2["recovered_after_s"] and all(x is not None for x in p2["recovered_after_s"]), p2
    assert report["hangs"] == 0, report["slowest_call_s"]
    assert report["segments_leaked"] == 0, report["leaked"]
    assert r.returncode == 0 and report["ok"] is True, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(600)
def test_soak_on_three_nodes(tmp_path):
    """The short CI version of ``soak.py --nodes 3``: replicas on other nodes
    SIGKILLed, callers SIGKILLed, and a whole worker node removed mid-run."""
    report, r = _run_soak(tmp_path, "--nodes", "3", "--minutes", "1.5")
    p1, p2 = report["phase1"], report["phase2"]
    assert report["node_removed"]["node"] and report["node_removed"]["replicas"] >= 1, report["node_removed"]
    assert p1["replica_kills"] >= 3 and p1["caller_kills"] >= 3, p1
    assert None not in report["replica_kills_by_node"], report["replica_kills_by_node"]
    assert p1["calls_ok"] > 300 and p1["acknowledged"] > 300, p1
    assert (p1["calls_failed"], p1["wrong_replies"], p1["lost"]) == (0, 0, 0), p1
    assert p2["calls_failed_untyped"] == 0 and p2["wrong_replies"] == 0, p2
    assert report["hangs"] == 0, report["slowest_call_s"]
    assert report["segments_leaked"] == 0, report["segments_leaked_by_node"]
    assert r.returncode == 0 and report["ok"] is True, r.stdout[-3000:] + r.stderr[-3000:]
