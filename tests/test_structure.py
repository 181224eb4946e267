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


# -- no module reads another module's private names ------------------------------------------

# Reads of a leading-underscore name that are justified, as (module, expression) -> why.
PRIVATE_READS_ALLOWED = {
    # a forked child ends without the parent's atexit handlers and buffered output
    ("geartask.worker.isolate", "os._exit"): "the standard library's way to end a forked child",
    ("geartask.worker.cli", "os._exit"): "the standard library's way to end at once after a fatal error",
    ("geartask.admin.outcomes_cli", "os._exit"): "the standard library's way to end at once",
    # namedtuple's public API is spelled with an underscore (urllib's SplitResult)
    ("geartask.server", "parts._replace"): "namedtuple's public _replace",
    # argparse has no public way to walk a parser's actions (to make the shared options SUPPRESS)
    ("geartask.admin.cli", "common._actions"): "argparse offers no public accessor",
    # structlog caches loggers built before setup; it has no setter for their wrapper class
    ("geartask.logs", "proxy._wrapper_class"): "structlog offers no public setter",
}


def _own_private_names(tree: ast.AST) -> set[str]:
    """Leading-underscore names this module defines: functions, classes, names it assigns
    and attributes it stores (``self._x = ...``, class attributes)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_")}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reads(source: str, module: str) -> list[str]:
    """``module``'s reads of private names it does not define itself: ``x._name`` where x is
    not self, cls or super(), and ``from <geartask module> import _name``."""
    tree = ast.parse(source)
    own = _own_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("geartask")):
            found += [f"{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}"
                      for a in node.names if _is_private(a.name)]
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr) or node.attr in own:
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
            continue
        if (module, ast.unparse(node)) in PRIVATE_READS_ALLOWED:
            continue
        found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_private_read_check_sees_what_it_must():
    """The checker is not blind: another object's private field and another module's private
    name are found; the module's own private names, self's and super()'s are not."""
    source = ("from .job import _packets, Job\n"
              "class _Mine:\n"
              "    def f(self, job, other):\n"
              "        self._a = job._conn\n"
              "        return self._a, super()._b, other._a, _Mine, logs._state\n")
    assert private_reads(source, "geartask.worker.x") == [
        "1: from .job import _packets", "4: job._conn", "5: logs._state"]


def test_no_module_reads_another_modules_private_names():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += [f"{path.relative_to(PACKAGE.parent)}:{hit}"
                  for hit in private_reads(path.read_text(encoding="utf-8"), _module_name(path))]
    assert not found, ("private names read from outside their module (give them a public name, "
                       "or allow them in PRIVATE_READS_ALLOWED with the reason): " + "; ".join(found))


def test_every_allowed_private_read_is_still_there():
    """An allowance whose read is gone is removed, so the list says only what is true."""
    for module, expression in PRIVATE_READS_ALLOWED:
        path = PACKAGE.parent.joinpath(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        assert expression in path.read_text(encoding="utf-8"), (module, expression)
