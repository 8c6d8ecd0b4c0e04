"""No import circle runs through ``cv_ray/data/`` or ``cv_ray/reward/``, lazy imports included.

The graph is read from the source (``ast``), not from ``sys.modules``: an import inside a function
is an edge too, since hiding a circle in a function only defers the failure to the first call.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. The
implicit import of a module's parent packages is not an edge (every package's ``__init__`` imports
its own modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "cv_ray"
CHECKED = ("cv_ray.data", "cv_ray.reward")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` over every ``.py`` file of ``cv_ray``."""
    files = {_module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def cycles_through(graph: dict[str, set[str]], prefixes: tuple[str, ...]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component of more than one
    module, or a self-loop, that contains a module under ``prefixes``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for component in components:
        members = set(component)
        if (len(component) > 1 or component[0] in graph[component[0]]) and any(
                m.startswith(p) for m in component for p in prefixes):
            found.append(_a_cycle(graph, min(component), members))
    return found


def _a_cycle(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & members)
        back = start in nxt
        if back:
            return path + [start]
        step = next((n for n in nxt if n not in seen), None)
        if step is None:  # cannot happen inside a strongly connected component; keep the partial path
            return path
        path.append(step)
        seen.add(step)


def test_no_import_cycle_through_data_or_reward():
    cycles = cycles_through(import_graph(), CHECKED)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_finds_a_lazy_circle(tmp_path):
    """Mutant: ``compat.py`` imports ``records.py`` again inside a function (the circle this replaced)."""
    package = tmp_path / PACKAGE / "data"
    package.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "records.py").write_text("from cv_ray.data.compat import read_reference_rl\n")
    (package / "compat.py").write_text("def read_reference_rl():\n    from cv_ray.data.records import require\n")
    (package / "files.py").write_text("import json\n")
    assert cycles_through(import_graph(tmp_path), CHECKED) == [["cv_ray.data.compat", "cv_ray.data.records",
                                                                "cv_ray.data.compat"]]


@pytest.mark.parametrize("module", ["cv_ray.data.records", "cv_ray.data.compat", "cv_ray.reward.dense"])
def test_graph_sees_the_real_edges(module):
    graph = import_graph()
    assert {"cv_ray.data.records": "cv_ray.data.files", "cv_ray.data.compat": "cv_ray.data.files",
            "cv_ray.reward.dense": "cv_ray.reward.reference"}[module] in graph[module]
