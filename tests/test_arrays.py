"""numpy arrays through this library's reducer (arrays.py): what arrives is
what was sent, every kind of array, and a receiver needs nothing imported."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from sage_ray_comm import arrays
from sage_ray_comm._codec import KIND_PICKLE, KIND_PICKLE_OOB, decode_payload, dispatch_table, encode_payload


class Tagged(np.ndarray):
    """A subclass: pickled as numpy pickles it."""


def roundtrip(value):
    parts, kind = encode_payload(value, "a test")
    return decode_payload(b"".join(bytes(p) for p in parts), kind, "a test"), kind


PLAIN = [
    np.arange(300, dtype="<f8"),
    np.arange(24, dtype=">i4").reshape(2, 3, 4),  # byte order kept
    np.array(["ab", "cde"] * 100, dtype="U3"),
    np.array([b"xy"] * 600, dtype="S2"),
    np.ones((40, 40), dtype=np.complex64),
    np.zeros((0, 5)),  # empty
    np.array(3.0),  # 0-d
]


@pytest.mark.parametrize("a", PLAIN, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_plain_arrays_go_by_the_short_reduction_and_arrive_equal(a):
    fn, args = arrays.reduce_array(a)
    assert fn is arrays.rebuild_array and args[1] == a.dtype.str
    b, _ = roundtrip({"x": a})
    assert type(b["x"]) is np.ndarray and b["x"].dtype == a.dtype and b["x"].shape == a.shape
    assert np.array_equal(b["x"], a)


SMALL = [np.arange(6.0), np.array(3.0), np.zeros((0, 5)), np.arange(24, dtype=">i4").reshape(2, 3, 4)]


@pytest.mark.parametrize("a", SMALL, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_a_small_array_goes_inside_the_pickle_by_the_short_reduction_and_arrives_writable(a):
    """Under the out-of-band minimum (1 KiB of buffers) an array's bytes go
    inside the pickle, still by this library's reducer (numpy's own
    pickling of a small array took about twice as long), and arrive as
    numpy's own unpickling gives them: a private, writable copy."""
    parts, kind = encode_payload({"x": a, "again": a}, "a test")
    assert kind == KIND_PICKLE and len(parts) == 1 and b"rebuild_array" in parts[0]
    b = decode_payload(parts[0], kind, "a test")
    assert b["x"] is b["again"] and b["x"].flags.writeable
    assert np.array_equal(b["x"], a) and b["x"].dtype == a.dtype and b["x"].shape == a.shape
    ro = a.copy()
    ro.flags.writeable = False
    c, _ = roundtrip(ro)
    assert c.flags.writeable and np.array_equal(c, ro)


OTHERS = [
    np.zeros(100, dtype=[("a", "<i4"), ("b", "<f8")]),  # structured
    np.array([{"k": 1}, None, "x"] * 100, dtype=object),
    np.arange(2000.0)[::2],  # not contiguous
    np.asfortranarray(np.arange(1200.0).reshape(30, 40)),
    np.arange(600.0).view(Tagged),
    np.array(["2026-11-30T12:00"] * 200, dtype="M8[ns]"),  # numpy exports no buffer of it
]


@pytest.mark.parametrize("a", OTHERS, ids=["structured", "object", "strided", "fortran", "subclass", "datetime"])
def test_other_arrays_pickle_as_numpy_pickles_them(a):
    fn = arrays.reduce_array(a)[0] if type(a) is np.ndarray else None
    assert fn is not arrays.rebuild_array
    b, _ = roundtrip(a)
    assert type(b) is type(a) and b.dtype == a.dtype and b.shape == a.shape
    assert b.flags.f_contiguous == a.flags.f_contiguous or not a.flags.c_contiguous
    if a.dtype.hasobject:
        assert b.tolist() == a.tolist()
    else:
        assert np.array_equal(b, a)


def test_a_received_array_is_read_only_over_a_read_only_buffer():
    a = np.arange(1000.0)
    b, kind = roundtrip(a)
    assert kind == KIND_PICKLE_OOB and not b.flags.writeable  # over the (bytes) frame
    assert a.flags.writeable  # the sender's is untouched


