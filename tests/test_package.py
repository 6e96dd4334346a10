"""The package's shape: every module imports and says what it is for, the chapter's core at the
top and side features in subpackages, no import cycles, each name imported from its home."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import sys
from pathlib import Path

import pytest

import helpers

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "helpers"
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(helpers.__path__, "helpers.")
    if not m.name.endswith(".__main__")
)
SUBPACKAGES = sorted(p.parent.name for p in HELPERS.glob("*/__init__.py"))
MAX_TOP_MODULES = 15  # what notebooks 01-04 teach, plus the few basics they share
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _trees() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(HELPERS.rglob("*.py"))}


def _defined_names(tree: ast.Module) -> set[str]:
    """Names a module defines itself (functions, classes, assignments), not ones it imports."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _helpers_imports(tree: ast.AST) -> list[ast.ImportFrom]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.level == 0
        and (node.module or "").startswith("helpers")
    ]


def _sources() -> list[tuple[str, str]]:
    """(where, Python source) of helpers, tests, benchmarks and every notebook code cell."""
    found = [
        (str(p.relative_to(ROOT)), p.read_text())
        for folder in ("helpers", "tests", "benchmarks")
        for p in sorted((ROOT / folder).rglob("*.py"))
    ]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            if cell["cell_type"] == "code":
                lines = "".join(cell["source"]).splitlines()
                # IPython magics and shell lines are not Python
                code = "\n".join("#" + s if s.lstrip()[:1] in "%!" else s for s in lines)
                found.append((f"{nb.name} cell {i}", code))
    return found


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_and_has_a_docstring(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__ and module.__doc__.strip(), f"{name} has no module docstring"


def test_no_module_shadows_the_standard_library() -> None:
    shadowing = [m for m in MODULES if m.rsplit(".", 1)[-1] in sys.stdlib_module_names]
    assert shadowing == []


def test_the_chapter_core_is_at_the_top_and_the_rest_in_subpackages() -> None:
    top = sorted(p.stem for p in HELPERS.glob("*.py") if p.stem != "__init__")
    assert len(top) <= MAX_TOP_MODULES, top
    assert {"dpo", "lora", "review", "serve", "run", "widgets"} <= set(SUBPACKAGES)


def test_tests_mirror_the_subpackages() -> None:
    missing = [s for s in SUBPACKAGES if not list((ROOT / "tests" / s).glob("test_*.py"))]
    assert missing == [], f"no tests/<subpackage>/ for {missing}"


def test_no_import_cycles() -> None:
    trees = _trees()
    graph: dict[str, set[str]] = {
        m: {i.module or "" for i in _helpers_imports(t)} & trees.keys() for m, t in trees.items()
    }
    # graph's imports may name a package (its __init__); a cycle is a path back to the start
    cycles = []
    for start in graph:
        stack: list[tuple[str, tuple[str, ...]]] = [(start, (start,))]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join((*path, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    assert cycles == []


def test_every_name_is_imported_from_the_module_that_defines_it() -> None:
    defined = {m: _defined_names(t) for m, t in _trees().items()}
    wrong = []
    for where, source in _sources():
        for node in _helpers_imports(ast.parse(source)):
            for alias in node.names:
                module = node.module or ""
                if module not in defined:
                    wrong.append(f"{where}: no module {module}")
                elif alias.name not in defined[module] and f"{module}.{alias.name}" not in defined:
                    wrong.append(f"{where}: {alias.name} is not defined in {module}")
    assert wrong == []


def test_no_module_getattr() -> None:
    offenders = [
        m
        for m, tree in _trees().items()
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body)
    ]
    assert offenders == []


def test_functions_are_short_enough_to_see_whole() -> None:
    long = [
        f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for m, tree in _trees().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
