"""The import graph matches docs/architecture.md: layers run one way.

A small check over the source (``ast``), no imports run: every ``import`` in the product
packages, with whether it runs when the module is imported (module level, outside
``if TYPE_CHECKING``) or later (inside a function).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("retort", "gateway", "adapters", "distill", "loadtest")

# What each package may import (besides itself), anywhere in its code.
MAY_IMPORT: dict[str, set[str]] = {
    "retort": set(),
    "adapters": {"retort"},
    "gateway": {"retort", "adapters"},
    "distill": {"retort", "adapters", "gateway"},  # gateway: only GATEWAY_FOR_LIBRARIES
    "loadtest": {"retort", "gateway", "adapters"},  # the systems it measures, never at import
}
# The part of the gateway the libraries may use: the engines that serve a student (distill
# evaluates with them) and the student registry (distill publishes into it). These modules
# import nothing else from the gateway, so using them never pulls in the server.
GATEWAY_FOR_LIBRARIES = {"gateway.engines", "gateway.engines.base", "gateway.engines.onnx",
                         "gateway.engines.onnx_batch", "gateway.engines.guide",
                         "gateway.students"}  # fmt: skip
# What loadtest may import when it is imported (its tools import the rest when they run).
LOADTEST_AT_IMPORT = {"retort"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (or module.name for ``from m import name``)
    names: tuple[str, ...]
    line: int
    at_import: bool  # runs when the source module is imported


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[Import]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, alias.name, (), child.lineno, at_import))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = tuple(a.name for a in child.names)
                found.append(Import(module, base, names, child.lineno, at_import))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), at_import)
            else:
                visit(child, at_import)

    visit(tree, True)
    return found


def _all_imports() -> list[Import]:
    out: list[Import] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out.extend(_imports(path))
    return out


IMPORTS = _all_imports()


def _ours(imp: Import) -> str | None:
    top = imp.target.split(".")[0]
    return top if top in (*PACKAGES, "tests") else None


def _where(imp: Import) -> str:
    return f"{imp.source}:{imp.line} imports {imp.target}"


def test_the_graph_was_read() -> None:
    sources = {imp.source.split(".")[0] for imp in IMPORTS}
    assert sources == set(PACKAGES)
    assert any(imp.target == "retort.db.schema" for imp in IMPORTS)


@pytest.mark.parametrize("package", PACKAGES)
def test_layers_run_one_way(package: str) -> None:
    bad = [
        _where(imp)
        for imp in IMPORTS
        if imp.source.split(".")[0] == package
        and (target := _ours(imp)) is not None
        and target != package
        and target not in MAY_IMPORT[package]
    ]
    assert not bad, "\n".join(bad)


def test_no_product_module_imports_tests() -> None:
    bad = [_where(imp) for imp in IMPORTS if _ours(imp) == "tests"]
    assert not bad, "\n".join(bad)


def _gateway_module(imp: Import) -> str:
    """The gateway module an import names (``from gateway.engines import onnx`` included)."""
    if imp.target == "gateway.engines" and imp.names:
        return f"gateway.engines.{imp.names[0]}"
    return imp.target


def test_libraries_use_only_the_gateways_library_part() -> None:
    bad = [
        _where(imp)
        for imp in IMPORTS
        if imp.source.split(".")[0] == "distill"
        and _ours(imp) == "gateway"
        and _gateway_module(imp) not in GATEWAY_FOR_LIBRARIES
    ]
    assert not bad, "\n".join(bad)


def test_the_gateways_library_part_stands_alone() -> None:
    bad = [
        _where(imp)
        for imp in IMPORTS
        if imp.source in GATEWAY_FOR_LIBRARIES
        and _ours(imp) == "gateway"
        and _gateway_module(imp) not in GATEWAY_FOR_LIBRARIES
    ]
    assert not bad, "\n".join(bad)


def test_loadtest_imports_no_other_package_when_imported() -> None:
    bad = [
        _where(imp)
        for imp in IMPORTS
        if imp.source.split(".")[0] == "loadtest"
        and imp.at_import
        and (target := _ours(imp)) not in (None, "loadtest")
        and target not in LOADTEST_AT_IMPORT
    ]
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_across_modules() -> None:
    bad = [
        f"{_where(imp)}.{name}"
        for imp in IMPORTS
        if _ours(imp) is not None and imp.target != imp.source
        for name in imp.names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not bad, "\n".join(bad)


def test_no_module_imports_a_test_module() -> None:
    """Shared test code lives in helpers (``tests/services.py``, ``waits.py``, ``tiny.py``,
    ``conftest.py`` fixtures, ``loadtest.servers``), never in a ``test_*.py`` others import."""
    bad = [
        _where(imp)
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for imp in _imports(path)
        if imp.target.split(".")[0] == "tests"
        and any(part.startswith("test_") for part in imp.target.split("."))
    ]
    assert not bad, "\n".join(bad)
