"""The examples in docstrings run, for the modules whose examples need no Ray
(the others mark theirs ``+SKIP`` and are exercised by the real tests)."""

from __future__ import annotations

import doctest
import importlib

import pytest

RAY_FREE = [
    "_wire",
    "_codec",
    "context",
    "tracing",
    "testing",
    "routing",
    "queue",
    "shm",
    "message",
    "errors",
    "router",
    "lifecycle",
    "arena",
    "cancels",
    "tensors",
    "arrays",
    "dispatch",
    "spinning",
]


@pytest.mark.parametrize("name", RAY_FREE)
def test_docstring_examples_run(name):
    mod = importlib.import_module(f"sage_ray_comm.{name}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0, f"{name} has no runnable example"
