"""Torch CPU tensors in messages: their bytes travel out-of-band, as numpy
arrays' do, so a large tensor goes into the arena once (arena.py) and the
receiver's tensor is a view of the slot (``torch.frombuffer``), not a copy.

Torch pickles a tensor's storage in-band: copied into the pickle, and out of
it again. Once torch is imported, this library pickles payloads with a
dispatch table that maps ``torch.Tensor`` to :func:`reduce_tensor`. The table
belongs to this library's pickler only: nothing is registered globally, so
``torch.save`` and every other pickler in the process are untouched.

Only plain, contiguous CPU tensors without autograd go this way. Any other
tensor (CUDA, sparse, quantized, one that requires grad, a subclass such as
``nn.Parameter``) pickles as torch pickles it.

A received tensor shares its slot, and torch has no read-only tensors: do
not write to it in place (other receivers may read the same slot). Use
``.clone()`` first, or declare the handler
``@service_function(writable=True)``, which clones such tensors for it.

>>> import sys  # the reducer is there once torch is imported, not before
>>> bool(reducers()) == ("torch" in sys.modules)
True
"""

from __future__ import annotations

import functools
import pickle
import sys
import warnings
import weakref
from typing import Any

__all__ = ["rebuild_tensor", "reduce_tensor", "reducers", "shares_memory"]

# Tensors rebuilt over a received buffer (an arena slot, or the frame), by
# id: writable=True handlers get clones of these. (Not a WeakSet: its lookups
# compare tensors with ==, which torch answers element by element.)
_IN_PLACE: dict[int, weakref.ref] = {}


def reducers() -> dict:
    """``torch.Tensor`` to :func:`reduce_tensor`, for this library's
    pickler's dispatch table (_codec.py); empty while torch is not imported."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "Tensor"):
        return {}
    return {torch.Tensor: reduce_tensor}


def reduce_tensor(t: Any) -> tuple:
    """Pickles a plain CPU tensor as its bytes, out-of-band (a
    ``PickleBuffer`` over the tensor's own memory: no copy until the frame or
    the arena takes it); any other tensor as torch does."""
    plain = (
        t.device.type == "cpu"
        and t.layout is sys.modules["torch"].strided
        and not t.requires_grad
        and not t.is_quantized
        and not t.is_conj()
        and not t.is_neg()
        and t.is_contiguous()
        and t.numel() > 0
    )
    if not plain:
        return t.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    raw = t.detach().reshape(-1).view(sys.modules["torch"].uint8).numpy()
    return rebuild_tensor, (pickle.PickleBuffer(raw), str(t.dtype).removeprefix("torch."), tuple(t.shape))


def rebuild_tensor(buf: Any, dtype: str, shape: tuple) -> Any:
    """The receiving side of :func:`reduce_tensor`: a tensor over ``buf``
    (no copy; it keeps ``buf``, and so its arena slot, alive)."""
    import torch  # type: ignore[import-not-found]  # only where torch is installed

    if type(buf) is bytes:  # a small tensor's bytes, inside the pickle: its own writable copy
        buf = bytearray(buf)

    with warnings.catch_warnings():
        # The buffer is read-only (a slot other receivers may read, or the
        # received frame): torch warns that its tensor will not be.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=torch.uint8)
    t = flat.view(getattr(torch, dtype)).reshape(shape)
    key = id(t)
    _IN_PLACE[key] = weakref.ref(t, functools.partial(_forget, key))
    return t


def _forget(key: int, _ref: Any) -> None:
    _IN_PLACE.pop(key, None)


def shares_memory(value: Any) -> bool:
    """Whether ``value`` is a tensor rebuilt over a received buffer (write
    to a clone of it, not to it)."""
    ref = _IN_PLACE.get(id(value))
    return ref is not None and ref() is value
