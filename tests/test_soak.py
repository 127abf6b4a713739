"""The soak run of benchmarks/soak.py, two minutes, in CI: random replica
kills under load lose nothing acknowledged and leak no segment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_minute_soak(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--minutes", "2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=380,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["messages_lost"] == 0 and report["segments_leaked"] == 0
    assert report["calls_failed_untyped"] == 0
    assert report["replica_kills"] >= 10 and report["calls_ok"] > 1000
