"""Import cycles among the ``qalign_repro`` modules, read from the source with ``ast`` (nothing is imported).

Usage: ``python scripts/import_cycles.py [src/qalign_repro]``; exit 1 when there is a cycle. ``tests/test_import_graph.py``
runs the same check. Every import counts, at module level and inside functions alike: a function-level import
only delays a cycle to the first call, and it still ties the two modules together (issue 17: calibrate and run
imported each other's functions that way). Imports under ``if TYPE_CHECKING:`` are left out, since they never run.

An edge goes to the imported module, to ``pkg.name`` for ``from pkg import name`` when that is a module, and to
the packages above the imported module that the importer is not inside (``import qalign_repro.lm.hf`` runs
``lm/__init__.py`` first); the root package is left out (every module is under it, and its ``__init__`` only
imports the API lazily on attribute access).
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path

ROOT_PACKAGE = "qalign_repro"
DEFAULT_SOURCE = Path(__file__).resolve().parents[1] / "src" / ROOT_PACKAGE


def module_files(source: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``source`` (the ``qalign_repro`` package folder)."""
    out = {}
    for path in sorted(source.rglob("*.py")):
        parts = list(path.relative_to(source).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([ROOT_PACKAGE, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement of the tree, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve_from(node: ast.ImportFrom, importer: str, is_package: bool) -> str | None:
    if not node.level:
        return node.module
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(source: Path = DEFAULT_SOURCE) -> dict[str, set[str]]:
    """Module -> the ``qalign_repro`` modules it imports (see the module docstring for what counts)."""
    files = module_files(source)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for importer, path in files.items():
        is_package = path.name == "__init__.py"
        own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            module = _resolve_from(node, importer, is_package)
            if module is None:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                targets.add(sub if sub in files else module)
        for target in targets:
            if target not in files:
                continue  # outside the package
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in files and step not in own:
                    graph[importer].add(step)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (each one is at least one cycle),
    sorted; iterative Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return sorted(found)


def shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest import chain from ``start`` back to itself (``[start, ..., start]``), or None."""
    parent: dict[str, str] = {}
    queue = deque(sorted(graph[start]))
    for child in queue:
        parent.setdefault(child, start)
    while queue:
        node = queue.popleft()
        if node == start:
            chain = [start]
            node = parent[start]
            while node != start:
                chain.append(node)
                node = parent[node]
            return [start, *reversed(chain[1:]), start]
        for child in sorted(graph[node]):
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return None


def cycle_report(graph: dict[str, set[str]]) -> list[str]:
    """One line per strongly connected component: its modules and one shortest cycle through the first."""
    lines = []
    for component in strongly_connected(graph):
        cycle = shortest_cycle(graph, component[0]) or []
        short = [m.removeprefix(ROOT_PACKAGE + ".") for m in cycle]
        lines.append(f"{len(component)} modules ({', '.join(m.removeprefix(ROOT_PACKAGE + '.') for m in component)}):"
                     f" e.g. {' -> '.join(short)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    source = Path(args[0]) if args else DEFAULT_SOURCE
    if not (source / "__init__.py").is_file():
        print(f"error: {source} is not a package folder; allowed: the path of src/{ROOT_PACKAGE}", file=sys.stderr)
        return 2
    graph = import_graph(source)
    lines = cycle_report(graph)
    edges = sum(len(v) for v in graph.values())
    print(f"{len(graph)} modules, {edges} import edges, {len(lines)} import cycle(s) (strongly connected components)")
    for line in lines:
        print(f"  {line}")
    return 1 if lines else 0


if __name__ == "__main__":
    raise SystemExit(main())
