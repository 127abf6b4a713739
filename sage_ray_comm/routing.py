"""Which replica takes a call: the routing policies, pure logic with no I/O.

>>> from sage_ray_comm.routing import POLICIES
>>> POLICIES
('least_outstanding', 'round_robin')
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence

from .router import InstanceInfo, Subscription, topic_matches

__all__ = ["DEFAULT_POLICY", "POLICIES", "pick_instance", "publish_targets"]

POLICIES = ("least_outstanding", "round_robin")
DEFAULT_POLICY = POLICIES[0]


def pick_instance(
    candidates: Sequence[InstanceInfo],
    policy: str,
    outstanding: dict[str, int],
    local_node: str | None,
    rr: Iterable[int],
    rng: random.Random = random,  # type: ignore[assignment]
) -> InstanceInfo:
    """Chooses a replica: same-node ones first, then by ``policy``.

    - ``round_robin``: the next replica in instance-id order.
    - ``least_outstanding``: power of two choices: two replicas at random,
      the one with fewer calls this process has in flight (ties: either).
    """
    local = [c for c in candidates if c.node_id == local_node]
    pool = sorted(local or candidates, key=lambda c: c.instance_id)
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
