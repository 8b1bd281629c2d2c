"""Shared fixtures: a small, fast variant of the `tiny` run on the pydoc corpus."""

from __future__ import annotations

import pytest


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
