"""The package's shape, checked from its source: no import cycles, no module
importing another's private names, lazy imports only where they are needed,
and modules of a readable size. (Lint, format and types: test_tooling.py.)"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "sage_ray_comm"
MODULES = {p.stem: p for p in PKG.glob("*.py")}
MAX_LINES = 560  # "about 500"
# Imports of our own modules that stay inside functions, each for a reason
# given in a comment at the import: (importing module, imported module).
ALLOWED_LAZY: set[tuple[str, str]] = set()  # none needed: `import sage_ray_comm` imports no Ray


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(mod: str, core: bool = False) -> list[tuple[str, list[str], bool, int]]:
    """(imported module, names, at top level?, line) for each relative import
    executed at run time (``if TYPE_CHECKING:`` blocks are not)."""
    tree = ast.parse(MODULES[mod].read_text())
    out = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                if child.module:
                    out.append((child.module.split(".")[0], [a.name for a in child.names], top, child.lineno))
                else:
                    out.extend((a.name, [], top, child.lineno) for a in child.names)
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            visit(child, nested)

    visit(tree, True)
    return [i for i in out if i[0] in MODULES or (core and i[0] == "_core")]


def test_no_module_imports_a_private_name_of_another():
    bad = [
        f"{mod}:{line} imports {name} from {target}"
        for mod in MODULES
        for target, names, _, line in _imports(mod)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not bad, bad


def test_there_are_no_import_cycles():
    graph = {m: {t for t, _, _, _ in _imports(m)} for m in MODULES}
    cycles = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                cycles.append([*path, start])
            elif nxt not in path and nxt > start:  # each cycle once, from its smallest module
                walk(start, nxt, [*path, nxt])

    for m in sorted(graph):
        walk(m, m, [m])
    assert not cycles, cycles


def test_lazy_imports_of_our_own_modules_are_the_listed_ones():
    lazy = {(m, t) for m in MODULES for t, _, top, _ in _imports(m) if not top}
    assert lazy <= ALLOWED_LAZY, sorted(lazy - ALLOWED_LAZY)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_module_is_of_a_readable_size(mod):
    n = len(MODULES[mod].read_text().splitlines())
    assert n <= MAX_LINES, f"{mod}.py has {n} lines"


def test_only_queue_and_shm_import_the_extension():
    users = {m for m in MODULES for t, names, _, _ in _imports(m, core=True) if t == "_core" or "_core" in names}
    assert users <= {"queue", "shm"}, users


def test_importing_the_package_does_not_import_ray():
    # `import ray` costs about a second; a SageQueue user or `sage-comm gc` should not pay it.
    import subprocess
    import sys

    code = "import sys, sage_ray_comm, sage_ray_comm.cli; assert 'ray' not in sys.modules, 'ray was imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
