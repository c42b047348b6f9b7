"""Every module of syncd declares its public surface in ``__all__``, and the declaration is true.

For each module under ``src/syncd`` (private ones too: their ``__all__`` is what their
package may import): ``__all__`` exists; it is sorted the way ruff's RUF022 sorts it, so
``ruff check --fix`` and this test agree; it has no name twice; every name in it is bound at
import time; each is defined by the module itself or re-exported on purpose (a package's
``__init__`` from its own modules, a public module from a private one); none is a logger or
a type variable; and every public (non-underscore) name the module defines, loggers and
type variables aside, is in it. What a module defines is read from its source: a
top-level ``def``, ``class`` or assignment, including those under a top-level ``if``,
``try`` or ``with``.
"""

from __future__ import annotations

import ast
import importlib
import logging
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import ParamSpec, TypeVar

import pytest

import syncd

MODULES = sorted(
    [syncd.__name__]
    + [info.name for info in pkgutil.walk_packages(syncd.__path__, f"{syncd.__name__}.")]
)


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The module's top-level statements, with the bodies of top-level compound statements
    that are not scopes (``if``, ``try``, ``with``) flattened in."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _statements(node.body)
            yield from _statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _statements(block)
            for handler in node.handlers:
                yield from _statements(handler.body)
        elif isinstance(node, ast.With):
            yield from _statements(node.body)


def _targets(node: ast.expr) -> Iterator[str]:
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, ast.Tuple | ast.List):
        for element in node.elts:
            yield from _targets(element)
    elif isinstance(node, ast.Starred):
        yield from _targets(node.value)


def _bindings(module: ModuleType) -> tuple[set[str], dict[str, str]]:
    """The names ``module`` defines at top level, and those it imports from syncd (each
    with the module it comes from)."""
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text(), module.__file__)
    defined: set[str] = set()
    imported: dict[str, str] = {}
    for node in _statements(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                defined.update(_targets(target))
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            defined.update(_targets(node.target))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module is not None
            and node.module.partition(".")[0] == syncd.__name__
        ):
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module
    return defined, imported


def _ruff_order(name: str) -> tuple[int, list[str | int]]:
    """Ruff's RUF022 ("isort-style") order: CONSTANTS, then Classes, then everything else,
    each group in natural order (``x2`` before ``x10``)."""
    kind = 0 if len(name) > 1 and name.isupper() else 1 if name[:1].isupper() else 2
    natural: list[str | int] = [
        int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)
    ]
    return kind, natural


def _plumbing(value: object) -> bool:
    """A logger or a type variable: a module's own machinery, never its API."""
    return isinstance(value, logging.Logger | TypeVar | ParamSpec)


def test_the_walk_finds_every_module() -> None:
    """The modules checked below are all the source files there are."""
    root = Path(syncd.__file__).parent
    files = {
        ".".join((syncd.__name__, *path.relative_to(root).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for path in root.rglob("*.py")
    }
    assert set(MODULES) == files
    assert "syncd.cli.syncctl" in MODULES and "syncd.store._store" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_complete_and_true(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list | tuple), f"{name} has no __all__ list"
    assert all(isinstance(item, str) for item in exported), f"{name}.__all__ holds a non-str"
    exported = list(exported)
    problems: list[str] = []

    if exported != sorted(exported, key=_ruff_order):
        problems.append("it is not sorted (ruff check --fix --select RUF022 sorts it)")
    if duplicates := sorted({item for item in exported if exported.count(item) > 1}):
        problems.append(f"it names {duplicates} twice")
    if unbound := [item for item in exported if not hasattr(module, item)]:
        problems.append(f"it names {unbound}, which the module does not bind")

    defined, imported = _bindings(module)
    if plumbing := sorted(
        item for item in set(exported) - set(unbound) if _plumbing(getattr(module, item))
    ):
        problems.append(f"it names {plumbing}, a logger or type variable")
    defined = {item for item in defined if not _plumbing(getattr(module, item, None))}
    # A package re-exports its submodules' names; a public module re-exports its private
    # implementation's (``sim.katana`` the world of ``sim._katana_world``).
    is_package = Path(module.__file__ or "").name == "__init__.py"
    reexported = {
        item
        for item, source in imported.items()
        if (is_package and source.startswith(f"{name}."))
        or any(part.startswith("_") for part in source.split("."))
    }
    if foreign := sorted(set(exported) - set(unbound) - set(plumbing) - defined - reexported):
        problems.append(
            f"it names {foreign}, which the module neither defines nor re-exports (from a"
            " private module or, in a package, from its own modules)"
        )
    if missing := sorted({item for item in defined if not item.startswith("_")} - set(exported)):
        problems.append(f"it leaves out {missing}, which the module defines")

    assert not problems, f"{name}.__all__: " + "; ".join(problems)
