"""A driver that ends with library objects still open exits with its own
status, prints what it printed, and leaves nothing in /dev/shm.

Before the lifecycle hook, a driver whose registry watcher or bridge thread
still ran at interpreter exit was ended by Ray with _exit(1) (1 run in 2 for a
bare FunctionClient, 4 in 4 for an open legacy adapter), so `ray job submit`
reported correct jobs as FAILED. Each kind of object is left open by a real
subprocess driver, with stdout and stderr redirected to files (as under
`ray job submit` or CI), run twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from sage_ray_comm import lifecycle, shm
from sage_ray_comm.router import bus_namespace

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ["adapter", "bridge", "subscription", "inproc", "deployed", "pending", "client", "stream"]


def run_driver(tmp_path, kind: str, *extra: str) -> tuple:
    bus = f"exit-{kind}-{uuid.uuid4().hex[:6]}"
    out, err = tmp_path / f"{bus}.out", tmp_path / f"{bus}.err"
    with open(out, "w") as o, open(err, "w") as e:  # files, not a tty or pipe we drain
        rc = subprocess.run(
            [sys.executable, os.path.join(HERE, "_exit_driver.py"), kind, bus, *extra],
            stdout=o,
            stderr=e,
            timeout=180,
            cwd=str(tmp_path),
        ).returncode
    return rc, out.read_text(), err.read_text(), bus


def assert_clean(rc: int, out: str, err: str, bus: str, kind: str) -> None:
    assert rc == 0, f"{kind}: exit status {rc}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
    assert f"OK {kind}" in out, out
    assert "Traceback" not in err, err[-4000:]
    # Checked at once: the node's janitor only takes segments idle for
    # JANITOR_GRACE seconds, so whatever is found here the driver left.
    left = shm.list_segments(bus_namespace(bus))
    for s in left:
        os.unlink(shm.SHM_DIR + s.shm_name)
    assert not left, f"{kind}: the driver left {[s.shm_name for s in left]}"


@pytest.mark.parametrize("run", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(240)
def test_driver_ending_with_object_open_exits_zero(tmp_path, kind, run):
    assert_clean(*run_driver(tmp_path, kind), kind)


@pytest.mark.parametrize("kind", ["adapter", "bridge", "inproc", "pending", "client", "private", "stream"])
@pytest.mark.timeout(240)
def test_explicit_ray_shutdown_before_exit(tmp_path, kind):
    rc, out, err, bus = run_driver(tmp_path, kind, "--explicit-shutdown")
    assert "ray.shutdown() returned" in out, out
    assert "threads left: []" in out, out
    assert "ray after dropping them: False" in out, out
    assert_clean(rc, out, err, bus, kind)


def test_stages_close_in_order():
    """Pure logic: producers (bridges) close before services, services before
    endpoints, metrics last, whatever the order of registration."""
    seen = []

    class Thing:
        def __init__(self, name):
            self.name = name

    reg = lifecycle.Closers()  # not the process's own: that would close other tests' objects
    things = {stage: Thing(stage) for stage in reversed(lifecycle.STAGES)}
    for stage, t in things.items():
        reg.add(t, stage, lambda o: seen.append(o.name))
    boom = Thing("boom")
    reg.add(boom, "bridges", lambda o: 1 / 0)  # one failing closer stops nothing else
    reg.close_all()
    assert seen == list(lifecycle.STAGES)
    seen.clear()
    reg.close_all()  # closed objects are forgotten: nothing runs twice
    assert seen == []
    with pytest.raises(ValueError, match="unknown lifecycle stage"):
        reg.add(Thing("x"), "later", lambda o: None)
