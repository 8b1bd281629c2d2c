"""Token shards: prepare (streaming, atomic, reusable), exact reads, grain batches, and one-line input errors."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from lowrank_jax.data import load_corpus, prepare_data
from lowrank_jax.data import shards as shards_mod
from lowrank_jax.data.shards import ShardBatches, TokenStream, open_shards, prepare_shards, read_manifest

BLOCK, PER_FILE = 1000, 40  # small blocks and files: reads cross block and file boundaries


@pytest.fixture(scope="module")
def prepared(trained_cfg, tmp_path_factory):
    """pydoc shards with small blocks, and the same corpus encoded in memory."""
    cfg = trained_cfg
    out = tmp_path_factory.mktemp("s") / "shards"
    directory = prepare_shards(cfg, out, log=lambda _: None, block_tokens=BLOCK, blocks_per_file=PER_FILE)
    return cfg, open_shards(directory), prepare_data(cfg)


def test_streams_equal_the_in_memory_encoding(prepared):
    cfg, sh, mem = prepared
    for split in ("train", "val"):
        stream, tokens = getattr(sh, split), getattr(mem, split)
        assert stream.n_tokens == tokens.size
        np.testing.assert_array_equal(stream.read(0, stream.n_tokens), tokens)
    m = sh.manifest
    assert m["corpus_digest"] == mem.digest == sh.digest
    assert m["tokenizer"]["fingerprint"] == mem.tokenizer.fingerprint == sh.tokenizer.fingerprint
    assert m["dtype"] == "uint16" and m["block_tokens"] == BLOCK
    corpus = load_corpus(cfg)
    assert m["splits"]["train"]["docs"] == len(corpus.train) and m["splits"]["val"]["docs"] == len(corpus.val)
    assert m["splits"]["train"]["chars"] == sum(map(len, corpus.train))
    files = m["splits"]["train"]["files"]
    assert len(files) == -(-mem.train.size // (BLOCK * PER_FILE)) > 2
    assert sum(f["tokens"] for f in files) == mem.train.size
    np.testing.assert_array_equal(sh.unigram_counts(), np.bincount(mem.train, minlength=sh.vocab_size))


def test_random_reads_across_blocks_and_files(prepared):
    _, sh, mem = prepared
    rng = np.random.default_rng(0)
    n = sh.train.n_tokens
    edges = [(0, 1), (BLOCK - 1, BLOCK + 1), (BLOCK * PER_FILE - 3, BLOCK * PER_FILE + 5), (n - 7, n), (5, 5)]
    for a, b in [*edges, *(sorted(rng.integers(0, n, 2)) for _ in range(50))]:
        got = sh.train.read(int(a), int(b))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, mem.train[a:b])
    with pytest.raises(IndexError):
        sh.train.read(n - 1, n + 1)


def test_batches_are_pure_windows_without_replacement(prepared):
    _, sh, mem = prepared
    L, B = 32, 8
    b = ShardBatches(sh.train, B, L, seed=3)
    n = b.n_windows
    assert n == (mem.train.size - 1) // L
    x = b.batch(7)
    assert x.shape == (B, L + 1) and x.dtype == np.int32
    for row, i in zip(x, b.window_indices(7), strict=True):
        np.testing.assert_array_equal(row, mem.train[i * L : i * L + L + 1])
    np.testing.assert_array_equal(ShardBatches(sh.train, B, L, seed=3).batch(7), x)  # pure in (step, seed)
    assert not np.array_equal(ShardBatches(sh.train, B, L, seed=4).batch(7), x)
    # element j of the order is window order[j]: each epoch is a permutation, and epochs differ
    steps = 2 * n // B + 1
    order = np.concatenate([b.window_indices(t) for t in range(steps)])
    for e in range(2):
        np.testing.assert_array_equal(np.sort(order[e * n : (e + 1) * n]), np.arange(n))
    assert not np.array_equal(order[:n], order[n : 2 * n])


def test_process_rows_and_prefetching_iterator(prepared):
    _, sh, _ = prepared
    full = ShardBatches(sh.train, 8, 16, seed=1)
    halves = [ShardBatches(sh.train, 8, 16, seed=1, rows=slice(lo, lo + 4)) for lo in (0, 4)]
    for t in (0, 5, 123):
        np.testing.assert_array_equal(np.concatenate([h.batch(t) for h in halves]), full.batch(t))
    it = list(full.iterate(10, 20))
    assert len(it) == 10
    for t, x in zip(range(10, 20), it, strict=True):
        np.testing.assert_array_equal(x, full.batch(t))


def test_loader_state_is_checked_on_resume(prepared):
    _, sh, _ = prepared
    b = ShardBatches(sh.train, 4, 16, seed=2)
    state = b.state_dict(30)
    assert state["windows_consumed"] == 120 and state["stream_digest"] == sh.train.digest
    b.check_state(state, 30)
    for other in (ShardBatches(sh.train, 8, 16, seed=2), ShardBatches(sh.train, 4, 16, seed=5)):
        with pytest.raises(ValueError, match="resume: the checkpoint's data loader has"):
            other.check_state(state, 30)


def test_prepare_reuses_complete_shards_and_refuses_others(prepared, monkeypatch, tmp_path):
    cfg, sh, _ = prepared

    def no_encoding(*args, **kwargs):
        raise AssertionError("re-encoded although the shards exist")

    monkeypatch.setattr(shards_mod, "_encode_split", no_encoding)
    assert prepare_shards(cfg, sh.directory, log=lambda _: None) == sh.directory
    other = dataclasses.replace(cfg, max_docs=3)
    with pytest.raises(ValueError, match="already holds other shards"):
        prepare_shards(other, sh.directory, log=lambda _: None)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(ValueError, match="is not empty and has no manifest.json"):
        prepare_shards(cfg, tmp_path / "junk", log=lambda _: None)


def test_interrupted_prepare_leaves_nothing(prepared, monkeypatch, tmp_path):
    cfg = prepared[0]
    real = shards_mod._SplitWriter.add
    calls = []

    def failing_add(self, ids):
        calls.append(1)
        if self.split == "val":
            raise KeyboardInterrupt
        real(self, ids)

    monkeypatch.setattr(shards_mod._SplitWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(cfg, tmp_path / "out", log=lambda _: None)
    assert calls and os.listdir(tmp_path) == []  # no target, no temporary directory


def test_read_manifest_rejects_partial_directories(prepared, tmp_path):
    _, sh, _ = prepared
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sh.directory, copy)
    read_manifest(copy)
    shard = copy / sh.manifest["splits"]["train"]["files"][1]["name"]
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"data\.shards: shard .* has 100 bytes, the manifest says"):
        read_manifest(copy)
    shard.unlink()
    with pytest.raises(ValueError, match="is missing"):
        read_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ValueError, match="has no manifest.json"):
        read_manifest(copy)
    with pytest.raises(ValueError, match="no such directory"):
        read_manifest(tmp_path / "absent")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="is not a version-1"):
        read_manifest(tmp_path / "bad")


def test_open_shards_checks_the_configured_tokenizer(prepared, tmp_path):
    _, sh, _ = prepared
    open_shards(sh.directory, str(sh.directory / "tokenizer.json"))  # the same file: accepted
    other = tmp_path / "other.json"
    text = (sh.directory / "tokenizer.json").read_text().replace('"<|eos|>"', '"<|eos|>" ', 1)
    other.write_text(text)
    with pytest.raises(ValueError, match=r"data\.tokenizer: .* is not the tokenizer the shards"):
        open_shards(sh.directory, str(other))


def test_token_stream_of_an_empty_split_reads_nothing(prepared):
    _, sh, _ = prepared
    m = json.loads(json.dumps(sh.manifest))
    m["splits"]["val"] = {"tokens": 0, "files": [], "stream_digest": "x"}
    empty = TokenStream(sh.directory, m, "val")
    assert empty.read(0, 0).size == 0
    with pytest.raises(ValueError, match="too short for one window"):
        ShardBatches(empty, 2, 8, seed=0)


@pytest.mark.slow  # 16 s on 2 cores
def test_training_from_prepared_shards_reads_no_corpus(small_overrides, tmp_path, monkeypatch):
    """`prepare` then `train data.shards=DIR`: the same losses as the automatic path, without opening the corpus."""
    from lowrank_jax.data import corpus as corpus_mod
    from lowrank_jax.train.cli import main
    from lowrank_jax.train.metrics import read_metrics

    run = [*small_overrides, "steps=4", "log_every=1"]
    assert main(["train", "tiny", *run, f"out_dir={tmp_path / 'auto'}"]) == 0
    shards = tmp_path / "shards"
    assert main(["prepare", "tiny", *small_overrides, f"data.shards={shards}"]) == 0

    def no_corpus(cfg):
        raise AssertionError("the corpus was read although data.shards is set")

    monkeypatch.setattr(corpus_mod, "STREAMS", dict.fromkeys(corpus_mod.STREAMS, no_corpus))
    assert main(["train", "tiny", *run, f"data.shards={shards}", f"out_dir={tmp_path / 'explicit'}"]) == 0
    losses = [
        [r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("auto", "explicit")
    ]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    results = json.loads((tmp_path / "explicit" / "results.json").read_text())
    assert results["data"]["shards"] == str(shards) and results["time_to_first_step_s"] > 0
