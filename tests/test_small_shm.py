"""A small /dev/shm (a container's default is 64 MiB): warned about once,
with the sizes, and what does not fit goes through Ray. Nothing crashes (no
SIGBUS from an over-committed tmpfs: rings are reserved with fallocate) and
nothing hangs. The driver runs in its own mount namespace on a real 12 MiB
tmpfs, as root (CI and a fresh machine's setup run as root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_services_work_on_a_12_mib_dev_shm(tmp_path):
    assert os.geteuid() == 0 and shutil.which("unshare"), "needs root and util-linux's unshare to mount a small tmpfs"
    bus = f"small-{uuid.uuid4().hex[:6]}"
    script = (
        f"mount -t tmpfs -o size=12m tmpfs /dev/shm && exec {sys.executable} "
        f"{os.path.join(HERE, '_small_shm_driver.py')} {bus}"
    )
    with open(tmp_path / "out", "w") as o, open(tmp_path / "err", "w") as e:
        rc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=o,
            stderr=e,
            timeout=240,
            cwd=str(tmp_path),
        ).returncode
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert rc == 0, f"rc={rc}\n{out[-2000:]}\n{err[-5000:]}"
    r = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT ") :])
    assert r["total_mib"] == 12
    assert r["results_ok"] and r["async"] == "async" and r["big_ok"]
    assert r["ringless_replicas"] == 1  # the second replica's 8 MiB ring did not fit
    # the caller's reply ring did not fit either: every call went over Ray, counted once
    assert r["stats"] == {"shm": 0, "ray": 22, "errors": 0}
    assert "/dev/shm has no room" in r["local_error"] and "Deploy it as Ray actors" in r["local_error"]
    warnings = [ln for ln in err.splitlines() if "/dev/shm is short" in ln]
    assert len(warnings) == 1, warnings  # once per process, with the sizes
    assert "MiB free of 12 MiB" in warnings[0] and "8 MiB" in warnings[0]
