"""The module import graph of the ``controller`` package.

Every module is parsed with :mod:`ast` (nothing is imported); its imports are collected
wherever they are (module level, inside functions and methods), relative imports resolved.
Imports under ``if TYPE_CHECKING:`` never run, so they are no edges of the graph.

Rules:

- no cycle among the ``controller`` modules;
- only ``controller.runtime`` (the OPC UA side, the event loop) imports ``asyncua`` or
  ``asyncio``; every other module is synchronous and free of OPC UA. This rule counts every
  import, type-only ones too.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "controller"
RUNTIME = "controller.runtime"
ASYNC_ONLY_IN_RUNTIME = ("asyncua", "asyncio")


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's ``__init__``); symlinked folders (the shipped
    ``controller/configs``) are not followed."""
    found: dict[str, tuple[Path, bool]] = {}
    for folder, _dirs, files in os.walk(root / package):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = Path(folder) / file
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            found[".".join(parts)] = (path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, type_checking: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every ``import`` / ``from ... import`` below ``node`` (at any depth), with whether it
    sits under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, type_checking
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), True)
            for stmt in child.orelse:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), type_checking)
        else:
            yield from _imports(child, type_checking)


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """Absolute dotted names ``module`` imports (for ``from a import b``: ``a`` and ``a.b``),
    each with whether it is a type-checking-only import."""
    names: list[tuple[str, bool]] = []
    for node, type_only in _imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [(alias.name, type_only) for alias in node.names]
            continue
        assert isinstance(node, ast.ImportFrom)
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            assert base, f"{module}: relative import beyond the top-level package"
            origin = ".".join([*base, *([node.module] if node.module else [])])
        else:
            origin = node.module or ""
        names.append((origin, type_only))
        names += [(f"{origin}.{alias.name}", type_only) for alias in node.names]
    return names


def _resolve(name: str, known: dict[str, tuple[Path, bool]]) -> str | None:
    """The module of ``known`` a dotted name is (or is in), None when outside."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges among the package's modules, every top-level package each module imports)."""
    known = modules()
    edges: dict[str, set[str]] = {}
    externals: dict[str, set[str]] = {}
    for module, (path, is_package) in known.items():
        edges[module], externals[module] = set(), set()
        for name, type_only in imported_names(path.read_text(), module, is_package):
            externals[module].add(name.split(".")[0])
            target = _resolve(name, known)
            if target is not None and target != module and not type_only:
                edges[module].add(target)
    return edges, externals


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


# -- the walker itself -----------------------------------------------------------------------
def test_walker_sees_function_level_relative_and_type_only_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..other import thing\n"
        "if TYPE_CHECKING:\n"
        "    from controller.typed import T\n"
        "else:\n"
        "    import controller.untyped\n"
        "def f():\n"
        "    import asyncio\n"
        "class C:\n"
        "    def m(self):\n"
        "        from controller.late import g\n"
    )
    names = dict(imported_names(source, "controller.runtime.mod", is_package=False))
    assert names["controller.runtime.sibling"] is False
    assert names["controller.other.thing"] is False
    assert names["controller.typed.T"] is True
    assert names["controller.untyped"] is False
    assert names["asyncio"] is False and names["controller.late.g"] is False
    init = dict(imported_names("from .site import x\n", "controller.runtime", is_package=True))
    assert "controller.runtime.site" in init
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_holds_the_function_level_imports() -> None:
    edges, _ = import_graph()
    assert "controller.runtime.service" in edges["controller.cli"]  # inside a function
    assert "controller.runtime.printing" in edges["controller.runtime.loop"]  # idem


# -- the rules ---------------------------------------------------------------------------------
def test_controller_import_graph_is_acyclic() -> None:
    edges, _ = import_graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("library", ASYNC_ONLY_IN_RUNTIME)
def test_only_the_runtime_imports_asyncua_and_asyncio(library: str) -> None:
    _, externals = import_graph()
    outside = sorted(
        module
        for module, names in externals.items()
        if library in names and not (module == RUNTIME or module.startswith(f"{RUNTIME}."))
    )
    assert outside == [], f"{library} imported outside {RUNTIME}: {outside}"


# -- the layers (docs/architecture.md) ---------------------------------------------------------
#: controller's layers, lowest first: a module imports only from its own layer or lower ones.
LAYERS = (
    "controller.numerics",
    "controller.records",
    "controller.training",
    "controller.laws",
    "controller.runtime",
    "controller.cli",
)
#: modules outside the layers that every layer may use; they import no controller module.
LEAVES = ("controller", "controller.config_files")


def layer_of(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(f"{layer}."):
            return i
    return None


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every edge against the layer order, and modules in no layer."""
    bad = []
    for module, targets in sorted(edges.items()):
        own = layer_of(module)
        if own is None and module not in LEAVES:
            bad.append(f"{module} is in no layer")
            continue
        for target in sorted(targets):
            if target in LEAVES:
                continue
            theirs = layer_of(target)
            if own is None or theirs is None or theirs > own:
                bad.append(f"{module} -> {target}")
    return bad


def test_layer_rule_catches_an_upward_import() -> None:
    edges = {
        "controller.numerics.mpc": {"controller.records.historian"},  # upward
        "controller.runtime.loop": {"controller.numerics.mpc", "controller.config_files"},
        "controller.config_files": set(),
        "controller.stray": set(),
    }
    assert layer_violations(edges) == [
        "controller.numerics.mpc -> controller.records.historian",
        "controller.stray is in no layer",
    ]


def test_controller_layers_import_only_downwards() -> None:
    edges, _ = import_graph()
    assert {m for m in edges if layer_of(m) is not None} >= {
        "controller.numerics.mpc",
        "controller.records.historian",
        "controller.training.fitting",
        "controller.laws.control",
        "controller.runtime.loop",
    }
    assert layer_violations(edges) == []


def _top_level_imports(package: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, (path, is_package) in modules(ROOT, package).items():
        names = imported_names(path.read_text(), module, is_package)
        out[module] = {name.split(".")[0] for name, _type_only in names}
    return out


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("plant_models", ("controller", "sim", "asyncua", "asyncio")),
        ("controller", ("sim",)),
    ],
)
def test_packages_import_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    """plant_models <- controller <- sim; plant_models is pure numerics (no event loop)."""
    imports = _top_level_imports(package)
    assert len(imports) > 5
    bad = sorted(
        f"{m} imports {f}" for m, names in imports.items() for f in forbidden if f in names
    )
    assert bad == []
