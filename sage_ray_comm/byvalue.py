"""Pickling by value, for what a receiver cannot import: classes, models and
dataclasses defined in ``__main__`` (a script, a notebook), lambdas and
closures, through Ray's cloudpickle.

A class from ``__main__`` is pickled once per process, not once per message:
its cloudpickle bytes are kept with a digest, each message carries them, and
a receiver rebuilds the class once per digest. A pydantic model defined in a
notebook cost 94 us to pickle and 170 us to rebuild on every message before
(its schema and validator are rebuilt with it).

The bytes are those of the class when it was first sent: a class changed
afterwards (an attribute set on it) is seen by receivers as it was. Defining
it again, as running a notebook cell again does, makes a new class, sent
anew.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import threading
import weakref
from typing import Any

__all__ = ["CLASS_CACHE_MAX", "class_by_value", "dumps_by_value"]

# Classes a receiver keeps rebuilt, by digest; past this many (a notebook that
# redefines its classes again and again) it starts over.
CLASS_CACHE_MAX = 256
_DIGEST_BYTES = 16

_lock = threading.Lock()
_sent: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # class -> (digest, its cloudpickle bytes)
_built: dict[bytes, type] = {}  # digest -> the class rebuilt in this process
_pickler: Any = None


def dumps_by_value(obj: Any, bufs: list | None = None) -> bytes:
    """``obj`` pickled by Ray's cloudpickle (protocol 5; ``bufs``, if given,
    collects out-of-band buffers), with classes from ``__main__`` as their
    kept bytes. Read back by plain ``pickle.loads``.

    >>> import pickle
    >>> pickle.loads(dumps_by_value(lambda x: x * 2))(21)
    42
    """
    global _pickler
    if _pickler is None:
        _pickler = _make_pickler()
    out = io.BytesIO()
    _pickler(out, protocol=5, buffer_callback=None if bufs is None else bufs.append).dump(obj)
    return out.getvalue()


def class_by_value(digest: bytes, data: bytes) -> type:
    """The receiving side: the class ``data`` holds, rebuilt once per
    ``digest`` in this process."""
    cls = _built.get(digest)
    if cls is None:
        cls = pickle.loads(data)
        with _lock:
            if len(_built) >= CLASS_CACHE_MAX:
                _built.clear()
            _built[digest] = cls
    return cls


def _kept(cls: type, cloudpickle: Any) -> tuple[bytes, bytes]:
    record = _sent.get(cls)
    if record is None:
        data = cloudpickle.dumps(cls, protocol=5)
        record = (hashlib.blake2b(data, digest_size=_DIGEST_BYTES).digest(), data)
        with _lock:
            _sent[cls] = record
    return record


def _make_pickler() -> Any:
    from ray import cloudpickle  # ray is a dependency; imported only when needed

    class Pickler(cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, type) and getattr(obj, "__module__", None) == "__main__":
                return class_by_value, _kept(obj, cloudpickle)
            return super().reducer_override(obj)

    return Pickler
