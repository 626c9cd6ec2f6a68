"""Imports between vise_jax's packages, read from the source (nothing is imported).

  python tests/import_graph.py            # every edge 'importer -> imported', then any cycle

A unit is a top-level package or module of vise_jax (`cluster`, `train`, `stages`, ...). Every
import statement counts, also one inside a function: a deferred import still ties two units.
tests/test_import_graph.py holds the rules the graph must keep.
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / 'vise_jax'


def unit_of(module: str) -> str | None:
    """'vise_jax.cluster.kmeans.lloyd' -> 'cluster'; None outside vise_jax."""
    parts = module.split('.')
    return parts[1] if parts[0] == 'vise_jax' and len(parts) > 1 else None


def module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every vise_jax module `path` imports (from-imports of names included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from vise_jax import export` names a unit; `from vise_jax.x import y` a module.
            found.add(node.module)
            found.update(f'{node.module}.{alias.name}' for alias in node.names)
    return {name for name in found if name.startswith('vise_jax.')}


def module_edges() -> dict[str, set[str]]:
    """{importing module: imported vise_jax units}, units named by unit_of."""
    edges = {}
    for path in sorted(LIBRARY.rglob('*.py')):
        units = {unit_of(name) for name in imported_modules(path)}
        edges[module_name(path)] = {u for u in units if u}
    return edges


def unit_edges() -> dict[str, set[str]]:
    """{unit: units it imports}, without self-edges."""
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for module, units in module_edges().items():
        source = unit_of(module) or module
        graph[source].update(units - {source})
    return dict(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one unit (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    graph = unit_edges()
    for unit in sorted(graph):
        print(f'{unit:12s} -> {", ".join(sorted(graph[unit])) or "-"}')
    found = cycles(graph)
    print('cycles:', '; '.join(' <-> '.join(group) for group in found) if found else 'none')
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main())
