"""The library's source layout, read with ``ast`` (nothing is imported): private names stay in their module, private
modules in their package, and every function of lowrank_jax/optim stays short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import imported_module, module_name

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("lowrank_jax", "pallas_kernels")
MAX_FUNCTION_LINES = 100


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module_outside(target: str, importer: str) -> str | None:
    """The first private component of ``target`` whose package does not contain ``importer``, if any."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            package = ".".join(parts[:i])
            if importer != package and not importer.startswith(package + "."):
                return ".".join(parts[: i + 1])
            return None
    return None


def private_uses(root: Path, packages: tuple[str, ...] = FIRST_PARTY) -> list[str]:
    """Every use of a first-party private name outside the module (or package) that defines it.

    ``from m import _name``, ``m._name`` on a name bound to a first-party module, and an import of a private module
    (``pkg._mod``) from outside ``pkg``.
    """
    files = {module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    found = []
    for module, path in files.items():
        where = f"{path.relative_to(root)}"
        found += [f"{where}:{line} {what}" for line, what in _private_uses_in(module, path, files, packages)]
    return found


def _private_uses_in(module: str, path: Path, files: dict, packages: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(line, what)`` of each private use in one module (see :func:`private_uses`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    module_aliases: set[str] = set()

    def private_module(target: str, node: ast.stmt) -> None:
        if (outside := _private_module_outside(target, module)) is not None:
            found.append((node.lineno, f"imports the private module {outside}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in packages:
                    private_module(alias.name, node)
                    module_aliases.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            target = imported_module(node, module, path.name == "__init__.py")
            if target.split(".")[0] not in packages:
                continue
            private_module(target, node)
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in files:  # a module
                    private_module(full, node)
                    module_aliases.add(alias.asname or alias.name)
                elif _is_private(alias.name):
                    found.append((node.lineno, f"imports {full}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr):
            if node.value.id in module_aliases:
                found.append((node.lineno, f"uses {node.value.id}.{node.attr}"))
    return found


def long_functions(root: Path, limit: int) -> list[str]:
    """Functions (methods and nested functions included) longer than ``limit`` lines under ``root``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} has {lines} lines")
    return out


def test_no_private_name_leaves_its_module() -> None:
    found = private_uses(ROOT)
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_the_check_finds_every_kind_of_private_use(tmp_path: Path) -> None:
    """A positive control on a tiny package: each rule fires, and what is allowed passes."""
    pkg = tmp_path / "lowrank_jax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "_helpers.py").write_text("def shared(): ...\n")
    (pkg / "sub" / "core.py").write_text("def _plan(): ...\ndef plan(): ...\n_Plan = object\n")
    (pkg / "sub" / "user.py").write_text(
        "from lowrank_jax.sub._helpers import shared\n"  # allowed: a private module inside its own package
        "from lowrank_jax.sub.core import plan\n"  # allowed: a public name
        "from lowrank_jax.sub.core import _plan\n"  # 1
        "from .core import _Plan\n"  # 2: relative imports count
        "from lowrank_jax.sub import core\n"
        "core._plan()\n"  # 3
        "import lowrank_jax.sub.core as c\n"
        "c._Plan\n"  # 4
        "import os\n"
        "os._exit\n"  # allowed: not first-party
    )
    (pkg / "other.py").write_text(
        "from lowrank_jax.sub._helpers import shared\n"  # 5: a private module from outside its package
        "from lowrank_jax.sub import _helpers\n"  # 6
    )
    found = private_uses(tmp_path, packages=("lowrank_jax",))
    assert len(found) == 6, found
    for fragment in ("imports lowrank_jax.sub.core._plan", "imports lowrank_jax.sub.core._Plan", "uses core._plan",
                     "uses c._Plan", "other.py:1 imports the private module lowrank_jax.sub._helpers",
                     "other.py:2 imports the private module lowrank_jax.sub._helpers"):  # fmt: skip
        assert any(fragment in f for f in found), (fragment, found)
    assert sum("user.py" in f for f in found) == 4 and sum("other.py" in f for f in found) == 2, found


def test_optim_functions_fit_on_a_screen() -> None:
    found = long_functions(ROOT / "lowrank_jax" / "optim", MAX_FUNCTION_LINES)
    assert not found, "\n".join(found)
