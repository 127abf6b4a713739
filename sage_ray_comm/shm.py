"""Shared-memory segment names, node identity and garbage collection.

Segments live in ``/dev/shm`` as ``sage_rc.<namespace>.<name>.<digest>``. The
digest covers the exact (namespace, name) pair, so two namespaces never share
a segment even when their sanitised names collide, and every process that
asks for the same pair on a node opens the same segment (the original code derived
names from the pid, so two processes never met).

>>> from sage_ray_comm import shm
>>> shm.segment_name("jobs", "ingest").startswith("/sage_rc.jobs.ingest.")
True
>>> removed = shm.gc()          # unlink segments whose processes are all dead
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import time

from . import _core

__all__ = [
    "CREATE_ONLY",
    "DEFAULT_NAMESPACE",
    "LEGACY_PART",
    "MAX_SEGMENT_BYTES",
    "OPEN_ONLY",
    "PREFIX",
    "SHM_DIR",
    "SLOT_NAMES",
    "SLOT_UNFILLED",
    "SLOT_WORDS",
    "BytesBuffer",
    "SegmentInfo",
    "SlotView",
    "WordSegment",
    "current_node_id",
    "default_namespace",
    "gc",
    "gc_buses",
    "hold_slot",
    "host_id",
    "list_segments",
    "location_record",
    "mapped_by_live_process",
    "oob_buffers",
    "oob_frame",
    "process_alive",
    "process_start_time",
    "segment_name",
    "shm_space",
    "unlink",
]

PREFIX = "sage_rc."
SHM_DIR = "/dev/shm"
DEFAULT_NAMESPACE = "default"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
# Legacy adapter queues are "legacy.<name>" in a bus namespace ("bus.<bus>");
# their segment names read "...bus_<bus>.legacy_<name>.<digest>".
LEGACY_PART = "legacy_"
_BUS_PART = "bus_"
MAX_SEGMENT_BYTES = _core.MAX_CAPACITY  # the largest ring one segment can hold

# A segment used for its words and its data region, never as a ring: claim
# tables (claims.py) and arena slabs (arena.py). ``WordSegment(shm_name,
# capacity, mode, label)``; ``mode`` OPEN_ONLY or CREATE_ONLY.
WordSegment = _core.Ring
OPEN_ONLY = _core.OPEN_ONLY
CREATE_ONLY = _core.CREATE_ONLY
# A buffer over part of a segment's data region that lets go of its arena
# slot when the last view of it is released (arena.py).
SlotView = _core.SlotView
# A bytes object's memory as a buffer pickle does not see as read-only, for
# large bytes payloads (bigbytes.BigBytes; csrc/bindings.cpp says why).
BytesBuffer = _core.BytesBuffer
# An out-of-band payload (_codec.py) split into its pickle and its buffers,
# arena slots of slabs already known read in place (csrc/oob.hpp; arena.py).
oob_buffers = _core.oob_buffers
# The sender's side of oob_buffers: one more holder of a whole slot about to
# be sent (an array over a slot, found through its exporters), and its
# location record, in one call (or None: the buffer is copied); and the parts
# of an out-of-band payload, head, lengths and records laid out (csrc/oob.hpp
# writes the layout it reads).
hold_slot = _core.hold_slot
oob_frame = _core.oob_frame
location_record = _core.location_record
# Words per arena slot: its state word, then the pids of its holders
# (SLOT_NAMES of them), then, at SLOT_UNFILLED, the bytes its writer has
# still to copy in (arena.py; csrc/slots.hpp).
SLOT_WORDS = _core.SLOT_WORDS
SLOT_NAMES = _core.SLOT_NAMES
SLOT_UNFILLED = _core.SLOT_UNFILLED


def process_alive(pid: int, start_time: int = 0) -> bool:
    """Whether process ``pid`` lives on this host (and, if ``start_time`` is
    given, is the same process that had it then, not a reuse of the pid).

    >>> import os
    >>> process_alive(os.getpid(), process_start_time(os.getpid()))
    True
    """
    return _core.process_alive(pid, start_time)


def process_start_time(pid: int) -> int:
    """The start time of ``pid`` in clock ticks since boot (0 if it is gone)."""
    return _core.process_start_time(pid)


def unlink(shm_name: str) -> bool:
    """Removes one segment by its full name (see :func:`segment_name`);
    False if it was already gone. Processes that have it open keep it."""
    return _core.unlink(shm_name)


def default_namespace() -> str:
    """The namespace used when none is given: ``$SAGE_COMM_NAMESPACE`` or ``"default"``."""
    return os.environ.get("SAGE_COMM_NAMESPACE") or DEFAULT_NAMESPACE


def segment_name(namespace: str, name: str) -> str:
    """The POSIX shared-memory name (leading ``/``) for ``name`` in ``namespace``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"queue name must be a non-empty string, got {name!r}")
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")
    digest = hashlib.blake2b(f"{namespace}\x00{name}".encode(), digest_size=8).hexdigest()
    ns = _UNSAFE.sub("_", namespace)[:40]
    nm = _UNSAFE.sub("_", name)[:60]
    return f"/{PREFIX}{ns}.{nm}.{digest}"


