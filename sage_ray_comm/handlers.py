"""A service's exposed functions, found on its class and made ready to call.

:func:`collect_handlers` reads the marks ``@service_function`` and
``@subscribe`` leave on methods; each :class:`Handler` resolves its
signature once and builds its pydantic validator once (annotated handlers
only: validation costs a few microseconds a call).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pydantic

from . import tensors
from .errors import NameConflict
from .nested import replace_nested
from .router import FunctionInfo

if TYPE_CHECKING:
    from .service import BaseService, ServiceFunction

__all__ = ["Handler", "collect_handlers", "validation_message"]

log = logging.getLogger(__name__)


class Handler:
    """One callable function of a running service, ready to invoke."""

    __slots__ = (
        "fn",
        "info",
        "is_async",
        "name",
        "params",
        "service",
        "stream",
        "takes_payload",
        "validated",
        "wants_message",
    )

    def __init__(self, service: str, name: str, bound: Callable, meta: ServiceFunction | None) -> None:
        self.service = service
        self.name = name
        self.fn = bound
        resolvable = True
        try:  # resolve string annotations (``from __future__ import annotations``)
            sig = inspect.signature(bound, eval_str=True)
        except Exception:
            # A class from the caller's __main__ named only in a string
            # annotation: the replica cannot resolve it, so it cannot check it.
            sig = inspect.signature(bound)
            resolvable = False
        self.params = [
            p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        self.is_async = inspect.iscoroutinefunction(bound)
        # A generator function is a stream: calling it opens one (producers.py).
        self.stream = (
            "async" if inspect.isasyncgenfunction(bound) else "sync" if inspect.isgeneratorfunction(bound) else ""
        )
        self.wants_message = "message" in sig.parameters
        # The original API's `call_function(..., payload=data)`: when the handler
        # has no parameter of that name, `payload` is its one argument.
        self.takes_payload = "payload" in sig.parameters or any(
            p.kind is p.VAR_KEYWORD for p in sig.parameters.values()
        )
        annotated = any(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values())
        # Validate only annotated handlers: pydantic costs a few microseconds a call.
        self.validated: Callable[..., Any] = bound
        if annotated and resolvable:
            try:
                self.validated = pydantic.validate_call(config=pydantic.ConfigDict(arbitrary_types_allowed=True))(bound)
            except Exception as e:  # an annotation pydantic cannot build a schema for
                log.warning("%s.%s: arguments are not validated (%s: %s)", service, name, type(e).__name__, e)
        elif annotated:
            log.warning(
                "%s.%s: arguments are not validated: its annotations name classes this "
                "process cannot resolve (defined in the deploying script?)",
                service,
                name,
            )
        if meta is not None and getattr(meta, "writable", False):
            self.validated = _with_writable_copies(self.validated)
        self.info = FunctionInfo(
            name=name,
            timeout=meta.timeout if meta else None,
            idempotent=meta.idempotent if meta else False,
            is_async=self.is_async or self.stream == "async",
            stream=bool(self.stream),
            signature=f"{name}{sig}",
            pattern=meta.pattern if meta else "request_response",
        )


# How many levels into its arguments ``writable=True`` looks for arrays to
# copy: enough for a list of message models holding arrays, and an end to
# a structure that refers to itself.
WRITABLE_DEPTH = 4


def _writable(value: Any, depth: int = WRITABLE_DEPTH) -> Any:
    """``value`` with private, writable copies of the read-only arrays in it
    (those read in place from the arena) and of tensors over received
    buffers (tensors.py), up to ``depth`` levels down: in lists, tuples,
    dicts, and the fields of pydantic models and dataclasses (a shallow copy
    of the model is given the copies; the one received is left alone).
    ``value`` itself when it holds none. No width limit: the handler asked
    for copies of all of them."""
    return replace_nested(value, _writable_copy, depth)


def _writable_copy(value: Any) -> Any:
    flags = getattr(value, "flags", None)
    if flags is not None and hasattr(value, "copy"):
        return value.copy() if not getattr(flags, "writeable", True) else value
    if tensors.shares_memory(value):
        return value.clone()
    return value


def _with_writable_copies(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` given writable copies of the read-only arrays in its arguments,
    at any depth :func:`_writable` looks: ``@service_function(writable=True)``."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*map(_writable, args), **{k: _writable(v) for k, v in kwargs.items()})

    return call


def collect_handlers(svc: BaseService) -> tuple:
    functions: dict[str, Handler] = {}
    events: dict[str, list[str]] = {}
    seen = set()
    for klass in type(svc).__mro__:
        for attr, raw in vars(klass).items():
            if attr in seen:
                continue
            seen.add(attr)
            meta = getattr(raw, "__sage_function__", None)
            pats = getattr(raw, "__sage_subscribe__", None)
            if meta is None and not pats:
                continue
            bound = getattr(svc, attr)
            if meta is not None:
                name = meta.name or attr
                if name in functions:
                    raise NameConflict(
                        f"service '{svc.service_name}' exposes two functions named '{name}' "
                        f"({functions[name].fn.__name__} and {attr})"
                    )
                functions[name] = Handler(svc.service_name, name, bound, meta)
            if pats:
                functions.setdefault(f"@event:{attr}", Handler(svc.service_name, attr, bound, None))
                events[f"@event:{attr}"] = list(pats)
    return functions, events


def validation_message(service: str, fn: str, e: pydantic.ValidationError, params: list[str]) -> tuple:
    errs = []
    for d in e.errors(include_url=False):
        # pydantic names positional arguments by index: name them as the handler does
        parts = [
            params[x] if isinstance(x, int) and i == 0 and x < len(params) else str(x)
            for i, x in enumerate(d.get("loc", ()))
        ]
        loc = ".".join(parts) or "(arguments)"
        errs.append({"loc": list(d.get("loc", ())), "msg": d.get("msg", ""), "type": d.get("type", "")})
        errs[-1]["field"] = loc
    detail = "; ".join(f"{x['field']}: {x['msg']}" for x in errs)
    return f"invalid arguments for {service}.{fn}: {detail}", errs
