"""The import graph of the library: no cycles, one direction, no hidden function-local imports.

Read from the source with ``ast`` (nothing is imported). An edge ``A -> B`` is a module-level
import in ``A`` of ``B`` (``from P import name`` counts ``P.name`` when that is a module) and of
``B``'s parent packages that are not already ancestors of ``A`` (importing ``a.b.c`` runs
``a/b/__init__.py`` first). Imports under ``if TYPE_CHECKING:`` are for annotations only and never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import imported_module, module_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lowrank_jax", "pallas_kernels")
FIRST_PARTY = PACKAGES

# Who may not import whom (prefixes): data flows pallas_kernels -> layers/optim -> models -> train -> analysis.
FORBIDDEN = {
    "pallas_kernels": ("lowrank_jax",),
    "lowrank_jax.layers": ("lowrank_jax.models", "lowrank_jax.train", "lowrank_jax.analysis", "lowrank_jax.config"),
    "lowrank_jax.optim": ("lowrank_jax.models", "lowrank_jax.train", "lowrank_jax.analysis", "lowrank_jax.config"),
    "lowrank_jax.noise_step": ("lowrank_jax.train", "lowrank_jax.analysis"),
    "lowrank_jax.config": ("lowrank_jax.models", "lowrank_jax.train", "lowrank_jax.analysis", "lowrank_jax.sharding"),
    "lowrank_jax.data": ("lowrank_jax.models", "lowrank_jax.train", "lowrank_jax.analysis"),
    "lowrank_jax.models": ("lowrank_jax.train", "lowrank_jax.analysis"),
    "lowrank_jax.train": ("lowrank_jax.analysis",),
}


def _modules() -> dict[str, Path]:
    return {module_name(ROOT, p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    target = imported_module(node, module, is_package)
    return [target] + [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed when the module is imported (module body, class bodies, try/if blocks)."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for s in stmts:
            if isinstance(s, ast.Import | ast.ImportFrom):
                out.append(s)
            elif isinstance(s, ast.If):
                if not _is_type_checking(s):
                    visit(s.body)
                visit(s.orelse)
            elif isinstance(s, ast.Try):
                for block in (s.body, s.orelse, s.finalbody, *[h.body for h in s.handlers]):
                    visit(block)
            elif isinstance(s, ast.ClassDef | ast.With):
                visit(s.body)

    visit(tree.body)
    return out


def _function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            out += [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        ancestors = {".".join(mod.split(".")[:i]) for i in range(1, len(mod.split(".")) + 1)}
        for node in _module_level_imports(ast.parse(path.read_text())):
            for target in _imported(node, mod, is_package, known):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in known and dep not in ancestors and dep != mod:
                        graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_graph_is_read():
    graph = _graph()
    assert len(graph) > 40
    assert "lowrank_jax.config" in graph["lowrank_jax.train.step"]
    assert "lowrank_jax.data.corpus" in graph["lowrank_jax.data.packing"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_flow_one_way(layer):
    bad = [
        f"{mod} -> {dep}"
        for mod, deps in _graph().items()
        if mod == layer or mod.startswith(layer + ".")
        for dep in deps
        if any(dep == f or dep.startswith(f + ".") for f in FORBIDDEN[layer])
    ]
    assert bad == []


def test_no_function_local_first_party_imports_without_a_reason():
    """A first-party import inside a function must say why on its line (``# lazy: <reason>``)."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + sorted((ROOT / "experiments").glob("*.py"))
    script_names = {p.stem for p in (ROOT / "experiments").glob("*.py")}
    bad = []
    for path in files:
        source = path.read_text()
        lines = source.splitlines()
        for node in _function_imports(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            first_party = getattr(node, "level", 0) > 0 or any(
                n.split(".")[0] in (*FIRST_PARTY, *script_names) for n in names
            )
            if first_party and "# lazy:" not in lines[node.lineno - 1]:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert bad == []
