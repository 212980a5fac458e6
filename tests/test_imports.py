"""No import cycles in lepton_ray.

The graph has an edge A -> B for every ``import`` of lepton_ray module B written anywhere in A's
source, inside functions too (a deferred import still ties the modules together; it only hides the
cycle until the call), except under ``if TYPE_CHECKING:``. ``from pkg import name`` points at the
submodule ``pkg.name`` when there is one, else at ``pkg``. Importing a submodule runs its parent
package's ``__init__`` first; that implicit step is not an edge (a package may re-export its own
submodules).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "lepton_ray"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, skipping the bodies of ``if TYPE_CHECKING:``."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        if isinstance(node, ast.If) and _type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}
    modules = set(files)

    def known(name: str) -> str | None:  # the module itself, else its nearest known parent
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package this module is in
                    anchor = mod.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base)
                    for a in node.names
                ]
            graph[mod].update(t for t in targets if t and t != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of more than one module
    (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(_path_within(sorted(component), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_within(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A closed path from the component's first module back to itself, inside the component."""
    start, members = component[0], set(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not a cycle")


def test_lepton_ray_has_no_import_cycles():
    graph = import_graph()
    assert (
        "lepton_ray.data.writer" in graph
        and "lepton_ray.storage" in graph["lepton_ray.data.writer"]
    )
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_cycle_finder_finds_cycles(tmp_path):
    pkg = tmp_path / "lepton_ray"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("from lepton_ray.data.sources import load\n")
    (pkg / "data" / "sources.py").write_text(
        "def load():\n    from lepton_ray import data  # deferred: still an edge\n"
    )
    (pkg / "data" / "writer.py").write_text("from . import sources\n")
    (pkg / "plain.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lepton_ray import typed\n"
    )
    (pkg / "typed.py").write_text("import lepton_ray.plain\n")
    graph = import_graph(pkg)
    assert graph["lepton_ray.data.writer"] == {"lepton_ray.data.sources"}
    assert graph["lepton_ray.plain"] == set()  # TYPE_CHECKING only
    assert cycles(graph) == [["lepton_ray.data", "lepton_ray.data.sources", "lepton_ray.data"]]
