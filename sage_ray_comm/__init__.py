"""sage_ray_comm: communication for services that run as Ray actors.

Same-node traffic goes through a C++ ring buffer in shared memory
(:class:`SageQueue`); everything raises subclasses of :class:`SageCommError`.

>>> from sage_ray_comm import SageQueue
>>> q = SageQueue("jobs", namespace="demo")
>>> q.put([1, 2, 3]); q.get(timeout=1)
[1, 2, 3]
"""

from importlib import metadata as _metadata

from . import errors, shm, tensors, tracing
from .adapter import LegacyQueueAdapter, create_queue_adapter, migrate_service
from .bus import CommunicationBus, DeliveryReceipt, ServiceManager, get_communication_bus, get_service_manager
from .client import FunctionClient
from .errors import *  # noqa: F403  (the whole hierarchy is public)
from .message import CommunicationPattern, Message, MessageType
from .queue import DEFAULT_MAXSIZE, SageQueue, SageQueueRef, destroy_queue
from .sage_api import ServiceCallMixin, call_service, call_service_async, stream_service
from .service import BaseService, ServiceFunction, ServiceHandle, sage_service, service_function, subscribe

__version__ = _metadata.version("sage_ray_comm")  # one source: pyproject.toml (CMake gives it to _core too)

__all__ = [
    "__version__",
    "shm",
    "tensors",
    "tracing",
    "SageQueue",
    "SageQueueRef",
    "DEFAULT_MAXSIZE",
    "destroy_queue",
    "Message",
    "MessageType",
    "CommunicationPattern",
    "BaseService",
    "ServiceFunction",
    "ServiceHandle",
    "sage_service",
    "service_function",
    "subscribe",
    "FunctionClient",
    "ServiceCallMixin",
    "call_service",
    "call_service_async",
    "stream_service",
    "CommunicationBus",
    "DeliveryReceipt",
    "ServiceManager",
    "get_communication_bus",
    "get_service_manager",
    "LegacyQueueAdapter",
    "create_queue_adapter",
    "migrate_service",
    *errors.__all__,
]
