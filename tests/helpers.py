"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, timeout: float = 600, env: dict | None = None, cwd: str | Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m lowrank_jax.train.cli ARGS`` in a subprocess, in ``cwd``.

    ``cwd`` defaults to the test's working directory, a fresh empty one (``conftest.hermetic_cwd``), so whatever
    the command writes to a relative path (a default ``out_dir``) fails the test instead of landing in the checkout.
    """
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lowrank_jax.train.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=Path.cwd() if cwd is None else cwd,
    )


def module_name(root: Path, path: Path) -> str:
    """The dotted module name of ``path`` (a ``.py`` file under ``root``); a package's ``__init__`` is the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_module(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` in ``module`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])
