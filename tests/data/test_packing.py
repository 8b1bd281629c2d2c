"""Packing: encoded streams, token cache, deterministic resumable batches, eval windows, unigram baseline."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from lowrank_jax.data import (
    BatchIterator,
    encode_corpus,
    eval_batches,
    get_tokenizer,
    load_corpus,
    prepare_data,
    unigram_cross_entropy,
)
from lowrank_jax.data import packing as packing_mod


def test_encode_corpus_matches_per_document(trained_cfg, monkeypatch):
    corpus = load_corpus(trained_cfg)
    tok = get_tokenizer(trained_cfg, corpus)
    docs = [*corpus.val, "", "tiny"]
    monkeypatch.setattr(packing_mod, "ENCODE_CHUNK_CHARS", 5000)  # many chunks
    stream = encode_corpus(tok, docs)
    expected = [i for d in docs for i in [*tok.encode(d), tok.eos_id]]
    assert stream.dtype == np.int32
    np.testing.assert_array_equal(stream, np.array(expected, dtype=np.int32))
    assert encode_corpus(tok, []).shape == (0,)


def test_prepare_data_and_cache(tiny_cfg, monkeypatch):
    data = prepare_data(tiny_cfg)
    corpus = load_corpus(tiny_cfg)
    assert data.digest == corpus.digest
    assert data.vocab_size == data.tokenizer.vocab_size == 512
    assert data.train.dtype == data.val.dtype == np.int32
    assert int((data.train == data.tokenizer.eos_id).sum()) == len(corpus.train) == data.info["train_docs"]
    assert int((data.val == data.tokenizer.eos_id).sum()) == len(corpus.val) == data.info["val_docs"]
    assert data.train[-1] == data.tokenizer.eos_id
    assert data.info["train_tokens"] == data.train.size and data.info["val_tokens"] == data.val.size
    assert data.info["train_chars"] == sum(map(len, corpus.train))
    assert data.info["cached"] is False
    assert data.tokenizer.decode(data.val[: data.val.tolist().index(data.tokenizer.eos_id)]) == corpus.val[0]

    def no_encoding(*args, **kwargs):
        raise AssertionError("re-encoded although the token cache exists")

    monkeypatch.setattr(packing_mod, "encode_corpus", no_encoding)
    again = prepare_data(tiny_cfg)
    assert again.info["cached"] is True
    np.testing.assert_array_equal(again.train, data.train)
    np.testing.assert_array_equal(again.val, data.val)
    token_dir = os.path.join(tiny_cfg.cache_dir, "tokens")
    assert not [f for f in os.listdir(token_dir) if f.startswith(".tmp")]


def stream(rng: np.random.Generator, n: int, vocab: int = 50) -> np.ndarray:
    return rng.integers(0, vocab, size=n, dtype=np.int32)


def test_batches_are_deterministic_in_seed(rng):
    tokens = stream(rng, 5000)
    a, b = BatchIterator(tokens, 4, 16, seed=3), BatchIterator(tokens, 4, 16, seed=3)
    for step in (0, 1, 7, 100, 3):
        np.testing.assert_array_equal(a.batch(step), b.batch(step))
    c = BatchIterator(tokens, 4, 16, seed=4)
    assert any(not np.array_equal(a.batch(s), c.batch(s)) for s in range(3))
    x = a.batch(0)
    assert x.shape == (4, 17) and x.dtype == np.int32


def test_restored_iterator_continues_exactly(rng):
    tokens = stream(rng, 3000)
    k = 11
    full = BatchIterator(tokens, 3, 8, seed=7)
    seen = [next(full) for _ in range(k + 6)]
    assert full.step == k + 6
    restored = BatchIterator(tokens, 3, 8, seed=7, start_step=k)
    for expected in seen[k:]:
        np.testing.assert_array_equal(next(restored), expected)
    via_state = BatchIterator(tokens, 3, 8, seed=7)
    via_state.load_state_dict({**full.state_dict(), "step": k})
    for step, got in zip(range(k, k + 6), via_state, strict=False):
        np.testing.assert_array_equal(got, seen[step])
    with pytest.raises(ValueError, match=r"seed"):
        via_state.load_state_dict({**full.state_dict(), "seed": 8})


def test_windows_are_stream_slices(rng):
    seq_len = 10
    tokens = stream(rng, 1003)
    it = BatchIterator(tokens, 5, seq_len, seed=1)
    labelled = np.arange(tokens.size)  # same windows over position labels
    pos_it = BatchIterator(labelled, 5, seq_len, seed=1)
    for step in range(4):
        x, pos = it.batch(step), pos_it.batch(step)
        starts = pos[:, 0]
        assert np.all(starts % seq_len == 0)
        np.testing.assert_array_equal(pos, starts[:, None] + np.arange(seq_len + 1))
        for row, s in zip(x, starts, strict=True):
            np.testing.assert_array_equal(row, tokens[s : s + seq_len + 1])
        np.testing.assert_array_equal(x[:, 1:], tokens[pos[:, 1:]])  # targets continue the inputs


def test_epochs_cover_every_window_once():
    seq_len, batch = 4, 3
    n_tokens = 4 * 23 + 2  # 23 windows: not a multiple of the batch size
    labelled = np.arange(n_tokens)
    it = BatchIterator(labelled, batch, seq_len, seed=5)
    assert it.n_windows == (n_tokens - 1) // seq_len == 23
    steps = 3 * 23 // batch + 2
    windows = np.concatenate([it.batch(s)[:, 0] // seq_len for s in range(steps)])
    for e in range(3):
        epoch = windows[e * 23 : (e + 1) * 23]
        assert sorted(epoch.tolist()) == list(range(23))
        np.testing.assert_array_equal(epoch, np.random.default_rng([5, e]).permutation(23))
    assert not np.array_equal(windows[:23], windows[23:46])


def test_batch_iterator_errors():
    with pytest.raises(ValueError, match=r"seq_len"):
        BatchIterator(np.arange(16), 2, 16, seed=0)  # needs 17 tokens for one window
    BatchIterator(np.arange(17), 2, 16, seed=0).batch(0)
    with pytest.raises(ValueError, match=r"batch_size"):
        BatchIterator(np.arange(100), 0, 4, seed=0)
    with pytest.raises(ValueError, match=r"step"):
        BatchIterator(np.arange(100), 2, 4, seed=0).batch(-1)


@pytest.mark.parametrize("max_tokens", [1, 37, 40, 64, 10_000])
def test_eval_batches_cover_first_tokens(rng, max_tokens):
    seq_len, bs = 8, 3
    tokens = stream(rng, 123)
    if max_tokens < seq_len:
        with pytest.raises(ValueError, match=r"eval_tokens"):
            eval_batches(tokens, seq_len, max_tokens, bs)
        return
    batches = eval_batches(tokens, seq_len, max_tokens, bs)
    n = min(max_tokens // seq_len, (tokens.size - 1) // seq_len)
    windows = np.concatenate(batches)
    assert windows.shape == (n, seq_len + 1) and windows.dtype == np.int32
    assert [b.shape[0] for b in batches] == [bs] * (n // bs) + ([n % bs] if n % bs else [])
    np.testing.assert_array_equal(windows[:, :-1].reshape(-1), tokens[: n * seq_len])
    np.testing.assert_array_equal(windows[:, 1:].reshape(-1), tokens[1 : n * seq_len + 1])


def test_eval_batches_too_short():
    with pytest.raises(ValueError, match=r"eval_tokens"):
        eval_batches(np.arange(8), 8, 1000, 2)


def test_unigram_cross_entropy_by_hand():
    train = np.array([0, 0, 1, 2])
    val = np.array([0, 3])
    # add-one counts [3, 2, 2, 1] over 4 + 4 = 8
    expected = -(math.log(3 / 8) + math.log(1 / 8)) / 2
    assert unigram_cross_entropy(train, val, 4) == pytest.approx(expected, rel=1e-12)


def test_unigram_cross_entropy_reference(rng):
    vocab = 37
    train = rng.integers(0, vocab - 5, size=500)
    val = rng.integers(0, vocab, size=300)
    counts = {v: 1 for v in range(vocab)}
    for t in train.tolist():
        counts[t] += 1
    total = sum(counts.values())
    ref = -sum(math.log(counts[t] / total) for t in val.tolist()) / len(val)
    assert unigram_cross_entropy(train, val, vocab) == pytest.approx(ref, rel=1e-10)
    assert unigram_cross_entropy(train, val, vocab) < math.log(vocab) + 1  # sane scale
    with pytest.raises(ValueError, match=r"val"):
        unigram_cross_entropy(train, np.array([vocab]), vocab)
