"""Waiting for a condition that other processes bring about, with a deadline."""

from __future__ import annotations

import time


def wait_for(cond, timeout: float = 30.0, what: str = "condition"):
    """Polls ``cond`` until it returns something true (returned), failing the
    test after ``timeout`` seconds. For effects of fire-and-forget messages
    and of other processes, where there is nothing to block on."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.02)
