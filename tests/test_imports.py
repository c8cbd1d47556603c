"""The import graph of ``src/granet``, read from the source (every import: at the top, inside
functions, under ``TYPE_CHECKING``): the library never imports the experiment layer or the
command line, and no module comes back to itself through the modules it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

SRC = Path(__file__).resolve().parents[1] / "src"


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "granet").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> nx.DiGraph:
    """An edge from each module to each granet module it imports (``from granet import x``
    imports the submodule ``x`` when there is one, else the package)."""
    mods = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            else:
                continue
            for target in targets:
                while target and target not in mods:  # granet.x.Name -> granet.x
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def test_no_module_comes_back_to_itself():
    assert list(nx.simple_cycles(import_graph())) == []


def test_the_library_never_imports_the_experiments_or_the_command_line():
    graph = import_graph()
    upper = ("granet.experiment", "granet.cli", "granet.__main__")
    library = [m for m in graph if not m.startswith(upper)]
    wrong = [(a, b) for a in library for b in graph.successors(a) if b.startswith(upper)]
    assert wrong == []
