"""Torch CPU tensors (tensors.py): their bytes go out-of-band, so a large one
goes into the arena once and arrives as a view of its slot; other tensors
pickle as torch pickles them; nothing global changes. Skipped where torch is
not installed (CI installs no torch: its wheels bring gigabytes of CUDA)."""

from __future__ import annotations

import os
import pickle

import pytest
from _wait import wait_for

from sage_ray_comm import BaseService, FunctionClient, sage_service, service_function, tensors
from sage_ray_comm._codec import KIND_PICKLE_OOB, decode_payload, encode_payload
from sage_ray_comm.arena import Arena

torch = pytest.importorskip("torch")

MiB = 1 << 20


@pytest.fixture
def arena():
    a = Arena(f"tensors-{os.getpid()}", budget=64 * MiB)
    yield a
    a.close()


def _round_trip(obj, arena):
    parts, kind = encode_payload(obj, "test", arena, os.getpid(), 5.0)
    return decode_payload(b"".join(bytes(p) for p in parts), kind, "test"), kind


def test_a_large_tensor_is_copied_once_into_the_arena_and_read_in_place(arena):
    t = torch.arange(MiB // 4, dtype=torch.float32)
    got, kind = _round_trip(t, arena)
    assert kind == KIND_PICKLE_OOB and type(got) is torch.Tensor
    assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    assert arena.stats()["copies"] == 1 and arena.in_use() == 1  # the tensor is a view of its slot
    assert tensors.shares_memory(got) and not tensors.shares_memory(t)
    t += 1  # value semantics: the sender's tensor changing never changes what was sent
    assert got[0].item() == 0.0
    del got
    assert arena.in_use() == 0  # released with the tensor, by reference counting


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.complex64]
)
def test_every_dtype_and_shape_comes_back_equal(arena, dtype):
    base = torch.arange(MiB // 2, dtype=torch.float64).reshape(512, -1)
    t = (base % 2).to(dtype) if dtype is torch.bool else base.to(dtype)
    got, _ = _round_trip({"t": t, "scalar": t[0, 0].clone()}, arena)
    assert got["t"].dtype == dtype and got["t"].shape == (512, MiB // 1024) and torch.equal(got["t"], t)
    assert got["scalar"].shape == () and torch.equal(got["scalar"], t[0, 0])


def test_other_tensors_pickle_as_torch_pickles_them(arena):
    grad = torch.ones(MiB // 4, requires_grad=True)
    transposed = torch.ones(512, MiB // 2048).t()  # not contiguous
    param = torch.nn.Parameter(torch.ones(3))  # a subclass
    got, _ = _round_trip({"grad": grad, "t": transposed, "p": param, "empty": torch.empty(0, 3)}, arena)
    assert got["grad"].requires_grad and torch.equal(got["grad"], grad)
    assert got["t"].shape == transposed.shape and torch.equal(got["t"], transposed)
    assert type(got["p"]) is torch.nn.Parameter and got["empty"].shape == (0, 3)
    assert not any(tensors.shares_memory(v) for v in got.values())  # torch's own copies
    assert arena.in_use() == 0


def test_nothing_global_changes():
    """Our pickler's dispatch table is its own: plain pickle (and torch.save)
    in the same process still pickle tensors as torch does."""
    t = torch.ones(8)
    assert tensors.reducers()
    assert b"sage_ray_comm" not in pickle.dumps(t, protocol=5)
    assert type(t).__reduce_ex__ is torch.Tensor.__reduce_ex__


@sage_service(name="tensor_echo", num_cpus=0.1)
class TensorEcho(BaseService):
    @service_function
    def echo(self, t):
        return t

    @service_function
    def look(self, t) -> tuple:
        return type(t).__name__, tensors.shares_memory(t), float(t.sum())

    @service_function(writable=True)
    def double_a_copy(self, t) -> tuple:
        private = not tensors.shares_memory(t)  # a clone: the slot other receivers read is untouched
        t *= 2
        return private, float(t.sum())


def test_tensors_reach_a_service_in_place_and_come_back_without_a_copy(bus):
    TensorEcho.deploy(bus=bus)
    with FunctionClient(bus=bus) as c:
        t = torch.rand(MiB // 4)
        assert c.call("tensor_echo", "look", t) == ("Tensor", True, pytest.approx(float(t.sum()), rel=1e-5))
        got = c.call("tensor_echo", "echo", t)
        assert torch.equal(got, t) and tensors.shares_memory(got)
        assert c.stats()["arena"]["copies"] == 2  # one per call: the echo went back in the same slot
        assert c.call("tensor_echo", "double_a_copy", t) == (True, pytest.approx(2 * float(t.sum()), rel=1e-5))
        del got
        wait_for(lambda: c.stats()["arena"]["in_use"] == 0, 10, "the slots to come back")
