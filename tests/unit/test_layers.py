"""The layering of the package, read from the source and from docs/architecture.md.

The architecture document lists the modules by layer, top first, in a
```layers block. These tests check that every module is listed once, that a
module imports (at run time, lazily or not) only modules of its own layer or
below, and that there is no import cycle. Imports under ``TYPE_CHECKING`` do
not count: they never run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

# runs in the first pass only (core_independent): reads the source and docs; no task runs
pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "async_wf"
DOC = ROOT / "docs" / "architecture.md"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(name: str) -> set[str]:
    """The package's modules that module ``name`` imports when it runs."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in MODULES else module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES and m != name}


def documented_layers() -> dict[str, int]:
    """Module -> layer number, from the ```layers block (higher imports lower)."""
    block = re.search(r"```layers\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/architecture.md has no ```layers block"
    layer_of: dict[str, int] = {}
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        number, _, names = line.partition(" ")
        for short in names.split():
            full = "async_wf" if short == "async_wf" else f"async_wf.{short}"
            if full.endswith(".*"):
                members = [m for m in MODULES
                           if m == full[:-2] or m.startswith(full[:-1])]
            else:
                members = [full]
            for m in members:
                assert m not in layer_of, f"{m} is listed twice in the layers block"
                layer_of[m] = int(number)
    return layer_of


def test_every_module_is_in_the_documented_layers() -> None:
    layers = documented_layers()
    assert sorted(set(MODULES) - set(layers)) == []
    assert sorted(set(layers) - set(MODULES)) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_its_layer_or_below(name: str) -> None:
    layers = documented_layers()
    above = sorted(m for m in runtime_imports(name) if layers[m] > layers[name])
    assert above == [], f"{name} (layer {layers[name]}) imports a higher layer: {above}"


def test_no_import_cycle() -> None:
    graph = {m: runtime_imports(m) for m in MODULES}
    done: set[str] = set()

    def walk(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(m):], m]))
        if m in done:
            return
        for n in sorted(graph[m]):
            walk(n, [*path, m])
        done.add(m)

    for m in sorted(graph):
        walk(m, [])


def test_the_checker_sees_lazy_imports_and_skips_type_only_ones(tmp_path: Path) -> None:
    # guard against a checker that finds nothing: a function-level import
    # counts, one under TYPE_CHECKING does not
    assert "async_wf.transport.tcp" in runtime_imports("async_wf._api") | runtime_imports(
        "async_wf._launch" if "async_wf._launch" in MODULES else "async_wf._api")
    assert "async_wf._scheduler" not in runtime_imports("async_wf.transport")


def test_only_the_entry_points_import_the_public_api() -> None:
    # the worker process, the transports and the scheduler get their loop
    # from _loop, not from _api: "nothing below _api.py imports it"
    users = {m for m in MODULES if "async_wf._api" in runtime_imports(m)}
    assert "async_wf" in users
    assert users <= {"async_wf", "async_wf._executor", "async_wf.cli"}, sorted(users)
