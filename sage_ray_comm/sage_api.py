"""SAGE's service-call surface: ``self.call_service["name"].method(...)``,
``call_service(...)``, their async twins and their streaming forms
(``self.stream_service["name"].method(...)``, ``stream_service(...)``, for
generator functions), on top of :class:`FunctionClient`.

>>> from sage_ray_comm import call_service
>>> call_service("calculator", 21, method="calculate")   # doctest: +SKIP
{'result': 42, ...}
"""

from __future__ import annotations

import concurrent.futures
import os
import uuid
from collections.abc import Callable
from typing import Any

from .client import FunctionClient
from .errors import InvalidCallArgument

__all__ = ["ServiceCallMixin", "call_service", "call_service_async", "stream_service"]


def _caller(client: FunctionClient, mode: str) -> Callable[..., Any]:
    """The client method of a table's mode: a call, an async call, or a stream."""
    return {"call": client.call, "async": client.call_async, "stream": client.stream}[mode]


class _MethodProxy:
    __slots__ = ("_client", "_mode", "_service", "_timeout")

    def __init__(self, client: FunctionClient, service: str, mode: str, timeout: float | None) -> None:
        self._client, self._service, self._mode, self._timeout = client, service, mode, timeout

    def __call__(self, *args: Any, method: str = "process", timeout: float | None = None, **kwargs: Any) -> Any:
        """``call_service["cache"](key, method="get")``: SAGE's call with the method named."""
        return getattr(self, method)(*args, timeout=timeout if timeout is not None else self._timeout, **kwargs)

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("__"):
            raise AttributeError(method)
        fn, svc, t = _caller(self._client, self._mode), self._service, self._timeout

        def invoke(*args: Any, timeout: float | None = t, **kwargs: Any) -> Any:
            return fn(svc, method, *args, timeout=timeout, **kwargs)

        invoke.__name__ = method
        return invoke


class _ServiceTable:
    """``table["cache"]`` -> an object whose methods call the ``cache`` service."""

    __slots__ = ("_client", "_mode", "_timeout")

    def __init__(self, client: FunctionClient, mode: str, timeout: float | None = None) -> None:
        self._client, self._mode, self._timeout = client, mode, timeout

    def __getitem__(self, service: str) -> _MethodProxy:
        if not isinstance(service, str):
            raise InvalidCallArgument(f"service names are strings, got {service!r}")
        return _MethodProxy(self._client, service, self._mode, self._timeout)

    def __call__(
        self, service: str, *args: Any, method: str = "process", timeout: float | None = None, **kwargs: Any
    ) -> Any:
        fn = _caller(self._client, self._mode)
        return fn(service, method, *args, timeout=timeout if timeout is not None else self._timeout, **kwargs)


class ServiceCallMixin:
    """SAGE's two ways of calling services, for any class (a Ray actor, a
    plain class, a service):

    >>> class Operator(ServiceCallMixin):
    ...     def run(self, key):
    ...         hit = self.call_service["cache"].get(key)              # blocking
    ...         fut = self.call_service_async["cache"].get(key)        # a Future
    ...         return self.call_service["cache"](key, method="get")  # also a form

    The bus is ``self.sage_bus`` if set, else ``"default"``.
    """

    sage_bus: str | None = None

    def _sage_client(self) -> FunctionClient:
        c = self.__dict__.get("_sage_call_client")
        if c is None or c.closed:
            bus = getattr(self, "bus_name", None) or self.sage_bus or "default"
            c = FunctionClient(client_id=f"{type(self).__name__}-{uuid.uuid4().hex[:6]}", bus=bus)
            self.__dict__["_sage_call_client"] = c
        return c

    @property
    def call_service(self) -> _ServiceTable:
        return _ServiceTable(self._sage_client(), "call")

    @property
    def call_service_async(self) -> _ServiceTable:
        return _ServiceTable(self._sage_client(), "async")

    @property
    def stream_service(self) -> _ServiceTable:
        """``self.stream_service["llm"].tokens(prompt)``: the Stream of a generator function."""
        return _ServiceTable(self._sage_client(), "stream")


_default_clients: dict[str, FunctionClient] = {}


def _client_for(bus: str | None) -> FunctionClient:
    b = bus or "default"
    c = _default_clients.get(b)
    if c is None or c.closed:
        c = _default_clients[b] = FunctionClient(client_id=f"call_service-{os.getpid()}", bus=b)
    return c


def call_service(
    service: str,
    *args: Any,
    method: str = "process",
    timeout: float | None = None,
    bus: str | None = None,
    **kwargs: Any,
) -> Any:
    """``call_service("cache", key, method="get", timeout=10)``: SAGE's functional form of a call."""
    return _client_for(bus).call(service, method, *args, timeout=timeout, **kwargs)


def call_service_async(
    service: str,
    *args: Any,
    method: str = "process",
    timeout: float | None = None,
    bus: str | None = None,
    **kwargs: Any,
) -> concurrent.futures.Future:
    """As :func:`call_service`, returning a ``concurrent.futures.Future``."""
    return _client_for(bus).call_async(service, method, *args, timeout=timeout, **kwargs)


def stream_service(
    service: str,
    *args: Any,
    method: str = "process",
    timeout: float | None = None,
    bus: str | None = None,
    **kwargs: Any,
) -> Any:
    """As :func:`call_service`, for a generator function: its
    :class:`~sage_ray_comm.streams.Stream` (``window=``, ``idle_timeout=``
    as :meth:`FunctionClient.stream`)."""
    return _client_for(bus).stream(service, method, *args, timeout=timeout, **kwargs)
