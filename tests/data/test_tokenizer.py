"""Tokenizers: cached deterministic BPE training on the train split, explicit .json and .model files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from pydoc_data.topics import topics

import pytest
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import models, pre_tokenizers, trainers

from lowrank_jax.config import DataConfig
from lowrank_jax.data import Tokenizer, get_tokenizer, load_corpus
from lowrank_jax.data import tokenizer as tokenizer_mod
from lowrank_jax.data.corpus import in_validation
from lowrank_jax.data.tokenizer import EOS, tokenizer_cache_path, training_text

TEXTS = [
    "def f(x):\n    return x ** 2  # square\n",
    "Ünïcödé — ✓ 漢字 emoji 🙂 and tabs\t\tand  double  spaces\r\n",
    "",
    " leading space, trailing space ",
]


def test_trained_once_then_cached(trained_cfg, monkeypatch):
    corpus = load_corpus(trained_cfg)
    tok = get_tokenizer(trained_cfg, corpus)
    path = tokenizer_cache_path(trained_cfg, corpus)
    assert tok.path == path and os.path.isfile(path)
    assert os.path.basename(path) == f"{corpus.digest}-512-60000.json"
    assert os.path.dirname(path) == os.path.join(trained_cfg.cache_dir, "tokenizers")
    mtime = os.stat(path).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a cached tokenizer exists")

    monkeypatch.setattr(tokenizer_mod, "train_bpe_json", no_training)
    again = get_tokenizer(trained_cfg, corpus)
    assert again.fingerprint == tok.fingerprint
    assert os.stat(path).st_mtime_ns == mtime
    assert [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")] == []


def test_training_is_deterministic(tmp_path):
    cfgs = [
        DataConfig(source="pydoc", vocab_size=600, tokenizer_train_chars=50_000, cache_dir=str(tmp_path / d))
        for d in ("a", "b")
    ]
    corpus = load_corpus(cfgs[0])
    toks = [get_tokenizer(c, corpus) for c in cfgs]
    blobs = [Path(t.path).read_bytes() for t in toks]
    assert toks[0].path != toks[1].path
    assert blobs[0] == blobs[1]
    assert toks[0].fingerprint == toks[1].fingerprint == hashlib.sha256(blobs[0]).hexdigest()[:16]


def test_bpe_properties_and_round_trip(trained_cfg):
    corpus = load_corpus(trained_cfg)
    tok = get_tokenizer(trained_cfg, corpus)
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 512
    assert tok.eos_id == 0 and tok.decode([tok.eos_id]) == EOS
    for text in TEXTS + corpus.val[:3]:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.eos_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    literal = f"text{EOS}more <|endoftext|>"  # special-token strings in a document are plain text
    assert tok.eos_id not in tok.encode(literal) and tok.decode(tok.encode(literal)) == literal
    prose = corpus.train[0][:2000]
    assert len(tok.encode(prose)) < len(prose.encode("utf-8")) / 2  # merges were learned


def test_training_text_takes_first_chars():
    docs = ["abcd", "", "efg", "hijkl"]
    assert list(training_text(docs, 6)) == ["abcd", "ef"]
    assert list(training_text(docs, 100)) == ["abcd", "efg", "hijkl"]
    assert list(training_text(docs, 0)) == []


def test_trains_on_training_split_only(tmp_path):
    # A word repeated only in validation documents must not become a token.
    data = tmp_path / "docs"
    data.mkdir()
    n_val = 0
    for i in range(60):
        name = f"d{i:02d}.txt"
        if in_validation(name, 0.2):
            n_val += 1
            text = "zqxv " * 400
        else:
            text = f"plain ordinary words number {i} and more ordinary words\n" * 20
        (data / name).write_text(text)
    assert 0 < n_val < 60
    cfg = DataConfig(
        source="files",
        paths=(str(data / "*.txt"),),
        val_fraction=0.2,
        vocab_size=400,
        tokenizer_train_chars=10**7,
        cache_dir=str(tmp_path / "cache"),
    )
    corpus = load_corpus(cfg)
    tok = get_tokenizer(cfg, corpus)
    vocab = json.loads(Path(tok.path).read_text())["model"]["vocab"]
    assert "Ġordinary" in vocab or "ordinary" in vocab
    assert not any("zq" in t or "xv" in t for t in vocab)


def test_explicit_json_path(trained_cfg, tmp_path):
    corpus = load_corpus(trained_cfg)
    trained = get_tokenizer(trained_cfg, corpus)
    copy = tmp_path / "my tokenizer.json"
    copy.write_bytes(Path(trained.path).read_bytes())
    cfg = dataclasses.replace(trained_cfg, tokenizer=str(copy), cache_dir=str(tmp_path / "unused"))
    tok = get_tokenizer(cfg, corpus)
    assert tok.path == str(copy) and tok.fingerprint == trained.fingerprint
    assert tok.encode_batch(TEXTS) == trained.encode_batch(TEXTS)
    assert not (tmp_path / "unused").exists()


def test_json_without_eos_is_rejected(tmp_path):
    hf = HfTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["some text here"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    path = tmp_path / "noeos.json"
    hf.save(str(path))
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        get_tokenizer(DataConfig(tokenizer=str(path)), None)


def test_sentencepiece_model_path(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text_file = tmp_path / "train.txt"
    text_file.write_text("\n".join(topics[k] for k in sorted(topics))[:200_000], encoding="utf-8")
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(prefix),
        vocab_size=300,
        model_type="bpe",
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    tok = get_tokenizer(DataConfig(tokenizer=str(prefix) + ".model"), None)
    assert tok.vocab_size == 300
    assert tok.eos_id == 2
    text = "The while statement is used for repeated execution"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "for x in y"]) == [ids, tok.encode("for x in y")]
    assert len(tok.fingerprint) == 16


def test_tokenizer_errors(tmp_path):
    (tmp_path / "tok.txt").write_text("x")
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        get_tokenizer(DataConfig(tokenizer=str(tmp_path / "tok.txt")), None)
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        get_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing.model")), None)
    corpus = load_corpus(DataConfig(source="pydoc", max_docs=2))
    with pytest.raises(ValueError, match=r"data\.vocab_size"):
        get_tokenizer(DataConfig(source="pydoc", vocab_size=256, cache_dir=str(tmp_path)), corpus)
