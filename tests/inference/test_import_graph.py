"""The worker's runtime imports one way: no module of `inference` imports, however indirectly, one that
imports it back, none imports the tooling or the web app, and the wire protocol sits at the bottom.

Read from the source with `ast`, so every import counts: at module level, inside functions (imported only
when called) and under TYPE_CHECKING alike."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Packages the worker's runtime must never import: the tooling, the web app, the billing domain, the tests.
OUTSIDE = frozenset({"bench", "app", "billing", "tests", "modal_app"})


def package_modules(package: str) -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module `name` imports; `from package import submodule` counts as importing the submodule."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(
                f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in modules
            )
    return targets


def import_graph(package: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(imports between the package's modules, every import of each module)."""
    modules = package_modules(package)
    every = {name: imported(name, path, modules) for name, path in modules.items()}
    return {name: targets & modules.keys() for name, targets in every.items()}, every


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module, and modules importing themselves
    (Tarjan's algorithm)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in order:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_inference_has_no_import_cycle() -> None:
    graph, _ = import_graph("inference")
    assert "inference.worker" in graph["inference.server"]  # the graph is really read
    assert cycles(graph) == []


def test_the_runtime_imports_no_tooling_app_billing_or_tests() -> None:
    _, every = import_graph("inference")
    outside = sorted(
        (name, target)
        for name, targets in every.items()
        for target in targets
        if target.split(".")[0] in OUTSIDE
    )
    assert outside == []


def test_the_wire_protocol_imports_nothing_of_the_worker() -> None:
    graph, _ = import_graph("inference")
    assert graph["inference.protocol"] == set()
    # ...and what it owns, engines take from it.
    assert "inference.protocol" in graph["inference.engines.base"]
