"""The services in a real browser: Ray's dashboard in headless Chromium shows
them by name, and the node's Prometheus endpoint has their metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]


INSTALL_CHROMIUM = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"


def _chromium() -> str:
    """Debian's headless Chromium: installed here when the suite runs as root
    (a fresh machine or CI); otherwise the test fails with the command to run.
    Never a skip: a skipped browser test would hide a missing install."""
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0:
        subprocess.run(INSTALL_CHROMIUM, shell=True, check=False, capture_output=True, timeout=900)
        path = shutil.which("chromium")
    assert path, f"this test needs Debian's chromium; install it with: sudo sh -c '{INSTALL_CHROMIUM}'"
    return path


@pytest.mark.timeout(1300)
def test_actors_page_and_prometheus_metrics(tmp_path):
    _chromium()
    app = os.path.join(os.path.dirname(__file__), "_dashboard_app.py")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    )
    # A throwaway cluster on 127.0.0.1: skip Ray's token prompt, which a headless
    # browser cannot answer (users with token auth paste `ray get-auth-token`).
    env["RAY_AUTH_MODE"] = "disabled"
    p = subprocess.run([sys.executable, app, str(tmp_path)], capture_output=True, text=True, timeout=380, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    r = json.loads(lines[-1][len("RESULT ") :])
    assert all(r["names_on_page"].values()), r["names_on_page"]
    assert r["screenshot"] and r["screenshot_bytes"] > 10_000, "a real screenshot was saved"
    m = r["metric_lines"]
    calls = [ln for ln in m if ln.startswith("ray_sage_calls_total")]
    assert any(
        re.search(r'bus="dashboard_bus"', ln)
        and 'service="calculator"' in ln
        and 'function="add"' in ln
        and 'transport="shm"' in ln
        and 'pattern="request_response"' in ln
        for ln in calls
    ), calls
    assert any(ln.startswith("ray_sage_call_latency_seconds_bucket") and 'service="formatter"' in ln for ln in m)
    assert any(ln.startswith("ray_sage_replica_in_flight") and 'replica="calculator#1"' in ln for ln in m)
    assert any(ln.startswith("ray_sage_ring_fill_ratio") for ln in m)
    # Streams and cancellation: an open stream, its items, and 20 calls cancelled before they ran.
    assert any(
        ln.startswith("ray_sage_streams_active") and 'service="formatter"' in ln and ln.endswith(" 1.0") for ln in m
    )
    assert any(ln.startswith("ray_sage_stream_items_total") and 'service="formatter"' in ln for ln in m)
    assert r["cancelled"] == 20
    assert any(ln.startswith("ray_sage_calls_cancelled_total") and ln.endswith(" 20.0") for ln in m)
    # The arena: a 1 MiB slot of the formatter's, held by the driver.
    assert any(
        ln.startswith("ray_sage_arena_fill_ratio") and 'service="formatter"' in ln and float(ln.split()[-1]) > 0
        for ln in m
    )
    # and `sage-comm metrics` prints them, from another process
    assert "ray_sage_calls_total" in r["cli_metrics"] and 'bus="dashboard_bus"' in r["cli_metrics"]
