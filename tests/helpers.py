"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

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
