"""Two raylets on one machine (ray.cluster_utils.Cluster): a cross-node call
takes the Ray path, a same-node call the shared-memory path, with the same
results and errors. Runs in its own process, since it needs its own Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


def test_cross_node_and_same_node_paths():
    app = os.path.join(os.path.dirname(__file__), "_multinode_app.py")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    )
    p = subprocess.run([sys.executable, app], capture_output=True, text=True, timeout=280, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    r = json.loads(lines[-1][len("RESULT ") :])
    assert r["head"] != r["worker"]
    # driver (head) -> service on the worker node: the Ray path
    assert r["far_node"] == r["worker"]
    assert (r["after_far"]["ray"], r["after_far"]["shm"]) == (1, 0)
    # driver -> in-process service in the driver itself: shared memory
    assert r["near_node"] == r["head"]
    assert (r["after_near"]["ray"], r["after_near"]["shm"]) == (1, 1)
    assert (r["far_async"], r["far_acall"]) == ("async", "acall")
    # same semantics across nodes: big payloads, typed errors
    assert r["big_ok"] is True
    assert r["remote_error"] == "RemoteError:builtins.ZeroDivisionError"
    assert "no function 'nope'" in r["function_not_found"]
    # a caller on the worker node: shm to its neighbour, Ray to the driver's service
    w = r["worker_caller"]
    assert w["node"] == r["worker"] and w["far"] == r["worker"] and w["near"] == r["head"]
    assert (w["shm"], w["ray"]) == (1, 1)
    # an event published on the worker reaches a callback in the driver on the head
    assert w["delivered"] == 1 and r["event"] == {"node": r["worker"]}
    assert r["leaked"] == []
    # same-node replicas first, on a real two-node cluster: one replica per node,
    # and each caller's 20 calls all went to the replica on its own node
    assert r["spread_nodes"] == sorted([r["head"], r["worker"]])
    assert r["spread_from_head"] == [r["head"]]
    assert w["spread"] == [r["worker"]]
    # a segment janitor on every node that has a replica or a caller
    assert r["janitors"] == {r["head"]: 5.0, r["worker"]: 5.0}
