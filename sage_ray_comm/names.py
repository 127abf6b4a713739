"""The names of rings, segments and actors: who owns a ring, which bus
and replica an actor serves, as ``ray list actors`` and ``sage-comm gc``
see them. Ring names are per bus (the bus is the segment namespace); actor
names live in the router's Ray namespace.

>>> reply_ring_pid(reply_ring_name(4242, "abc"))
4242
>>> cancellable(reply_ring_name(4242, "abc", cancellable=True)), cancellable(reply_ring_name(4242, "abc"))
(True, False)
"""

from __future__ import annotations

import re

__all__ = [
    "CANCELLABLE_MARK",
    "actor_name",
    "blob_name",
    "caller_pid",
    "cancellable",
    "claim_table_name",
    "claims_reply_ring",
    "direct_caller_host_pid",
    "direct_caller_name",
    "event_ring_name",
    "gateway_name",
    "reply_ring_name",
    "reply_ring_pid",
    "request_ring_name",
    "router_name",
    "slab_geometry",
    "slab_name",
]


def request_ring_name(service: str, instance_id: str) -> str:
    """The request ring of one replica."""
    return f"req.{service}.{instance_id}"


def reply_ring_name(pid: int, token: str, cancellable: bool = False) -> str:
    """A caller's reply ring: the owner's pid is part of the name, so a
    replica can tell a dead caller's ring without opening it. The ring of a
    caller's ``call_async`` calls, which ``cancel()`` may claim back, is
    marked ``cancellable`` (see :func:`cancellable`): only those calls does
    a replica keep track of."""
    return f"rep.{pid}.{CANCELLABLE_MARK if cancellable else ''}{token}"


# What marks the reply ring of cancellable calls (after the pid).
CANCELLABLE_MARK = "c-"


def cancellable(reply_to: str | None) -> bool:
    """Whether calls answered on this reply ring can be cancelled."""
    return reply_to is not None and reply_to.startswith(CANCELLABLE_MARK, reply_to.find(".", 4) + 1)


def reply_ring_pid(name: str) -> int | None:
    """The pid in a :func:`reply_ring_name` (None for other names)."""
    try:
        kind, pid, _ = name.split(".", 2)
        return int(pid) if kind == "rep" else None
    except ValueError:
        return None


def claim_table_name(reply_to: str) -> str:
    """The claim table (claims.py) beside a caller's ``call_async`` reply ring:
    same owner pid, same token.

    >>> claim_table_name(reply_ring_name(4242, "abc", cancellable=True))
    'clm.4242.abc'
    """
    _kind, pid, token = reply_to.split(".", 2)
    return f"clm.{pid}.{token.removeprefix(CANCELLABLE_MARK)}"


def claims_reply_ring(claims: str) -> str:
    """The reply ring beside a :func:`claim_table_name` (its inverse)."""
    _kind, pid, token = claims.split(".", 2)
    return reply_ring_name(int(pid), token, cancellable=True)


def direct_caller_name(pid: int, host: str, token: str) -> str:
    """Who made a call that travels over Ray (``reply_to`` of its frame: its
    reply goes back through Ray, so this names the caller, not a ring). The
    host (``shm.host_id()``) lets a replica on the same host tell a dead caller."""
    return f"dir.{pid}.{host}.{token}"


def direct_caller_host_pid(name: str) -> tuple[str, int] | None:
    """The host and pid of a :func:`direct_caller_name` (None for other names).

    >>> direct_caller_host_pid("dir.7.h1.x"), direct_caller_host_pid("rep.7.x")
    (('h1', 7), None)
    """
    parts = name.split(".", 3)
    if len(parts) != 4 or parts[0] != "dir" or not parts[1].isdigit():
        return None
    return parts[2], int(parts[1])


def caller_pid(name: str, host: str | None = None) -> int | None:
    """The pid of the process behind a reply ring, claim table or
    :func:`direct_caller_name`; None for other names, and for a direct
    caller on another host than ``host`` (its pid means nothing here).

    >>> caller_pid("clm.4242.abc"), caller_pid("dir.7.h1.x", "h1"), caller_pid("dir.7.h1.x", "h2")
    (4242, 7, None)
    """
    parts = name.split(".", 3)
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    if parts[0] == "dir":
        return int(parts[1]) if len(parts) == 4 and parts[2] == host else None
    return int(parts[1]) if parts[0] in ("rep", "clm") else None


def slab_name(token: str, slot_bytes: int, slots: int) -> str:
    """An arena slab (arena.py): its geometry is part of its name, so a
    receiver checks a location against it without trusting the sender."""
    return f"arena-{slot_bytes}x{slots}-{token}"


def slab_geometry(shm_name: str) -> tuple[int, int] | None:
    """``(slot_bytes, slots)`` of a slab, from its segment name (None if it is not one).

    >>> slab_geometry("/sage_rc.bus_x.arena-262144x64-abc.0123")
    (262144, 64)
    """
    m = _SLAB.search(shm_name)
    return (int(m.group(1)), int(m.group(2))) if m else None


_SLAB = re.compile(r"\.arena-([0-9]{1,12})x([0-9]{1,6})-")


def event_ring_name(pid: int, token: str) -> str:
    """A process's ring for events to its ``subscribe`` callbacks."""
    return f"evt.{pid}.{token}"


def blob_name(pid: int, token: str) -> str:
    """A one-off segment holding a payload too large for a ring."""
    return f"blob.{pid}.{token}"


def router_name(bus: str) -> str:
    """The Ray actor name of a bus's router (in the router's Ray namespace)."""
    return f"sage:{bus}:router"


def actor_name(bus: str, service: str, index: int) -> str:
    """The Ray actor name of replica ``index`` (1-based, as the dashboard shows it)."""
    return f"sage:{bus}:{service}#{index}"


def gateway_name(node_id: str) -> str:
    """The Ray actor name of a node's gateway."""
    return f"sage:gateway:{node_id}"
