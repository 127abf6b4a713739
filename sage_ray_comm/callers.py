"""Whether callers on other hosts still live, as a replica learns it from Ray.

A caller on this host is checked by its pid (its name carries it, see
``names.py``). A caller on another host cannot be: instead it hands each
replica it calls over Ray a small object it owns, its *life*
(``DirectTransport`` sends it once per replica, ``ServiceActor.hello``).
When the caller's process dies, Ray fails every object it owned, and a get
of its life raises ``OwnerDiedError``. The replica's heartbeat asks only
about callers that have calls running or streams open, with one pending
``ref.future()`` each, so nothing blocks: a probe that resolves with the
value says "alive" (and is asked again at the next beat); one that fails
with ``OwnerDiedError`` says "dead" for good. Ray notices the death about
1 s after it happens (measured on a two-raylet cluster here).
"""

from __future__ import annotations

import threading
from typing import Any

from . import lifecycle
from .names import direct_caller_host_pid

__all__ = ["LIVES_KEPT", "RemoteCallers"]

# Callers remembered at most (the oldest forgotten first: a forgotten caller
# counts as alive, which only delays the cancellation of its calls).
LIVES_KEPT = 4096


class RemoteCallers:
    """The lives of the callers on other hosts that called this replica (see
    the module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lives: dict[tuple[str, int], Any] = {}  # (host, pid) -> the caller's life (an ObjectRef)
        self._probes: dict[tuple[str, int], Any] = {}  # (host, pid) -> its pending ref.future()
        self._dead: set[tuple[str, int]] = set()

    def remember(self, name: str, life: Any) -> None:
        """``life``: an object the caller named ``name`` owns (its reference
        is kept until the caller is found dead or the replica stops)."""
        who = direct_caller_host_pid(name)
        if who is None:
            return
        with self._lock:
            if who in self._lives or who in self._dead:
                return
            if len(self._lives) >= LIVES_KEPT:
                oldest = next(iter(self._lives))
                lifecycle.release(self._lives.pop(oldest))
                self._probes.pop(oldest, None)
            self._lives[who] = life

    def known_dead(self, name: str) -> bool:
        """Whether the caller named ``name`` was found dead (no Ray call)."""
        who = direct_caller_host_pid(name)
        return who is not None and who in self._dead

    def alive(self, name: str) -> bool:
        """The heartbeat's question for a caller with calls running: False
        once Ray said its life's owner died; True otherwise (then a probe is
        sent, or its answer read)."""
        who = direct_caller_host_pid(name)
        return who is None or self.alive_at(*who)

    def alive_at(self, host: str, pid: int) -> bool:
        """:meth:`alive` for a caller known by its host and pid (a stream's consumer)."""
        import ray

        who = (host, pid)
        with self._lock:
            if who in self._dead:
                return False
            life = self._lives.get(who)
            if life is None:
                return True  # it never said hello: nothing to ask (it counts as alive)
            probe = self._probes.get(who)
            if probe is None:
                self._probes[who] = life.future()
                return True
            if not probe.done():
                return True
            del self._probes[who]
        if not isinstance(probe.exception(), ray.exceptions.OwnerDiedError):
            return True  # it answered (or failed otherwise): alive as far as Ray can say
        with self._lock:
            self._dead.add(who)
            life = self._lives.pop(who, None)
        if life is not None:
            lifecycle.release(life)
        return False

    def close(self) -> None:
        """Lets go of every life (the replica stops)."""
        with self._lock:
            lives, self._lives = list(self._lives.values()), {}
            probes, self._probes = list(self._probes.values()), {}
        for obj in lives + probes:
            lifecycle.release(obj)
