"""The project's own modules import each other in one direction: no import cycle.

The graph is read from the source with `ast` (nothing is imported, so no torch): every
import counts, at the top of a file, inside a function or under `if TYPE_CHECKING`, and
relative imports (`from . import x`, `from ..y import z`) resolve against the importing
module. `from package import name` points at the submodule `package.name` where there is
one, else at the package.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PACKAGES = ("service", "worker", "ddim_inversion", "ddim_inversion_client", "ddim_inversion_cli")
"""The project's own top-level packages: their modules are the graph's nodes."""


def project_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every module of PACKAGES under `root`."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, relative levels resolved."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` is, or the one that defines it (the longest prefix)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file."""
    modules = project_modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _base(name, is_package, node)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                owner = _owner(target, modules)
                if owner is not None and owner != name:
                    graph[name].add(owner)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {target: [start, target] for target in sorted(graph[start] & group)}
    frontier = list(paths)
    while start not in paths:
        next_frontier = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    next_frontier.append(target)
        frontier = next_frontier
    return paths[start]


def describe(cycles: list[list[str]]) -> str:
    return "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_project_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph(REPO))
    assert not cycles, f"import cycles: {describe(cycles)}"


def test_the_graph_sees_every_kind_of_import() -> None:
    """Guards the walk itself: a graph missing these edges would pass for the wrong reason."""
    graph = import_graph(REPO)
    assert {"worker.engine.dispatch", "worker.engine.null_text", "service.app"} <= set(graph)
    # Top-level imports.
    assert "worker.engine.null_text" in graph["worker.engine.dispatch"]
    assert "worker.engine.ddim" in graph["worker.engine.null_text"]
    # An import inside a function (the CLI imports the engine only when it runs it).
    assert "worker.engine.dispatch" in graph["ddim_inversion_cli.main"]
    # `from package import module` names the submodule, not the package.
    assert "worker.rq_adapter" in graph["worker.main"]


def test_a_cycle_hidden_in_functions_and_relative_imports_is_named(tmp_path: Path) -> None:
    package = tmp_path / "worker"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (package / "b.py").write_text("from .sub.c import g\n")
    (package / "sub" / "c.py").write_text("def g():\n    from ..a import f\n    return f\n")
    (package / "d.py").write_text("from worker import a\n")
    cycles = find_cycles(import_graph(tmp_path))
    assert cycles == [["worker.a", "worker.b", "worker.sub.c", "worker.a"]]


def test_reintroducing_the_engine_cycle_fails(tmp_path: Path) -> None:
    """The engine's old cycle, ddim importing null_text inside a function, is caught."""
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    ddim = tmp_path / "worker" / "engine" / "ddim.py"
    ddim.write_text(
        ddim.read_text() + "\n\ndef _null_text():\n"
        "    from worker.engine.null_text import null_text_batch\n\n"
        "    return null_text_batch\n"
    )
    cycles = find_cycles(import_graph(tmp_path))
    assert cycles, "the reintroduced cycle was not found"
    assert any({"worker.engine.ddim", "worker.engine.null_text"} <= set(c) for c in cycles), (
        describe(cycles)
    )
