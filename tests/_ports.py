"""Free TCP ports for test clusters and dashboards."""

from __future__ import annotations

import socket

_GIVEN: set = set()


def free_port() -> int:
    """A free port not handed out before by this process: the kernel may give
    a port just closed again (two of a cluster's ports once came out the same,
    and `ray start` refused them)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