_HOST_ID: str | None = None


def host_id() -> str:
    """Identity of the running kernel: processes with the same one share /dev/shm."""
    global _HOST_ID
    if _HOST_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _HOST_ID = f.read().strip()
        except OSError:  # not Linux /proc: fall back to the host name
            _HOST_ID = os.uname().nodename
    return _HOST_ID


def current_node_id() -> str | None:
    """The Ray node id of this process, or None when Ray is not initialised here.

    Ray is never imported by this function: a process that does not use Ray
    does not pay for importing it.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # a worker shutting down
        return None


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
    """One sage_ray_comm segment found in /dev/shm."""

    shm_name: str
    size: int
    valid: bool
    initializing: bool
    creator_pid: int
    creator_alive: bool
    live_attached: int
    attach_overflow: bool = False
    idle_seconds: float = 0.0  # since the segment was last written (its mtime)

    @property
    def legacy(self) -> bool:
        """A legacy adapter queue of a bus: meant to outlive its creator, with items in it."""
        parts = self.shm_name[1:].split(".")
        return len(parts) == 4 and parts[1].startswith(_BUS_PART) and parts[2].startswith(LEGACY_PART)

    @property
    def stale(self) -> bool:
        """No live process created or attached it, and nobody is laying it out.

        When more processes attached than the attach table holds, the table
        is not trusted: the processes' mappings are checked instead.
        """
        if self.initializing:
            return False
        if not self.valid:
            return True  # creator died before finishing the header
        if self.creator_alive or self.live_attached:
            return False
        return not (self.attach_overflow and mapped_by_live_process(self.shm_name))


def mapped_by_live_process(shm_name: str) -> bool:
    """Whether any process on this machine has ``shm_name`` mapped (reads /proc/*/maps).

    Exact but slow (one file per process): used only for segments whose
    attach table overflowed. A process whose mappings this user may not read
    (another user's, a protected init) cannot open our mode-0600 segments
    either, so it is passed over; any other read error counts as a user, so
    a segment is never removed on a guess.
    """
    needle = (SHM_DIR + shm_name).encode()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                if needle in f.read():
                    return True
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited meanwhile, or not ours
        except OSError:
            return True  # cannot tell: keep the segment
    return False


def shm_space() -> tuple[int, int]:
    """``(total, free)`` bytes of the /dev/shm file system (``(0, 0)`` if it cannot be read)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0, 0
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def list_segments(namespace: str | None = None) -> list[SegmentInfo]:
    """Every sage_ray_comm segment on this node (optionally only one namespace)."""
    try:
        names = sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return []
    want = None if namespace is None else f"{PREFIX}{_UNSAFE.sub('_', namespace)[:40]}."
    out = []
    for fname in names:
        if not fname.startswith(PREFIX) or (want and not fname.startswith(want)):
            continue
        info = _core.inspect("/" + fname)
        if info is None:  # removed while we looked
            continue
        try:
            idle = max(0.0, time.time() - os.stat(os.path.join(SHM_DIR, fname)).st_mtime)
        except FileNotFoundError:
            continue
        out.append(
            SegmentInfo(
                shm_name="/" + fname,
                size=info["file_size"],
                valid=bool(info["valid"]),
                initializing=bool(info["initializing"]),
                creator_pid=int(info["creator_pid"]),
                creator_alive=bool(info["creator_alive"]),
                live_attached=int(info["live_attached"]),
                attach_overflow=bool(info.get("attach_overflow", False)),
                idle_seconds=idle,
            )
        )
    return out


def gc(namespace: str | None = None, dry_run: bool = False, keep_legacy: bool = True) -> list[SegmentInfo]:
    """Unlink segments left behind by dead processes; return what was (or would be) removed.

    A segment is stale when its creator is dead and no live process uses it
    (see :attr:`SegmentInfo.stale`). Legacy adapter queues are kept unless
    ``keep_legacy=False``: they are meant to outlive the process that made
    them, items and all, until their bus ends.
    """
    removed = []
    for seg in list_segments(namespace):
        if keep_legacy and seg.legacy:
            continue
        if seg.stale and (dry_run or _core.unlink(seg.shm_name)):
            removed.append(seg)
    return removed


def gc_buses(min_idle: float = 0.0, dry_run: bool = False) -> list[SegmentInfo]:
    """:func:`gc` over every bus namespace on this node (legacy queues kept),
    for segments not written for ``min_idle`` seconds: what each node's
    janitor runs. Plain SageQueue namespaces are left alone."""
    return [
        s
        for s in gc(None, dry_run=True)
        if s.shm_name[1:].split(".")[1].startswith(_BUS_PART)
        and s.idle_seconds >= min_idle
        and (dry_run or _core.unlink(s.shm_name))
    ]
