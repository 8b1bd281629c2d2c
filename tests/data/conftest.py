"""Shared fixtures for the data-pipeline tests: a small pydoc config with a per-test cache dir."""

from __future__ import annotations

import pytest

from lowrank_jax.config import DataConfig

TINY = {"source": "pydoc", "vocab_size": 512, "tokenizer_train_chars": 60_000, "val_fraction": 0.1}


@pytest.fixture
def tiny_cfg(tmp_path) -> DataConfig:
    """pydoc corpus, 512-entry BPE trained on 60k characters, cache under tmp_path."""
    return DataConfig(**TINY, cache_dir=str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def trained_cfg(tmp_path_factory) -> DataConfig:
    """Like ``tiny_cfg`` but with a session-wide cache, so the tokenizer is trained once for many tests."""
    return DataConfig(**TINY, cache_dir=str(tmp_path_factory.mktemp("shared-cache")))
