"""Find import cycles between the modules of a package, function-level imports included.

A cycle hidden by a function-level import still ties the modules together: neither can be
understood, tested or moved without the other. This checker reads every module with
:mod:`ast` (nothing is imported), records each ``import`` / ``from ... import`` wherever it
appears (module level, inside functions, inside ``try``), and reports each strongly connected
group of modules with the shortest cycles that run through it, as module chains.

Imports under ``if TYPE_CHECKING:`` are left out (they never run); ``--type-checking`` counts
them too. Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first; those implicit
edges are left out, the explicit imports an ``__init__`` makes are counted.

Usage::

    python tools/import_cycles.py [ROOT] [--package streamvec] [--max N] [--edges]
        [--type-checking]

Exit code 0 when there is no cycle, 1 when there is one (for CI), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import sys
from collections import deque
from pathlib import Path


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` under ``root``: dotted name -> file.

    Args:
        root: the repository root (the folder holding the package).
        package: the top-level package name.

    Returns:
        ``{"pkg.sub.mod": path}``; a package's ``__init__.py`` is named by the package.
    """
    modules: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, type_checking: bool) -> list[tuple[ast.Import | ast.ImportFrom, int]]:
    found: list[tuple[ast.Import | ast.ImportFrom, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append((node, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(
    root: Path, package: str, type_checking: bool = False
) -> dict[str, dict[str, int]]:
    """The imports between the package's own modules.

    Args:
        root: the repository root.
        package: the top-level package name.
        type_checking: count imports under ``if TYPE_CHECKING:`` too.

    Returns:
        ``{importer: {imported: first line number}}`` over the package's modules only.
    """
    modules = module_names(root, package)
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, line in _imports(tree, type_checking):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    # Relative: resolve against this module's package.
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    parent = ".".join(base + ([node.module] if node.module else []))
                else:
                    parent = node.module or ""
                for alias in node.names:
                    sub = f"{parent}.{alias.name}"
                    targets.append(sub if sub in modules else parent)
            for target in targets:
                # `import a.b.c` names a.b.c; keep the longest part that is one of ours.
                parts = target.split(".")
                while parts and ".".join(parts) not in modules:
                    parts.pop()
                if parts:
                    imported = ".".join(parts)
                    if imported != name:
                        graph[name].setdefault(imported, line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, sorted.

    Args:
        graph: the import graph.

    Returns:
        Each component as a sorted list of module names.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def connect(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def shortest_cycles(graph: dict[str, dict[str, int]], component: list[str]) -> list[list[str]]:
    """For each import edge inside a component, the shortest cycle through it (deduplicated).

    Args:
        graph: the import graph.
        component: one strongly connected component.

    Returns:
        Cycles as chains ``[a, b, ..., a]``, shortest first.
    """
    members = set(component)
    cycles: dict[tuple[str, ...], list[str]] = {}
    for start in component:
        for first in graph[start]:
            if first not in members:
                continue
            # Breadth-first from `first` back to `start`, inside the component.
            previous: dict[str, str | None] = {first: None}
            queue = deque([first])
            while queue:
                node = queue.popleft()
                if node == start:
                    break
                for nxt in graph[node]:
                    if nxt in members and nxt not in previous:
                        previous[nxt] = node
                        queue.append(nxt)
            if start not in previous:
                continue
            path: list[str] = []
            node_or_none: str | None = start
            while node_or_none is not None:
                path.append(node_or_none)
                node_or_none = previous[node_or_none]
            chain = [start, *reversed(path)]
            # One key per rotation of the same cycle.
            ring = chain[:-1]
            pivot = ring.index(min(ring))
            key = tuple(ring[pivot:] + ring[:pivot])
            cycles.setdefault(key, [*key, key[0]])
    return sorted(cycles.values(), key=lambda c: (len(c), c))


def main(argv: list[str] | None = None) -> int:
    """Print the import cycles of a package; exit 1 when there is any.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=".", help="repository root (default: .)")
    parser.add_argument("--package", default="streamvec", help="top-level package")
    parser.add_argument("--max", type=int, default=8, help="cycles shown per group")
    parser.add_argument("--edges", action="store_true", help="also print every import edge")
    parser.add_argument(
        "--type-checking", action="store_true", help="count `if TYPE_CHECKING:` imports too"
    )
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not (root / args.package).is_dir():
        print(f"error: no package folder {root / args.package}", file=sys.stderr)
        return 2
    graph = import_graph(root, args.package, args.type_checking)
    if args.edges:
        for importer in sorted(graph):
            for imported, line in sorted(graph[importer].items()):
                print(f"{importer}:{line} -> {imported}")
    components = strongly_connected(graph)
    for number, component in enumerate(components, 1):
        print(f"cycle group {number} ({len(component)} modules): {', '.join(component)}")
        cycles = shortest_cycles(graph, component)
        for chain in cycles[: args.max]:
            hops = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(chain))
            print(f"  {hops} -> {chain[-1]}")
        if len(cycles) > args.max:
            print(f"  ... and {len(cycles) - args.max} longer cycles (--max to see them)")
    print(f"{len(components)} cycle group(s) among {len(graph)} modules")
    return 1 if components else 0


if __name__ == "__main__":
    sys.exit(main())
