"""The packages' layering, read from the source: memstore's modules import each other without a
cycle, memstore never imports the torch side, and the layer library never imports the GPT-2 side.

Imports are found with ``ast`` anywhere in a module: at module level, inside functions (lazy
imports) and under ``if TYPE_CHECKING:`` (a type-only cycle is still a cycle between modules), plus
``importlib.import_module("literal")`` calls. ``import a.b.c`` / ``from a.b import c`` count as an
edge to ``a.b.c`` alone: Python initialises the parent packages first, but a package that imports
its own submodules is not a cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Source folders and the dotted name each is installed as (migrations/ ships as memstore.migrations).
MEMSTORE = {"memstore": ROOT / "memstore", "memstore.migrations": ROOT / "migrations"}
MEMSTORE_TORCH = {"memstore_torch": ROOT / "memstore_torch"}


def modules(packages: dict[str, Path]) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under each package folder."""
    out = {}
    for name, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_names(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``module`` imports anywhere in its source (absolute dotted names)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: modules of the same packages it imports}``."""
    files = modules(packages)
    known = set(files)
    return {
        module: {name for name in imported_names(module, path, known) if name in known}
        for module, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, str] = {}  # "active" while on the DFS stack, "done" afterwards
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "active"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "active":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_memstore_modules_import_each_other_without_a_cycle():
    graph = import_graph(MEMSTORE)
    assert {"memstore.collection", "memstore.store", "memstore.migrations.env"} <= set(graph)
    assert "memstore.collection" in graph["memstore.store"]  # the graph sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layer_library_modules_import_each_other_without_a_cycle():
    graph = import_graph(MEMSTORE_TORCH)
    assert "memstore_torch.rows_source" in graph["memstore_torch.resident"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_sees_lazy_and_type_only_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg import a\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import C\n"
    )
    (pkg / "c.py").write_text("import importlib\nimportlib.import_module('pkg.a')\n")
    graph = import_graph({"pkg": pkg})
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import importlib\n")
    assert find_cycle(import_graph({"pkg": pkg})) is None


def _top_level_imports(packages: dict[str, Path]) -> dict[str, set[str]]:
    files = modules(packages)
    return {
        module: {name.split(".")[0] for name in imported_names(module, path, set(files))}
        for module, path in files.items()
    }


@pytest.mark.parametrize(
    "packages, forbidden",
    [
        (MEMSTORE, {"torch", "memstore_torch", "memstore_gpt2", "transformers", "tokenizers"}),
        (MEMSTORE_TORCH, {"memstore_gpt2", "transformers", "tokenizers"}),
    ],
    ids=["memstore", "memstore_torch"],
)
def test_lower_layers_never_import_higher_ones(packages, forbidden):
    imports = _top_level_imports(packages)
    assert imports, "no modules found"
    offenders = {module: sorted(names & forbidden) for module, names in imports.items()}
    assert not {m: names for m, names in offenders.items() if names}
