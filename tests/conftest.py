"""Shared fixtures.

- ``ns``: a fresh namespace per test, so every test gets its own shared-memory
  names; at teardown no segment of that namespace may be left behind.
- ``SAGE_TEST_CORE=path``: use that build of ``sage_ray_comm._core``.
- ``ray_session``: one local Ray instance for the whole session (started on
  first use); actors get fractional ``num_cpus``.
"""

from __future__ import annotations

import gc as _pygc
import os
import re
import uuid

import pytest

import _core_override  # noqa: F401  (must precede the package import)
from sage_ray_comm import shm  # noqa: E402


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

    if not ray.is_initialized():
        # Workers import service classes defined in test modules by name.
        here = os.path.dirname(os.path.abspath(__file__))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        ray.init(
            address="local",  # never join a cluster some test started with `ray start` (test_ray_jobs)
            num_cpus=4,  # logical CPUs for scheduling fractional actors; the machine has 2 cores
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            namespace="sage_ray_comm_tests",
        )
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
    get_communication_bus(name).shutdown()
    _assert_no_segments(bus_namespace(name), "bus")
