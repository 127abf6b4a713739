"""Every script in examples/ runs as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_queue_workers_example():
    r = subprocess.run([sys.executable, "examples/queue_workers.py"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "300 jobs done by 3 workers" in r.stdout
    assert "another namespace saw 0 jobs" in r.stdout
