"""Ray in one place: starting it, named actors, and the router's remote calls.

Every remote call to a router goes through :class:`RouterClient`, whose
methods name what they wait for and how long. ``import ray`` stays inside the
functions: importing it costs about a second, and ``import sage_ray_comm``
(for a SageQueue, or the CLI's ``gc``) should not pay that.

>>> from sage_ray_comm.router import router_client
>>> rc = router_client("pipeline")                  # doctest: +SKIP
>>> rc.snapshot()["services"].keys()                # doctest: +SKIP
dict_keys(['calculator'])
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .router import InstanceInfo, Subscription

__all__ = [
    "ACTOR_RACE_RETRIES",
    "CONTROL_GROUP",
    "CONTROL_THREADS",
    "HEAD_NODE_RESOURCE",
    "ROUTER_CALL_SECONDS",
    "ROUTER_READ_SECONDS",
    "RouterClient",
    "cancel_on_replica",
    "ensure_ray",
    "get_or_create_actor",
    "head_node_id",
    "hello_replica",
    "tell_replica",
]

# How long a router call may take before it counts as unreachable.
ROUTER_CALL_SECONDS = 10.0  # a registration, heartbeat or subscription
ROUTER_READ_SECONDS = 30.0  # the whole registry, or a call a user waits on
# A lost creation race is retried this often, with this pause.
ACTOR_RACE_RETRIES = 20
ACTOR_RACE_PAUSE = 0.05


def ensure_ray() -> None:
    """Starts an embedded local Ray if none is running, as a notebook or a
    script would want (``ray.init()`` with the driver's logs kept quiet)."""
    import ray

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False, configure_logging=False)


# The resource only the head node has (Ray Serve finds its head node by it).
HEAD_NODE_RESOURCE = "node:__internal_head__"


# The replica actor's concurrency group for cancel() and tell(): they must
# not wait behind the calls they cancel, which may hold every other thread.
CONTROL_GROUP = "control"
CONTROL_THREADS = 2

# How long a caller's cancel() waits at least for the replica to say whether
# it won; up to the call's own timeout (``ttl``) when that is longer. Giving
# up earlier would be a lie: the replica may still cancel the call after we
# said it could not (seen on a loaded 2-core machine).
CANCEL_SECONDS = 5.0


def cancel_on_replica(actor_name: str, namespace: str, keys: list, ttl: float) -> list[bool]:
    """Asks a deployed replica (by its actor) to cancel calls it has not
    started: for each key, True when it will never run. False for all when
    the replica cannot be asked (it died: the calls fail on their own), or
    does not answer within the calls' timeout ``ttl`` (by then they failed
    with CallTimeout, whatever it does)."""
    import ray

    try:
        actor = ray.get_actor(actor_name, namespace=namespace)
        ref = actor.cancel.options(concurrency_group=CONTROL_GROUP).remote(keys, ttl)
        return list(ray.get(ref, timeout=max(CANCEL_SECONDS, ttl)))
    except Exception:  # gone, or past the calls' own timeout
        return [False] * len(keys)


# Replica actors told of cancellations, by name (a lookup costs a GCS round trip).
_TOLD: dict[tuple[str, str], Any] = {}


def tell_replica(actor_name: str, namespace: str, keys: list, ttl: float) -> None:
    """Tells a deployed replica (by its actor) that calls it already took were
    cancelled, without waiting: a running handler sees ``cancelled()`` turn
    True (``async def`` ones get ``CancelledError``). A replica that is gone
    needs no telling."""
    import ray

    try:
        actor = _TOLD.get((actor_name, namespace))
        if actor is None:
            actor = _TOLD[(actor_name, namespace)] = ray.get_actor(actor_name, namespace=namespace)
            if len(_TOLD) > 1024:
                _TOLD.pop(next(iter(_TOLD)))
        actor.tell.options(concurrency_group=CONTROL_GROUP).remote(keys, ttl)
    except Exception:  # gone, or Ray is down: the call ends on its own
        _TOLD.pop((actor_name, namespace), None)


