"""Classes from ``__main__`` go by value once per process (byvalue.py): the
sender pickles a class once and keeps its bytes, a receiver rebuilds it once
per digest. Across real processes this path is tested by
test_serialization.py's driver script, whose classes live in ``__main__``."""

from __future__ import annotations

import pickle
import sys
import types

import pydantic
import pytest
from ray import cloudpickle

from sage_ray_comm import byvalue
from sage_ray_comm._codec import dumps


def _main_model(cls_name: str, monkeypatch, **fields) -> type:
    """A pydantic model whose module is ``__main__``, as a notebook defines one."""
    cls = pydantic.create_model(cls_name, __module__="__main__", **fields)  # type: ignore[call-overload]
    monkeypatch.setattr(sys.modules["__main__"], cls_name, cls, raising=False)
    return cls


def test_a_main_class_is_pickled_once_and_rebuilt_once(monkeypatch):
    Ev = _main_model("Ev", monkeypatch, seq=(int, ...), label=(str, ...))
    pickled, loaded = [], []
    real_dumps, real_loads = cloudpickle.dumps, pickle.loads
    monkeypatch.setattr(cloudpickle, "dumps", lambda *a, **k: pickled.append(a[0]) or real_dumps(*a, **k))
    frames = [dumps(Ev(seq=i, label="x")) for i in range(5)]
    assert pickled == [Ev]  # the class once, not once per message
    counting = types.SimpleNamespace(loads=lambda data: loaded.append(1) or real_loads(data))
    monkeypatch.setattr(byvalue, "pickle", counting)  # byvalue's own rebuilds, not the frames' loads below
    got = [pickle.loads(f) for f in frames]
    assert [e.seq for e in got] == list(range(5)) and len({type(e) for e in got}) == 1
    assert len(loaded) <= 1  # rebuilt at most once here (the tracker may already know it: then never)


def test_a_class_defined_again_is_sent_anew(monkeypatch):
    """Running a notebook cell again makes a new class: receivers get it."""
    old = _main_model("Cell", monkeypatch, a=(int, ...))
    first = pickle.loads(dumps(old(a=1)))
    new = _main_model("Cell", monkeypatch, a=(int, ...), b=(int, 7))
    second = pickle.loads(dumps(new(a=2)))
    assert not hasattr(first, "b") and second.b == 7


def test_the_receivers_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(byvalue, "CLASS_CACHE_MAX", 2)
    monkeypatch.setattr(byvalue, "_built", {})
    classes = [_main_model(f"Bounded{i}", monkeypatch, v=(int, ...)) for i in range(5)]
    for i, cls in enumerate(classes):
        assert pickle.loads(dumps(cls(v=i))).v == i
    assert 0 < len(byvalue._built) <= 2


@pytest.mark.parametrize("obj", [lambda x: x * 3, (lambda k: lambda x: x + k)(4)])
def test_lambdas_and_closures_still_go_by_value(obj):
    assert pickle.loads(byvalue.dumps_by_value(obj))(2) == obj(2)
