"""Anything a Ray actor call takes, a service call takes and returns:
classes, pydantic models and dataclasses defined in ``__main__``, lambdas and
closures (by value, through Ray's cloudpickle), while importable objects keep
the plain-pickle fast path."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import uuid

import numpy as np
import pydantic
import pytest

from sage_ray_comm._codec import _MAIN, dumps, holds_no_buffers

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_main_classes_lambdas_and_closures_cross_processes(tmp_path):
    bus = f"main-{uuid.uuid4().hex[:6]}"
    with open(tmp_path / "out", "w") as o, open(tmp_path / "err", "w") as e:
        rc = subprocess.run(
            [sys.executable, os.path.join(HERE, "_main_classes_driver.py"), bus],
            stdout=o,
            stderr=e,
            timeout=200,
            cwd=str(tmp_path),
        ).returncode
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert rc == 0, f"rc={rc}\n{out[-2000:]}\n{err[-4000:]}"
    r = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT ") :])
    # the replica got a Point and a Box, and the driver gets its own classes back
    assert r["point"] == ["Point", True, 6.0, 8.0]
    assert r["box"] == [True, 2, 3]
    assert r["closure"] == 15 and r["adder"] == 8
    assert r["transport"] >= 4  # all of it over shared memory, not Ray


@dataclasses.dataclass
class Importable:
    v: int


def test_importable_objects_keep_plain_pickle():
    """The fast path: no cloudpickle for builtins and importable classes (the
    bytes are exactly plain pickle's)."""
    for obj in (b"x" * 8, {"a": [1, 2.0, "s"]}, Importable(3)):
        assert dumps(obj) == pickle.dumps(obj, protocol=5)


def test_main_objects_go_by_value(monkeypatch):
    main_cls = type("InMain", (), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "InMain", main_cls, raising=False)  # as a script defines it
    data = dumps(main_cls)
    assert pickle.dumps(main_cls, protocol=5).count(_MAIN)  # plain pickle would name __main__...
    assert data != pickle.dumps(main_cls, protocol=5)  # ...so it went by value instead
    assert pickle.loads(dumps(lambda x: x * 3))(2) == 6
    k = 4
    assert pickle.loads(dumps(lambda x: x + k))(1) == 5


def test_out_of_band_buffers_survive_the_fallback():
    np = pytest.importorskip("numpy")
    main_cls = type("Holder", (), {"__module__": "__main__"})
    h = main_cls()
    h.a = np.arange(4096)
    bufs: list = []
    data = dumps(h, bufs)
    back = pickle.loads(data, buffers=bufs)
    assert (back.a == h.a).all()


def test_large_pickles_are_judged_by_their_objects(monkeypatch):
    """Over _SCAN_MAX bytes the pickle is not searched (340 us per MiB): the
    object graph decides. A big payload next to a __main__ object still goes
    by value; builtins only, however big, stay plain pickle."""
    from sage_ray_comm._codec import _SCAN_MAX, _builtin_only

    main_cls = type("BigMain", (), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "BigMain", main_cls, raising=False)
    big = os.urandom(4 * _SCAN_MAX)
    mixed = {"payload": big, "meta": main_cls()}
    assert not _builtin_only(mixed)
    assert dumps(mixed) != pickle.dumps(mixed, protocol=5)  # by value
    plain = (1, "x", [big, {"k": (2.0, None)}], frozenset({b"y"}))
    assert _builtin_only(plain) and dumps(plain) == pickle.dumps(plain, protocol=5)
    assert not _builtin_only([Importable(1)]) and not _builtin_only(type("S", (str,), {})("s"))


class _Event(pydantic.BaseModel):
    seq: int
    tags: list[str]


class _ImageEvent(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True, extra="allow")
    seq: int


@dataclasses.dataclass
class _Point:
    x: float
    y: float


def test_holds_no_buffers_is_sure_only_of_plain_values():
    """Publishing skips its trial pickling only on this answer, so a "yes"
    must be right: anything that could hold an array says "perhaps"."""
    arr = np.ones(4)
    sure = [None, 1, "s", b"b" * 10, {"a": 1, "b": [1, 2]}, (1.0, "x"), _Event(seq=1, tags=["a"]), [_Point(1, 2)]]
    for v in sure:
        assert holds_no_buffers(v), v
    perhaps = [
        arr,
        memoryview(b"x"),
        bytearray(3),
        [arr],
        {"a": {"b": arr}},
        _Point(arr, 1.0),  # type: ignore[arg-type]  # a dataclass does not check its types
        _ImageEvent(seq=1, image=arr),  # in the model's extra values
        list(range(100)),  # too long to look through
        [[[[1]]]],  # deeper than it looks
        object(),
    ]
    for v in perhaps:
        assert not holds_no_buffers(v), v
