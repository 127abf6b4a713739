"""Shared fixtures.

- ``ns``: a fresh namespace per test, so every test gets its own shared-memory
  names; at teardown no segment of that namespace may be left behind.
- ``SAGE_TEST_CORE=path``: use that build of ``sage_ray_comm._core``.
- ``ray_session``: one local Ray instance for the whole session (started on
  first use); actors get fractional ``num_cpus``.
- ``RAY_ADDRESS=local`` for every process the suite starts: none joins a
  cluster the machine happens to run.
"""

from __future__ import annotations

import gc as _pygc
import os
import re
import uuid

import _core_override  # noqa: F401  (must precede the package import)
import pytest

from sage_ray_comm import shm

# Every process the suite starts (drivers, examples, notebooks, the demo) starts
# its own Ray, as on a fresh machine, even when this machine runs a cluster a
# plain `ray.init()` would join (`ray start`, a test cluster left by a killed
# run). Tests about joining a cluster drop this from their subprocess's
# environment (test_ray_jobs).
os.environ["RAY_ADDRESS"] = "local"


def _unique_name(request) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:24].strip("-")
    return f"t-{base}-{uuid.uuid4().hex[:8]}"


def _assert_no_segments(namespace: str, what: str) -> None:
    # Handles dropped by the test are released by their finalizers.
    _pygc.collect()
    left = shm.list_segments(namespace)
    for s in left:
        try:
            os.unlink(shm.SHM_DIR + s.shm_name)
        except FileNotFoundError:
            pass
    assert not left, f"{what} leaked shared-memory segments: {[s.shm_name for s in left]}"


@pytest.fixture
def ns(request) -> str:
    name = _unique_name(request)
    yield name
    _assert_no_segments(name, "test")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    saved = os.environ.get("PYTHONPATH")
    if not ray.is_initialized():
        # Workers import service classes defined in test modules by name; they
        # inherit the environment at ray.init, which is restored right after.
        here = os.path.dirname(os.path.abspath(__file__))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, saved) if p)
        ray.init(
            address="local",  # never join a cluster some test started with `ray start` (test_ray_jobs)
            num_cpus=4,  # logical CPUs for scheduling fractional actors; the machine has 2 cores
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            namespace="sage_ray_comm_tests",
        )
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    yield ray
    ray.shutdown()


@pytest.fixture
def bus(request, ray_session) -> str:
    """A fresh bus (router, registry, shared-memory namespace) for one test.

    At teardown the bus is shut down (its services stopped, its router
    killed), and no segment of its namespace may be left behind.
    """
    from sage_ray_comm import get_communication_bus
    from sage_ray_comm.router import bus_namespace

    name = _unique_name(request)
    yield name
    get_communication_bus(name).shutdown(collect=False)
    # Before shutdown's gc, which would hide them: whatever a test's own
    # processes left behind. Only tests that SIGKILL processes on purpose
    # (marked `kills`) may leave segments of the dead for gc.
    _pygc.collect()
    left = [
        s for s in shm.list_segments(bus_namespace(name)) if not (s.stale and request.node.get_closest_marker("kills"))
    ]
    shm.gc(bus_namespace(name), keep_legacy=False)
    assert not left, f"bus left segments before gc: {[(s.shm_name, s.creator_pid, s.creator_alive) for s in left]}"
    _assert_no_segments(bus_namespace(name), "bus")
