"""The package's import graph: floors from `cli` down to `types`, no upward arrow, no circle.

Every ``import`` of a ``cv_ray`` module is read from the source with ``ast``, including the ones
inside functions (lazy imports hide circles from the interpreter, not from this test). Two checks:

* **floors**: each top-level module or subpackage of ``cv_ray`` has a floor in :data:`FLOORS`, and an
  import may only go to a strictly lower floor (or stay inside its own subpackage). A new module
  must be given a floor here, which is where a reader learns what may depend on what.
* **no circle** among the modules themselves (module-level graph, subpackages included).

Mutants this catches (each tried by hand): the agent loop importing ``RolloutConfig`` again
(``cv_ray.agent`` -> ``cv_ray.rollout``, an upward arrow), and ``data/records.py`` importing
``data/compat.py`` lazily while ``compat.py`` imports ``records.py`` (a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cv_ray"

#: Bottom to top. Imports go down only. Subpackages hold many modules; top-level modules one.
FLOORS: list[str] = [
    "types", "errors",                     # records that cross actors; the config error
    "geometry", "logprobs", "buckets",     # pure helpers
    "placement",                           # pure placement plans
    "actor_group",                         # the generic Ray actor group
    "sandbox", "reward", "agent",          # code execution; scoring; the multi-turn loop
    "models", "data",                      # model directories and processors; datasets
    "rollout", "learner",                  # engines and rollout actors; DeepSpeed ranks
    "config", "episode_groups", "cluster",  # the config tree; the sandbox/rollout/reward trio; Ray start-up
    "weight_sync",                         # the weight push between the learner and the rollout engines
    "async_rl",                            # the asynchronous loop's bookkeeping (pure)
    "dashboard", "tracking",               # what a run shows
    "eval", "sweep",                       # benchmark runner; sweep summaries
    "driver", "cli",                       # the single controller and its entry point
]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The cv_ray modules ``path`` imports anywhere (``from pkg import sub`` counts as ``pkg.sub``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("cv_ray"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cv_ray"))
    return {name for name in found if name in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _unit(module: str) -> str:
    """The floor unit of a module: its top-level subpackage or module under cv_ray."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cv_ray"


def test_every_unit_has_a_floor_and_imports_only_go_down():
    graph = _graph()
    units = {_unit(m) for m in graph} - {"cv_ray"}
    assert units <= set(FLOORS), f"give these a floor in FLOORS: {sorted(units - set(FLOORS))}"
    floor = {unit: i for i, unit in enumerate(FLOORS)}
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if _unit(a) != "cv_ray" and _unit(b) != _unit(a) and floor[_unit(b)] >= floor[_unit(a)])
    assert not upward, "imports that go up a floor:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    # The check above cannot pass by construction: a two-module circle is found.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
