"""Shared fixtures: every test in a fresh empty working directory; a small, fast variant of the `tiny` run.

Tests that draw random operands take the :func:`rng` fixture: fresh draws every run, and a failing test's report
names its seed, which ``LOWRANK_TEST_SEED`` replays.

The suite never touches the working directory it is started from: each test runs with the current directory set
to a new empty one (:func:`hermetic_cwd`), so a test that reads a path relative to it finds nothing, and one that
writes there (a default ``out_dir=runs/...``, a subprocess that inherits the directory) fails with what it left.
Tests locate the repository from ``__file__`` (``helpers.REPO``) and write under ``tmp_path``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gcs_emulator import gcs, gcs_emulator  # noqa: F401  (fixtures: a GCS emulator server and a fresh bucket)

CWD_FIXTURE = "hermetic_cwd"


@pytest.fixture(autouse=True)
def hermetic_cwd(tmp_path_factory, monkeypatch) -> Iterator[Path]:
    """Run the test with the current directory set to a fresh empty directory (not ``tmp_path``)."""
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    yield cwd


def _left_in(cwd: Path) -> list[str]:
    return sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail a test that passed but wrote into its working directory."""
    result = yield
    cwd = getattr(item, "funcargs", {}).get(CWD_FIXTURE)
    left = _left_in(cwd) if cwd is not None else []
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        pytest.fail(
            f"the test wrote into its working directory ({shown}); write under tmp_path (a subprocess: its cwd=)",
            pytrace=False,
        )
    return result


SEED_VARIABLE = "LOWRANK_TEST_SEED"


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy generator on a fresh seed (or ``$LOWRANK_TEST_SEED``); the seed is in the test's report."""
    seed = int(os.environ.get(SEED_VARIABLE) or np.random.SeedSequence().entropy % (1 << 63))
    request.node.add_report_section("setup", "seed", f"numpy seed {seed}; replay with {SEED_VARIABLE}={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One tokenizer/token cache for the whole session."""
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="session")
def small_overrides(data_cache) -> list[str]:
    """Overrides that shrink `tiny` to a sub-second-per-step CPU run (pydoc corpus, vocab 512)."""
    return [
        "data.source=pydoc",
        "data.vocab_size=512",
        "data.tokenizer_train_chars=200000",
        f"data.cache_dir={data_cache}",
        "model.hidden=64",
        "model.ffn=160",
        "model.heads=2",
        "model.layers=2",
        "model.max_seq_len=64",
        "seq_len=32",
        "batch_size=8",
        "eval_tokens=2048",
        "eval_every=0",
        "log_every=5",
        "progress=false",
    ]
