"""Transport pieces on their own: oversize segments, ring handles, malloc tuning."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from sage_ray_comm import QueueNotFound, SageQueue, ServiceUnavailable, shm
from sage_ray_comm.transport import RingPool, SegmentBlob, tune_malloc


def test_segment_blob_is_read_once_and_removed(ns):
    a = np.arange(1 << 20, dtype=np.float64)
    blob = SegmentBlob.put(({"a": a},), ns)
    assert blob.nbytes >= a.nbytes
    assert [s.shm_name for s in shm.list_segments(ns)] != []
    again = pickle.loads(pickle.dumps(blob))  # travels inside a frame
    (got,) = again.get()
    assert np.array_equal(got["a"], a)
    assert shm.list_segments(ns) == [], "the reader removes the segment"
    with pytest.raises(ServiceUnavailable, match="is gone"):
        blob.get()
    blob.discard()  # idempotent


def test_discard_removes_an_unread_blob(ns):
    blob = SegmentBlob.put(b"x" * 100_000, ns)
    blob.discard()
    assert shm.list_segments(ns) == []


def test_ring_pool_opens_by_name_and_evicts(ns):
    rings = [SageQueue(f"r{i}", 4096, namespace=ns) for i in range(4)]
    pool = RingPool(ns, limit=2)
    for i in range(4):
        pool.get(f"r{i}").put(i)
    assert len(pool._rings) == 2
    assert [r.get(timeout=1) for r in rings] == [0, 1, 2, 3]
    with pytest.raises(QueueNotFound):
        pool.get("missing")
    pool.close()
    for r in rings:
        r.release()


def test_malloc_tuning_applies_on_glibc():
    assert tune_malloc() is True or os.environ.get("SAGE_COMM_TUNE_MALLOC") == "0"


@pytest.mark.slow
def test_out_of_band_object_refs_do_not_resolve(ray_session):
    """Why oversize payloads use segments and not ObjectRefs in the frame: an
    ObjectRef pickled outside Ray's task arguments cannot be fetched by another
    worker (Ray 2.x). If this starts passing, the object store can take over."""
    ray = ray_session

    @ray.remote(num_cpus=0.1)
    def fetch(b):
        try:
            return ray.get(pickle.loads(b), timeout=3)
        except ray.exceptions.GetTimeoutError:
            return "timeout"

    ref = ray.put(np.ones(10))
    assert ray.get(fetch.remote(pickle.dumps(ref)), timeout=60) == "timeout"
