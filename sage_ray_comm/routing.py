"""Which replica takes a call: the routing policies, pure logic with no I/O.

>>> from sage_ray_comm.routing import POLICIES
>>> POLICIES
('least_outstanding', 'round_robin')
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterable, Sequence

from .router import InstanceInfo, Subscription
from .topics import topic_matches

__all__ = ["DEFAULT_POLICY", "IMBALANCED_THRESHOLD", "POLICIES", "pick_instance", "publish_targets"]

POLICIES = ("least_outstanding", "round_robin")
DEFAULT_POLICY = POLICIES[0]
# Calls in flight (from one process) by which the least loaded replica on the
# caller's node may exceed the least loaded one elsewhere before calls spill
# over to other nodes. A cross-node call costs ~0.5 ms more than a same-node
# one here: worth it only once a local replica has a real queue.
IMBALANCED_THRESHOLD = int(os.environ.get("SAGE_COMM_IMBALANCED_THRESHOLD", "4"))


def pick_instance(
    candidates: Sequence[InstanceInfo],
    policy: str,
    outstanding: dict[str, int],
    local_node: str | None,
    rr: Iterable[int],
    rng: random.Random = random,  # type: ignore[assignment]
    imbalanced_threshold: int | None = None,
) -> InstanceInfo:
    """Chooses a replica: same-node ones first while their load allows, then
    by ``policy``.

    - Locality follows load (as Ray Serve's ``imbalanced_threshold``): the
      replicas on this node take the call while the least loaded of them has
      at most ``imbalanced_threshold`` (default :data:`IMBALANCED_THRESHOLD`)
      more calls in flight from this process than the least loaded replica
      elsewhere; past that, the call spills over to the other nodes.
    - ``round_robin``: the next replica in instance-id order.
    - ``least_outstanding``: power of two choices: two replicas at random,
      the one with fewer calls this process has in flight (ties: either).
    """
    local = [c for c in candidates if c.node_id == local_node]
    pool = local or candidates
    if local and len(local) < len(candidates):
        limit = IMBALANCED_THRESHOLD if imbalanced_threshold is None else imbalanced_threshold
        remote = [c for c in candidates if c.node_id != local_node]
        least_local = min(outstanding.get(c.instance_id, 0) for c in local)
        least_remote = min(outstanding.get(c.instance_id, 0) for c in remote)
        if least_local > least_remote + limit:
            pool = remote
    pool = sorted(pool, key=lambda c: c.instance_id)
    if len(pool) == 1:
        return pool[0]
    if policy == "round_robin":
        return pool[next(iter(rr)) % len(pool)]
    a, b = rng.sample(pool, 2)
    oa, ob = outstanding.get(a.instance_id, 0), outstanding.get(b.instance_id, 0)
    return a if oa <= ob else b


def publish_targets(
    subscriptions: Iterable[Subscription], topic: str, rr: dict, local_node: str | None
) -> list[Subscription]:
    """Who gets an event published on ``topic``: every matching subscription
    without a group, and one member of each group (same-node members first,
    in turn; ``rr`` keeps each group's turn between calls)."""
    groups: dict[str, list[Subscription]] = {}
    targets: list[Subscription] = []
    for sub in subscriptions:
        if topic_matches(sub.pattern, topic):
            if sub.group:
                groups.setdefault(sub.group + "\0" + sub.pattern, []).append(sub)
            else:
                targets.append(sub)
    for key, members in groups.items():
        turn = rr.get("\0pub" + key)
        if turn is None:
            turn = rr["\0pub" + key] = itertools.count()
        local = [m for m in members if m.node_id == local_node] or members
        local.sort(key=lambda m: m.sub_id)
        targets.append(local[next(turn) % len(local)])
    return targets
