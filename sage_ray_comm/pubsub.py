"""A process's inbox for events to its ``subscribe`` callbacks.

Publishers write one request frame (op ``OP_EVENT``) per subscriber into the
subscriber's event ring; this module's reader thread decodes each with the
same consume step as a replica's dispatcher (``transport.take_request``) and
calls the callback.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable

from . import tracing
from ._wire import Request
from .errors import SageCommError
from .intake import request_args, take_request
from .message import envelope
from .names import event_ring_name
from .queue import SageQueue
from .transport import EVENT_RING_BYTES

__all__ = ["Inbox"]

log = logging.getLogger(__name__)


class Inbox:
    """A process's ring for events to ``bus.subscribe`` callbacks, and its reader thread."""

    def __init__(self, bus: str, namespace: str, buffer_bytes: int = EVENT_RING_BYTES) -> None:
        self.name = event_ring_name(os.getpid(), uuid.uuid4().hex[:10])
        self.queue = SageQueue(self.name, buffer_bytes, auto_cleanup=True, namespace=namespace)
        self.callbacks: dict[str, Callable] = {}
        self.wants_message: dict[str, bool] = {}
        self.stats = {"received": 0, "errors": 0}
        self._thread = threading.Thread(target=self._run, name=f"sage-events-{bus}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                req, nbytes = take_request(self.queue)
            except SageCommError as e:
                if self.queue.closed:
                    return
                log.warning("dropped an undecodable event: %s", e)
                continue
            if not isinstance(req, Request):
                if req is not None:
                    log.warning("dropped an event whose payload did not unpickle: %s", req)
                continue
            cb = self.callbacks.get(req.function)
            if cb is None:
                continue  # unsubscribed meanwhile
            self.stats["received"] += 1
            span = None
            if tracing.ENABLED and tracing.recording():
                span = tracing.start_handling(
                    False,
                    req.service,
                    req.function,
                    req.trace,
                    replica=req.function,  # the subscription id
                    transport="shm",
                    nbytes=nbytes,
                    topic=(req.headers or {}).get("topic"),
                )
            error: Exception | None = None
            try:
                args, _ = request_args(req)
                if self.wants_message[req.function]:
                    cb(*args, message=envelope(req))
                else:
                    cb(*args)
            except Exception as e:
                error = e
                self.stats["errors"] += 1
                log.exception("subscriber callback %r raised", cb)
            finally:
                if span is not None:
                    span.detach()
                    span.close(error)

    def close(self) -> None:
        self.queue.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.queue.release()
