"""The package structure: no import cycles between geartask's units.

A unit is a sub-package (geartask/admin, geartask/worker, ...) or a
top-level module (geartask/config.py, ...). Every import counts, also the
ones inside functions; only imports under ``if TYPE_CHECKING:`` are exempt,
because they never run.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "geartask"


def _unit_of_module(module: str) -> str | None:
    """'geartask.worker.grab' -> 'worker'; 'geartask.config' -> 'config'."""
    parts = module.split(".")
    if parts[0] != "geartask":
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, skipping `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The absolute module names an import node loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        if node.module:
            base += node.module.split(".")
    else:
        base = node.module.split(".") if node.module else []
    base_name = ".".join(base)
    # `from .. import gearman` loads the sub-module geartask.gearman; `from .. import
    # __version__` loads a name of geartask/__init__.py
    out = []
    for alias in node.names:
        sub = PACKAGE.parent.joinpath(*base, alias.name)
        if sub.is_dir() or sub.with_suffix(".py").exists():
            out.append(f"{base_name}.{alias.name}")
        else:
            out.append(base_name)
    return out


WHERE: dict[tuple[str, str], str] = {}  # (unit, unit) -> the first file:line importing it


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "templates" in path.relative_to(PACKAGE).parts:
            continue  # scaffolding copied into user projects, not geartask code
        source = _unit_of_module(_module_name(path))
        graph.setdefault(source, set())
        for node in _imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(path, node):
                unit = _unit_of_module(target)
                if unit is None or unit == source:
                    continue
                # `from geartask.worker import x` names either a module or a
                # name in worker/__init__; both load the unit, count it once
                if (PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").exists():
                    graph[source].add(unit)
                    WHERE.setdefault((source, unit), f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one unit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component."""
    members = set(component)
    start = component[0]
    # breadth-first from start back to start, staying inside the component
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component


def test_the_unit_graph_sees_known_imports():
    """The parser is not blind: edges that must exist are found."""
    graph = unit_graph()
    assert "gearman" in graph["worker"]
    assert "config" in graph["main"] or "cli" in graph["main"]
    assert len(graph) > 20


def test_no_import_cycles_between_units():
    graph = unit_graph()
    knots = strongly_connected(graph)
    def shown(cycle: list[str]) -> str:
        return " -> ".join(f"{a} ({WHERE[(a, b)]})" for a, b in zip(cycle, cycle[1:], strict=False)) + f" -> {cycle[-1]}"

    message = "; ".join(shown(a_cycle(graph, k)) + f" [a knot of {len(k)}: {', '.join(k)}]" for k in knots)
    assert not knots, f"import cycle between geartask units: {message}"


def test_importing_the_collector_does_not_load_the_worker():
    out = subprocess.run(
        [sys.executable, "-c",
         "import geartask.outcomes.collector, sys; "
         "print(any(m.startswith('geartask.worker') for m in sys.modules))"],
        capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_the_collector_loads_no_role():
    """The collector runs inside the dashboard and alone (`outcomes serve`): it needs the fleet
    library and the outcomes store, not the worker, sender, scheduler, manager or dashboard."""
    out = subprocess.run(
        [sys.executable, "-c",
         "import geartask.outcomes.collector, sys; "
         "print(' '.join(sorted({m.split('.')[1] for m in sys.modules if m.startswith('geartask.')})))"],
        capture_output=True, text=True, timeout=60, check=True)
    loaded = set(out.stdout.split())
    assert "fleet" in loaded and "outcomes" in loaded
    assert not loaded & {"worker", "sender", "scheduler", "admin", "dashboard", "shell", "plugins"}, loaded
