"""What the library started in this process, and how all of it stops before Ray does.

Background threads of this library (registry watchers, event readers, reply
readers, heartbeats, bridges, metrics) hold Ray objects. If one of them still
runs while Ray's own ``atexit`` shutdown tears down the core worker, touching
those objects makes Ray end the process with ``_exit(1)``, after the user's
code already finished well: the driver, and a Ray job, is reported as failed.

So every such object registers here, and one ``atexit`` hook, registered
after ``import ray`` (``atexit`` runs hooks last-in first-out, and Ray
registers its own when it is imported), closes them in order while Ray still
runs:

1. bridges and legacy adapters (they feed services),
2. services served from this process (deregistered; ``cleanup()`` runs),
3. services this process deployed, unless detached (``lifetime="detached"``),
4. endpoints: registry watcher, event inbox, reply rings,
5. metrics (flushed one last time).

Then, when this process started Ray itself (a local ``ray.init()``), the buses
it used end with it: their gateway rings, the rings of processes that died
and their legacy queues are removed, so nothing is left in ``/dev/shm``.

The same objects also notice an explicit ``ray.shutdown()`` (each endpoint's
watcher checks at least every :data:`RAY_CHECK_SECONDS`) and stop on their own.

>>> from sage_ray_comm import lifecycle
>>> lifecycle.close_all()        # what the exit hook does; harmless to call twice
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from . import shm
from .ray_transport import forget_bus_on_gateways
from .router import bus_namespace

__all__ = [
    "RAY_CHECK_SECONDS",
    "STAGES",
    "Closers",
    "close_all",
    "closers",
    "exiting",
    "note_bus",
    "owns_ray",
    "ray_alive",
    "register",
    "release",
    "unregister",
]

log = logging.getLogger(__name__)

# The order in which close_all() stops things: producers before what they feed.
STAGES = ("bridges", "services", "deployments", "endpoints", "metrics")
# How often a background thread checks that Ray still runs (an explicit
# ray.shutdown() is noticed within this long).
RAY_CHECK_SECONDS = 0.5


class Closers:
    """Objects to close, by stage, each with its closer; held weakly (an
    object collected earlier is forgotten with its closer). The process has
    one (:data:`closers`); tests of the ordering make their own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, weakref.WeakKeyDictionary[Any, Callable[[Any], Any]]] = {
            s: weakref.WeakKeyDictionary() for s in STAGES
        }

    def add(self, obj: Any, stage: str, close: Callable[[Any], Any]) -> None:
        if stage not in self._held:
            raise ValueError(f"unknown lifecycle stage {stage!r}; stages: {STAGES}")
        with self._lock:
            self._held[stage][obj] = close

    def discard(self, obj: Any, stage: str) -> None:
        with self._lock:
            self._held[stage].pop(obj, None)

    def objects(self, stage: str) -> list[Any]:
        """The live objects held in ``stage``."""
        with self._lock:
            return list(self._held[stage])

    def close_all(self) -> None:
        """Closes everything held, stage by stage. Errors are logged, never raised."""
        for stage in STAGES:
            with self._lock:
                todo = list(self._held[stage].items())
            for o, fn in todo:
                try:
                    fn(o)
                except Exception as e:  # exit must go on; say what failed
                    log.debug("closing %r at exit failed: %s", o, e)
                self.discard(o, stage)


closers = Closers()
_install_lock = threading.Lock()
# Buses used while this process owned Ray: they end when that Ray ends.
_owned_buses: set[str] = set()
_installed = False
_exiting = False


def _install() -> None:
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        import ray  # noqa: F401  (Ray's atexit hook must be registered before ours, so ours runs first)

        atexit.register(_at_exit)
        _installed = True


def register(obj: Any, stage: str, close: Callable[[Any], Any]) -> None:
    """Closes ``obj`` with ``close(obj)`` at exit, in ``stage`` (see :data:`STAGES`).

    Held weakly: an object collected earlier is simply not closed again.
    """
    closers.add(obj, stage, close)
    _install()


def unregister(obj: Any, stage: str) -> None:
    """Forgets ``obj`` (it was closed by its owner)."""
    closers.discard(obj, stage)


def note_bus(bus: str) -> None:
    """Records that this process used ``bus``. If this process started Ray,
    the bus ends with it, and its segments are collected at exit."""
    _install()
    if owns_ray():
        _owned_buses.add(bus)


def ray_alive() -> bool:
    """Whether Ray is initialised in this process, without importing it."""
    import sys

    ray = sys.modules.get("ray")
    try:
        return ray is not None and ray.is_initialized()
    except Exception:
        return False


# Ray objects a background thread let go of while Ray was shutting down: kept
# until the process ends (see release()).
_PARKED: list = []


def release(obj: Any) -> None:
    """Lets go of a Ray object (an ObjectRef, or a future holding one) from a
    background thread (which then drops its own reference).

    Freeing the last reference to an ObjectRef tells Ray's core worker. If
    that happens while ``ray.shutdown()`` runs in another thread (after the
    core worker stopped, before Ray forgets it), Ray ends the process with
    status 1. So once Ray is no longer initialised, the object is parked
    here instead; at interpreter exit Ray is long gone and freeing it is safe.
    """
    if obj is not None and not ray_alive():
        _PARKED.append(obj)


def owns_ray() -> bool:
    """Whether this process started the Ray instance it is connected to
    (a local ``ray.init()``), so that Ray, and the buses on it, end with it."""
    if not ray_alive():
        return False
    try:
        from ray._private import worker

        node = worker._global_node
        return bool(node is not None and getattr(node, "head", False))
    except Exception:
        return False


def close_all() -> None:
    """Closes everything this process registered, stage by stage (what the exit hook does)."""
    closers.close_all()


def _collect_bus_segments(buses: list[str]) -> None:
    """This process started Ray, so the buses end with it: remove their rings
    on every gateway, their rings whose creator is dead, and their legacy queues."""
    for bus in buses:
        ns = bus_namespace(bus)
        if ray_alive():  # else the gateways died with Ray: their rings are stale and go below
            try:
                forget_bus_on_gateways(ns, timeout=5.0)
            except Exception as e:
                log.debug("gateways of bus %s: %s", bus, e)
        for seg in shm.list_segments(ns):
            if seg.legacy:  # the bus ends with this Ray: its legacy queues go too
                shm.unlink(seg.shm_name)
        shm.gc(ns, keep_legacy=False)


def exiting() -> bool:
    """Whether the interpreter is exiting (this module's exit hook has run):
    a finaliser must then not start anything that needs Ray."""
    return _exiting


def _at_exit() -> None:
    global _exiting
    _exiting = True
    # Connected to a cluster now (not ours): its buses go on after us.
    still_shared = ray_alive() and not owns_ray()
    close_all()
    if _owned_buses and not still_shared:
        _collect_bus_segments(sorted(_owned_buses))
