"""The maintainer's checks, run by CI through the test suite: lint, format,
types, C++ format, and the extension's stub kept true to the binding."""

from __future__ import annotations

import ast
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from sage_ray_comm import _core

ROOT = pathlib.Path(__file__).resolve().parent.parent
PY_PATHS = ["sage_ray_comm", "tests", "benchmarks", "examples"]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_lint_is_clean():
    r = _run(sys.executable, "-m", "ruff", "check", *PY_PATHS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_clean():
    r = _run(sys.executable, "-m", "ruff", "format", "--check", *PY_PATHS)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_mypy_is_clean():
    r = _run(sys.executable, "-m", "mypy")  # files and options: [tool.mypy] in pyproject.toml
    assert r.returncode == 0, r.stdout + r.stderr


def test_csrc_follows_clang_format():
    exe = shutil.which("clang-format") or str(pathlib.Path(sys.executable).parent / "clang-format")
    files = sorted(str(p) for p in (ROOT / "csrc").glob("*.[ch]pp"))
    r = _run(exe, "--dry-run", "--Werror", *files)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------- _core.pyi
# pybind11 writes each function's signature as the first line of its
# docstring: "name(self: sage_ray_comm._core.Ring, timeout: object = None, ...) -> tuple".
_SIG = re.compile(r"^(\w+)\((.*)\) -> ")


def _runtime_params(obj: object) -> list[tuple[str, bool]]:
    """(name, has a default) of each parameter pybind11 documents, self excluded."""
    line = (obj.__doc__ or "").splitlines()[0]
    m = _SIG.match(line)
    assert m, f"no signature in the docstring of {obj!r}: {line!r}"
    params, depth, cur = [], 0, ""
    for ch in m.group(2):  # split on top-level commas (types may hold brackets)
        if ch == "," and depth == 0:
            params.append(cur)
            cur = ""
            continue
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        cur += ch
    if cur.strip():
        params.append(cur)
    out = [(p.split(":")[0].strip(), "=" in p) for p in params]
    return [p for p in out if p[0] != "self"]


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, bool]]:
    args = fn.args.args
    n_defaults = len(fn.args.defaults)
    out = [(a.arg, i >= len(args) - n_defaults) for i, a in enumerate(args)]
    return [p for p in out if p[0] != "self"]


def _stub() -> ast.Module:
    return ast.parse((ROOT / "sage_ray_comm" / "_core.pyi").read_text())


def _public(names):
    return {n for n in names if not n.startswith("__") and n != "_pybind11_conduit_v1_"}


def test_stub_declares_exactly_what_the_binding_exports():
    stub = _stub()
    declared = set()
    for node in stub.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            declared.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            declared.add(node.target.id)
    declared = {n for n in declared if not n.startswith("_Stub")}
    assert declared == _public(dir(_core)) - {"_HEADER_OFFSETS"} | {"_HEADER_OFFSETS"} & declared
    for cls in (n for n in stub.body if isinstance(n, ast.ClassDef)):
        members = {m.name for m in cls.body if isinstance(m, ast.FunctionDef)} - {"__init__"}
        assert members == _public(dir(getattr(_core, cls.name))), cls.name


def test_stub_signatures_match_the_binding():
    """Parameter names, order and which have defaults: what a caller relies on."""
    stub = _stub()
    checked = 0
    for node in stub.body:
        if isinstance(node, ast.FunctionDef):
            assert _stub_params(node) == _runtime_params(getattr(_core, node.name)), node.name
            checked += 1
        elif isinstance(node, ast.ClassDef):
            rt_cls = getattr(_core, node.name)
            for m in node.body:
                if not isinstance(m, ast.FunctionDef):
                    continue
                rt = getattr(rt_cls, m.name)
                if isinstance(rt, property) or any(
                    isinstance(d, ast.Name) and d.id == "property" for d in m.decorator_list
                ):
                    continue
                if m.name == "__init__":
                    rt = rt_cls.__init__
                    if "No constructor" in (rt.__doc__ or "") or not _SIG.match((rt.__doc__ or "").splitlines()[0]):
                        continue
                assert _stub_params(m) == _runtime_params(rt), f"{node.name}.{m.name}"
                checked += 1
    assert checked > 20


def test_one_version_source():
    import sage_ray_comm

    # (tomllib is 3.11+; the project supports 3.10)
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    # A stale build of the extension (csrc changed, no reinstall) shows here too.
    assert sage_ray_comm.__version__ == _core.__version__ == declared
