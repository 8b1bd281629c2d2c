"""Every op package under pallas_kernels has the same module files, each with the role its docstring names."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "pallas_kernels"
OPS = ("sl_matmul", "ternary_matmul")


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


# the roles, in the order pallas_kernels/__init__.py documents them (a line "``<role>.py``" each)
ROLES = tuple(re.findall(r"^``(\w+)\.py``$", _docstring(ROOT / "__init__.py"), flags=re.MULTILINE))
OPTIONAL = tuple(re.findall(r"^``(\w+)\.py`` \(optional\)$", _docstring(ROOT / "__init__.py"), flags=re.MULTILINE))


def test_roles_are_documented():
    assert set(ROLES) >= {"api", "reference", "xla", "kernel", "blocks", "layout"}, ROLES
    assert len(set(ROLES)) == len(ROLES)
    assert OPTIONAL == ("decode", "mosaic_gpu")


def test_every_op_package_is_covered():
    assert sorted(p.parent.name for p in ROOT.glob("*/__init__.py")) == sorted(OPS)


@pytest.mark.parametrize("op", OPS)
def test_op_package_has_exactly_the_role_modules(op):
    modules = {p.stem for p in (ROOT / op).glob("*.py")} - {"__init__"}
    assert modules - set(OPTIONAL) == set(ROLES), f"{op}: {sorted(modules)} != roles {sorted(ROLES)} (+ optional)"
    for role in modules & set(OPTIONAL):
        assert importlib.import_module(f"pallas_kernels.{op}.{role}").__doc__.strip(), f"{op}/{role}.py: no docstring"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("role", ROLES)
def test_every_module_imports_and_states_its_job(op, role):
    module = importlib.import_module(f"pallas_kernels.{op}.{role}")
    assert module.__doc__ and module.__doc__.strip(), f"{op}/{role}.py has no docstring"


@pytest.mark.parametrize("op", OPS)
def test_entry_points_live_in_their_roles(op):
    def get(role, name):
        return getattr(importlib.import_module(f"pallas_kernels.{op}.{role}"), name)

    assert callable(get("api", op))
    assert callable(get("reference", f"{op}_reference"))
    assert callable(get("xla", f"{op}_xla"))
    assert callable(get("kernel", f"{op}_pallas"))
    assert callable(get("blocks", "choose_blocks"))