def test_a_receiver_that_never_imported_numpy_still_rebuilds_arrays():
    parts, kind = encode_payload((np.arange(1000.0), "tail"), "a test")
    frame = b"".join(bytes(p) for p in parts)
    code = (
        "import sys; from sage_ray_comm._codec import decode_payload\n"
        "assert 'numpy' not in sys.modules, 'imported too early'\n"
        f"a, tail = decode_payload(sys.stdin.buffer.read(), {kind}, 'stdin')\n"
        "print(type(a).__name__, a.sum(), tail)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=frame, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["ndarray", str(np.arange(1000.0).sum()), "tail"]


# A receiver's thread unpickles an array while another thread of it is in the
# middle of importing numpy (the 3-node soak met this: sys.modules then holds
# a half-made numpy without frombuffer). The import is held open here by a
# loader that waits, so the order is certain.
_HALF_IMPORTED = """
import importlib.machinery, sys, threading
started, go, decoding = threading.Event(), threading.Event(), threading.Event()

class Held:
    def find_spec(self, name, path=None, target=None):
        if name != "numpy":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        real = spec.loader
        class Loader:
            def create_module(self, spec):
                return real.create_module(spec)
            def exec_module(self, module):
                started.set()
                go.wait(60)
                real.exec_module(module)
        spec.loader = Loader()
        return spec

sys.meta_path.insert(0, Held())
frame = sys.stdin.buffer.read()
importer = threading.Thread(target=__import__, args=("numpy",))
importer.start()
assert started.wait(60)
from sage_ray_comm._codec import decode_payload
out = []
def decode():
    decoding.set()
    try:
        out.append(decode_payload(frame, KIND, "stdin").sum())
    except Exception as e:
        out.append(repr(e))
reader = threading.Thread(target=decode)
reader.start()
assert decoding.wait(60)
reader.join(0.5)
waited = reader.is_alive()  # blocked on numpy's import, as it should be
go.set()
reader.join(60)
importer.join(60)
print(waited, out[0])
"""


def test_a_receiver_still_importing_numpy_waits_for_it():
    parts, kind = encode_payload(np.arange(1000.0), "a test")
    code = _HALF_IMPORTED.replace("KIND", str(kind))
    out = subprocess.run(
        [sys.executable, "-c", code], input=b"".join(bytes(p) for p in parts), capture_output=True, timeout=120
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["True", str(np.arange(1000.0).sum())]


def test_plain_pickle_is_untouched():
    a = np.arange(10.0)
    assert b"sage_ray_comm" not in pickle.dumps(a, protocol=5)
    assert dispatch_table()[np.ndarray] is arrays.reduce_array
    assert np.ndarray not in __import__("copyreg").dispatch_table


class _Late:
    """A type whose copyreg reducer is registered after our table was made."""

    def __init__(self, x: int) -> None:
        self.x = x


def _late_rebuild(x: int) -> _Late:
    return _Late(x * 2)  # doubled: shows the registered reducer ran, not plain pickling


def test_a_reducer_registered_with_copyreg_later_is_used():
    import copyreg

    assert dispatch_table() is not None  # made (numpy is imported)
    copyreg.pickle(_Late, lambda o: (_late_rebuild, (o.x,)))
    try:
        # With an array out-of-band (1,000 floats: a tiny one is pickled again by plain pickle).
        parts, kind = encode_payload([_Late(3), np.arange(1000.0)], "a test")
        assert kind == KIND_PICKLE_OOB
        got = decode_payload(b"".join(bytes(p) for p in parts), kind, "a test")
        assert got[0].x == 6 and got[1].sum() == 499500.0
        assert dispatch_table()[np.ndarray] is arrays.reduce_array  # ours still first
    finally:
        del copyreg.dispatch_table[_Late]
    parts, kind = encode_payload(_Late(3), "a test")
    assert decode_payload(b"".join(bytes(p) for p in parts), kind, "a test").x == 3  # and gone again
