"""One-off shared-memory segments for payloads too large for a ring."""

from __future__ import annotations

import os
import uuid
from typing import Any

from . import shm
from ._codec import encode_payload
from .errors import MessageTooLarge, QueueNotFound, ServiceUnavailable
from .names import blob_name
from .queue import SageQueue

__all__ = ["SegmentBlob"]


class SegmentBlob:
    """An oversize payload in a one-off shared-memory segment of its own.

    A frame may hold at most half its ring. A larger request or reply is
    written into a fresh segment sized for it, and the frame carries only
    this small handle. The receiver reads it and unlinks the segment; the
    sender unlinks it too once the call is over (for a receiver that died
    first), so none is left behind. Same node only: across nodes the Ray
    transport carries large payloads through Ray's object store itself.

    (Ray's ObjectRefs cannot be used here: an ObjectRef pickled outside Ray's
    own task arguments cannot be fetched by another worker in Ray 2.x; see
    ``tests/test_transport.py::test_out_of_band_object_refs_do_not_resolve``.)
    """

    __slots__ = ("name", "namespace", "nbytes")

    def __init__(self, name: str, namespace: str, nbytes: int) -> None:
        self.name = name
        self.namespace = namespace
        self.nbytes = nbytes

    @classmethod
    def put(cls, obj: Any, namespace: str) -> SegmentBlob:
        parts, kind = encode_payload(obj, f"an oversize payload in namespace '{namespace}'")
        nbytes = sum(memoryview(p).nbytes for p in parts)
        name = blob_name(os.getpid(), uuid.uuid4().hex[:12])
        cap = 2 * (nbytes + 64) + 4096
        if cap > shm.MAX_SEGMENT_BYTES:
            raise MessageTooLarge(
                f"a {nbytes}-byte payload exceeds the largest shared-memory segment ({shm.MAX_SEGMENT_BYTES // 2} bytes)"
            )
        q = SageQueue(name, cap, auto_cleanup=False, namespace=namespace)
        try:
            q.put_frame(parts, kind, 0.0)
        except BaseException:
            q.unlink()
            raise
        finally:
            q.release()
        return cls(name, namespace, nbytes)

    def get(self) -> Any:
        """Reads the payload and removes the segment (each blob is read once)."""
        try:
            q = SageQueue(self.name, auto_cleanup=False, namespace=self.namespace, create=False)
        except QueueNotFound:
            raise ServiceUnavailable(
                f"the {self.nbytes}-byte payload segment '{self.name}' is gone (its sender gave up or died)"
            ) from None
        try:
            return q.get(timeout=0)
        finally:
            q.unlink()
            q.release()

    def discard(self) -> None:
        """Removes the segment if the receiver has not (it died, or never came)."""
        try:
            shm.unlink(shm.segment_name(self.namespace, self.name))
        except Exception:
            pass

    def __reduce__(self):
        return (SegmentBlob, (self.name, self.namespace, self.nbytes))
