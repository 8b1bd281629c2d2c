"""Perplexity of a model on a local text or jsonl file.

The file's documents (a ``.txt``/other file is one document; a ``.jsonl`` file one document per line,
the ``text`` field) are tokenized without special tokens and joined by the end-of-document token when
the tokenizer has one. The stream is cut into consecutive windows of ``seq_len + 1`` tokens that
overlap by one (each token after the first is predicted exactly once, from up to ``seq_len`` tokens of
context); the last, shorter window is padded and its padding masked. Perplexity is
``exp(Σ NLL / #predicted tokens)`` in float64 over all windows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.config import ModelConfig
from lowrank_jax.models import abstract_params


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """The documents of a text file (one) or a jsonl file (one per non-empty line, its ``field``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"data: no such file {str(path)!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"data: {str(path)!r} is not UTF-8 text") from None
    if p.suffix != ".jsonl":
        return [text]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"data: {str(path)!r} line {n} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"data: {str(path)!r} line {n} has no string field {field!r}")
        docs.append(record[field])
    return docs


def token_windows(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(windows (n, seq_len + 1), mask (n, seq_len))``: consecutive windows overlapping by one token."""
    if stream.size < 2:
        raise ValueError("data: fewer than two tokens to evaluate")
    starts = range(0, stream.size - 1, seq_len)
    windows = np.zeros((len(starts), seq_len + 1), np.int32)
    mask = np.zeros((len(starts), seq_len), bool)
    for i, s in enumerate(starts):
        chunk = stream[s : s + seq_len + 1]
        windows[i, : chunk.size] = chunk
        mask[i, : chunk.size - 1] = True
    return windows, mask


def window_nll(cfg: ModelConfig, params: Any, windows: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
    """Summed next-token NLL of every window ``(n,)`` float64 (padding masked)."""
    graphdef, _ = abstract_params(cfg)

    @jax.jit
    def nll(params, batch, m):
        logits = nnx.merge(graphdef, params)(batch[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        tok = jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(m, tok, 0.0), axis=-1)

    params = jax.tree.map(jnp.asarray, params)
    out = []
    for s in range(0, len(windows), batch_size):
        b, m = windows[s : s + batch_size], mask[s : s + batch_size]
        pad = batch_size - len(b)  # one compiled shape: the last batch is padded with masked rows
        b = np.concatenate([b, np.zeros((pad, b.shape[1]), np.int32)])
        m = np.concatenate([m, np.zeros((pad, m.shape[1]), bool)])
        out.append(np.asarray(nll(params, jnp.asarray(b), jnp.asarray(m)), np.float64)[: batch_size - pad])
    return np.concatenate(out)


def perplexity(
    cfg: ModelConfig, params: Any, stream: np.ndarray, seq_len: int, batch_size: int = 8
) -> dict[str, float]:
    """``{"loss", "perplexity", "tokens", "windows"}`` of a token stream (see the module docstring)."""
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ValueError(f"seq_len: must be in [1, {cfg.max_seq_len}] (model.max_seq_len), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    stream = np.asarray(stream, np.int64)
    if stream.size and (stream.min() < 0 or stream.max() >= cfg.vocab_size):
        raise ValueError(f"data: token ids outside the model's vocabulary of {cfg.vocab_size}")
    windows, mask = token_windows(stream, seq_len)
    total, count = float(window_nll(cfg, params, windows, mask, batch_size).sum()), int(mask.sum())
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "windows": len(windows)}
