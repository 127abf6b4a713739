"""The replica's side of a request ring: opening it, and taking requests
out of it. A request that carries a claim ticket (claims.py) is decided
from its header first: one its caller cancelled is skipped unread.
"""

from __future__ import annotations

import logging

from ._wire import KIND_REQ_OOB, BadRequest, Request, cancel_ticket, decode_request, release_unread
from .blobs import SegmentBlob
from .claims import EXPIRED, TAKEN, ClaimReader
from .errors import SharedMemoryFull
from .names import cancellable, claim_table_name, request_ring_name
from .queue import SageQueue
from .transport import REQUEST_SPIN_US, shm_warn_once

__all__ = ["CANCELLED_FIRST", "EXPIRED_FIRST", "open_request_ring", "request_args", "take_request"]

log = logging.getLogger(__name__)

# What take_request returns for a request whose claim the replica lost: its
# caller cancelled it first (or died), or stopped waiting for it (its
# deadline passed). It was not unpickled.
CANCELLED_FIRST = "cancelled first"
EXPIRED_FIRST = "expired first"


def take_request(q: SageQueue, claims: ClaimReader | None = None) -> tuple[Request | BadRequest | str | None, int]:
    """Waits for the next frame in a request or event ring and decodes it.

    Returns the frame's size (for spans) and the Request; or the BadRequest for a frame whose header decoded
    but whose body did not, or that speaks another protocol version (the
    sender can still be answered); or None for a frame that is not a request
    at all (consumed and logged: the ring keeps serving); or CANCELLED_FIRST
    (EXPIRED_FIRST) when ``claims`` says the replica lost the request's
    claim to its caller's cancel() (to its caller's timeout; claims.py).
    Raises QueueClosed once the ring is closed and drained.
    """
    payload, kind = q.get_frame(None, KIND_REQ_OOB)
    if claims is not None:
        ticket, reply_to = cancel_ticket(payload, kind)
        if ticket:
            won = _take(claims, reply_to, ticket) if reply_to and cancellable(reply_to) else 0
            if won != TAKEN:
                # Skipped unread, but the arena slots it names were given to
                # this process to let go of: let go of them now.
                release_unread(payload, kind)
                return (EXPIRED_FIRST if won == EXPIRED else CANCELLED_FIRST), len(payload)
    try:
        return decode_request(payload, kind), len(payload)
    except BadRequest as e:
        return e, len(payload)
    except ValueError as e:
        log.warning("%s: dropped a frame that is not a request: %s", q.label, e)
        return None, len(payload)


def _take(claims: ClaimReader, reply_to: str, ticket: int) -> int:
    try:
        table = claim_table_name(reply_to)
    except ValueError:  # a reply ring name no caller of ours makes: nobody can be waiting
        return 0
    return claims.take(table, ticket)


def request_args(req: Request) -> tuple[tuple, dict | None]:
    """A request's positional and keyword arguments, read out of their
    segment when they were too large for the ring."""
    if isinstance(req.args, SegmentBlob):
        args, kwargs = req.args.get()
        return args, kwargs
    return req.args, req.kwargs


def open_request_ring(
    service: str, instance_id: str, namespace: str, queue_bytes: int, serves_over_ray: bool
) -> SageQueue | None:
    """A replica's request ring; None when /dev/shm has no room for it and
    the replica can serve over Ray instead (a deployed one can)."""
    try:
        return SageQueue(
            request_ring_name(service, instance_id),
            queue_bytes,
            auto_cleanup=True,
            namespace=namespace,
            spin_us=REQUEST_SPIN_US,
        )
    except SharedMemoryFull as e:
        if not serves_over_ray:  # an in-process service has no other way in
            raise SharedMemoryFull(
                f"service '{service}' cannot serve from this process: {e}. Deploy it as Ray "
                "actors (Cls.deploy()), which serve over Ray when shared memory is short, or give "
                "/dev/shm more room (docker run --shm-size=1g)"
            ) from None
        shm_warn_once(f"service '{service}' replica {instance_id}: {e}; it serves over Ray")
        return None
