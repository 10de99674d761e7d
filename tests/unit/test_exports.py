"""The public surface: what ``async_wf`` exports, once each, documented."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import async_wf

# runs in the first pass only (core_independent): the public names and their docstrings; no task
# runs
pytestmark = pytest.mark.core_independent

PUBLIC = sorted(async_wf.__all__)


def test_all_has_no_duplicates() -> None:
    assert len(async_wf.__all__) == len(set(async_wf.__all__))


@pytest.mark.parametrize("name", PUBLIC)
def test_every_name_in_all_exists(name: str) -> None:
    assert hasattr(async_wf, name), name


def test_each_name_is_exported_once() -> None:
    # no name is bound twice in __init__.py (e.g. imported and then redefined)
    tree = ast.parse(Path(async_wf.__file__).read_text())
    bound: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            bound += [a.asname or a.name for a in node.names]
        elif isinstance(node, ast.Assign):
            bound += [t.id for t in node.targets if isinstance(t, ast.Name)]
    public_bound = [b for b in bound if b in async_wf.__all__]
    assert sorted(public_bound) == PUBLIC


def test_every_public_object_is_exported_from_the_package() -> None:
    # the public objects live in private modules; none is reachable only there
    for name in PUBLIC:
        obj = getattr(async_wf, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            # exceptions name the package, where users import them from
            assert obj.__module__ == "async_wf", (name, obj.__module__)
        elif inspect.isclass(obj) or inspect.isfunction(obj):
            module = obj.__module__
            assert module.startswith("async_wf."), (name, module)
            assert module.rsplit(".", 1)[-1].startswith("_") or module == "async_wf.core", name


def _public_members(obj: type) -> list[tuple[str, object]]:
    out = []
    for attr, value in vars(obj).items():
        if attr.startswith("_") and attr not in ("__call__",):
            continue
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        if isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value):
            out.append((attr, value))
    return out


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_function_class_and_method_has_a_docstring(name: str) -> None:
    obj = getattr(async_wf, name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return  # constants such as __version__ and CORE_IMPL
    assert inspect.getdoc(obj), f"{name} has no docstring"
    if inspect.isclass(obj):
        for attr, member in _public_members(obj):
            assert member.__doc__, f"{name}.{attr} has no docstring"


def test_version_and_core_impl() -> None:
    assert async_wf.__version__.count(".") == 2
    assert async_wf.CORE_IMPL in ("cython", "python")


def test_package_docstring() -> None:
    assert async_wf.__doc__
    assert "submit" in async_wf.__doc__
