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


def _run_app(name: str) -> dict:
    app = os.path.join(os.path.dirname(__file__), name)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    )
    p = subprocess.run([sys.executable, app], capture_output=True, text=True, timeout=280, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def test_locality_follows_load_on_three_nodes():
    """A replica and a caller on each of three raylets. Callers that make one
    call at a time stay on their own node; a caller with 24 calls in flight
    fills its local replica up to the threshold and spills the rest over."""
    r = _run_app("_scaleout_app.py")
    nodes = sorted([r["head"], *r["workers"]])
    assert r["replica_nodes"] == nodes, "one replica per node (SPREAD)"
    for light in r["light"]:
        assert light["got"] == {light["node"]: 30}, light  # all local
    heavy = r["heavy"]
    got = heavy["got"]
    assert heavy["node"] == r["head"] and sum(got.values()) == 24 * 8
    local, remote = got.get(r["head"], 0), [got.get(w, 0) for w in r["workers"]]
    assert local > max(remote), got  # locality still wins most calls
    assert min(remote) >= 0.1 * sum(got.values()), got  # but both other nodes took real load


def test_cross_node_and_same_node_paths():
    r = _run_app("_multinode_app.py")
    assert r["head"] != r["worker"]
    # driver (head) -> service on the worker node: the Ray path
    assert r["far_node"] == r["worker"]
    assert (r["after_far"]["ray"], r["after_far"]["shm"]) == (1, 0)
    # driver -> in-process service in the driver itself: shared memory
    assert r["near_node"] == r["head"]
    assert (r["after_near"]["ray"], r["after_near"]["shm"]) == (1, 1)
    assert (r["far_async"], r["far_acall"]) == ("async", "acall")
    assert r["stream_ok"] and r["stream_ray_calls"] >= 5000 // 64  # the opening call and the fetches
    assert r["pipelined_ok"]
    counts = r["pipelined_counts"]  # the two async calls above, and the 600
    assert counts["calls"] == 602 and counts["ray_calls"] < counts["calls"], counts
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
    # the bus's router runs where the bus was made (the driver's node), not on any worker
    assert r["router_node"] == r["head"]
    # one hop to deployed replicas; the gateway only for in-process services
    assert r["worker_gateway_calls"] == 0 and r["head_gateway_calls"] >= 1
    # an event for two subscribers on the worker: one frame to that node, two deliveries
    assert r["fan_published"] == [2] * 5 and r["fan_got"] == [5, 5]
    assert (r["fan_frames"], r["fan_delivered"]) == (5, 10)
    # a segment janitor on every node that has a replica or a caller
    assert r["janitors"] == {r["head"]: 5.0, r["worker"]: 5.0}