def hello_replica(actor: Any, caller: str, life: Any) -> None:
    """Hands a replica's actor this caller's life (callers.py), without waiting."""
    try:
        actor.hello.options(concurrency_group=CONTROL_GROUP).remote(caller, [life])
    except Exception:  # a replica that is gone needs no hello
        pass


def head_node_id() -> str | None:
    """The id of the cluster's head node (alive), or None if none says so."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and HEAD_NODE_RESOURCE in node.get("Resources", {}):
            return node["NodeID"]
    return None


def get_or_create_actor(
    cls: type, name: str, namespace: str, args: tuple = (), create: bool = True, **options: Any
) -> Any:
    """The named actor, created with ``options`` if missing. Safe when many
    processes race to create it: ``get_if_exists`` turns a loser's create into
    a get, and the ValueError of a lost race is retried. Raises ValueError
    when it cannot be found (``create=False``) or made."""
    import ray

    last: BaseException | None = None
    for _ in range(ACTOR_RACE_RETRIES):
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError as e:
            last = e
            if not create:
                break
        try:
            return ray.remote(cls).options(name=name, namespace=namespace, get_if_exists=True, **options).remote(*args)
        except ValueError as e:
            last = e
            time.sleep(ACTOR_RACE_PAUSE)  # a creation race: the winner's name appears shortly
    raise ValueError(str(last))


class RouterClient:
    """Typed remote calls to one bus's router actor (see ``router.py``).

    Each method blocks until the router answers, at most its named timeout,
    and raises what ``ray.get`` raises (a ``GetTimeoutError`` or an actor
    error) for the caller to turn into its own typed error.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    @staticmethod
    def _get(ref: Any, timeout: float | None) -> Any:
        import ray

        return ray.get(ref, timeout=timeout)

    # -- replicas
    def register(self, inst: InstanceInfo, replace: bool = False, timeout: float | None = ROUTER_READ_SECONDS) -> int:
        """Adds a replica; returns the registry version that has it."""
        return self._get(self.handle.register.remote(inst, replace), timeout)

    def deregister(self, instance_id: str, timeout: float = ROUTER_CALL_SECONDS) -> bool:
        return self._get(self.handle.deregister.remote(instance_id), timeout)

    def heartbeat(self, instance_id: str, load: dict | None, timeout: float = ROUTER_CALL_SECONDS) -> bool:
        """False when the router does not know the replica (it restarted)."""
        return self._get(self.handle.heartbeat.remote(instance_id, load), timeout)

    # -- pub/sub membership
    def subscribe(self, sub: Subscription, timeout: float | None = ROUTER_CALL_SECONDS) -> int:
        """Adds a subscription; returns the registry version that has it."""
        return self._get(self.handle.subscribe.remote(sub), timeout)

    def unsubscribe(self, sub_id: str, timeout: float = ROUTER_CALL_SECONDS) -> bool:
        return self._get(self.handle.unsubscribe.remote(sub_id), timeout)

    # -- legacy queues
    def register_queue(self, name: str, info: dict, timeout: float = ROUTER_READ_SECONDS) -> dict:
        return self._get(self.handle.register_queue.remote(name, info), timeout)

    def unregister_queue(self, name: str, timeout: float = ROUTER_READ_SECONDS) -> bool:
        return self._get(self.handle.unregister_queue.remote(name), timeout)

    # -- the registry
    def snapshot(self, timeout: float = ROUTER_READ_SECONDS) -> dict:
        """The whole registry: services, replicas, subscriptions, version."""
        return self._get(self.handle.snapshot.remote(), timeout)

    def wait_for_change(self, version: int, poll_seconds: float) -> Any:
        """A future of the next registry snapshot after ``version`` (None
        after ``poll_seconds`` without a change). Not waited on here: the
        registry watcher waits on it beside its own stop signal."""
        return self.handle.wait_for_change.remote(version, poll_seconds).future()
