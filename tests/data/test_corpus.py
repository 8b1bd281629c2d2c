"""Corpus sources: order, hash split, digest, caps and error paths, against independent re-reads."""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from lowrank_jax.config import DataConfig
from lowrank_jax.data import Corpus, load_corpus
from lowrank_jax.data.corpus import corpus_digest, stdlib_files


def ref_is_val(key: str, frac: float) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < frac


def ref_split(named: list[tuple[str, str]], frac: float) -> tuple[list[str], list[str]]:
    train = [t for k, t in named if not ref_is_val(k, frac)]
    val = [t for k, t in named if ref_is_val(k, frac)]
    return train, val


@pytest.fixture(scope="module")
def stdlib_pair() -> tuple[Corpus, Corpus]:
    cfg = DataConfig(source="stdlib", val_fraction=0.05)
    return load_corpus(cfg), load_corpus(cfg)


def test_stdlib_matches_independent_walk(stdlib_pair):
    corpus, _ = stdlib_pair
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )
    assert len(rels) > 500
    named = [(r, (root / r).read_text(encoding="utf-8", errors="replace")) for r in rels]
    train, val = ref_split(named, 0.05)
    assert corpus.train == train
    assert corpus.val == val
    assert 0 < len(val) < len(train)
    assert corpus.name.startswith("stdlib-")


def test_stdlib_stable_and_sorted(stdlib_pair):
    a, b = stdlib_pair
    assert a.digest == b.digest and len(a.digest) == 16
    assert a.train == b.train and a.val == b.val
    rels = [r for r, _ in stdlib_files()]
    assert rels == sorted(rels)
    assert not any("site-packages" in r or "dist-packages" in r for r in rels)
    assert "os.py" in rels and "json/__init__.py" in rels


def test_stdlib_max_docs(stdlib_pair):
    full, _ = stdlib_pair
    capped = load_corpus(DataConfig(source="stdlib", val_fraction=0.05, max_docs=3))
    assert capped.train == full.train[:3] and capped.val == full.val[:3]
    assert capped.digest != full.digest


def test_pydoc_source():
    corpus = load_corpus(DataConfig(source="pydoc", val_fraction=0.2))
    train, val = ref_split([(k, topics[k]) for k in sorted(topics)], 0.2)
    assert corpus.train == train and corpus.val == val
    assert corpus.digest == load_corpus(DataConfig(source="pydoc", val_fraction=0.2)).digest
    assert corpus.digest != load_corpus(DataConfig(source="pydoc", val_fraction=0.3)).digest


def test_digest_depends_on_names_and_split_boundary():
    base = corpus_digest([("a", "xy")], [("b", "z")])
    assert base != corpus_digest([("a2", "xy")], [("b", "z")])
    assert base != corpus_digest([("a", "xy"), ("b", "z")], [])
    assert base != corpus_digest([("a", "x")], [("b", "yz")])
    assert base == corpus_digest([("a", "xy")], [("b", "z")])


def make_tree(root: Path, n: int = 40) -> dict[str, str]:
    files = {}
    for i in range(n):
        rel = f"sub{i % 3}/deep/file{i:02d}.txt" if i % 2 else f"file{i:02d}.md"
        files[rel] = f"document {i} — {'ü' * (i % 5)}\n" * (i + 1)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(files[rel], encoding="utf-8")
    return files


def test_files_source_glob_dedup_and_split(tmp_path):
    files = make_tree(tmp_path / "data")
    (tmp_path / "data" / "sub0" / "bad.txt").write_bytes(b"ok \xff\xfe end")
    files["sub0/bad.txt"] = "ok \ufffd\ufffd end"
    patterns = (
        str(tmp_path / "data" / "**" / "*.txt"),
        str(tmp_path / "data" / "*.md"),
        str(tmp_path / "data" / "sub1" / "**" / "*"),
    )  # the last one overlaps the first
    corpus = load_corpus(DataConfig(source="files", paths=patterns, val_fraction=0.25))
    train, val = ref_split(sorted(files.items()), 0.25)
    assert corpus.train == train and corpus.val == val
    assert len(corpus.train) + len(corpus.val) == len(files)
    assert corpus.name == "files"


def test_files_source_location_independent_and_tilde(tmp_path, monkeypatch):
    make_tree(tmp_path / "home" / "a")
    make_tree(tmp_path / "b")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    c1 = load_corpus(DataConfig(source="files", paths=("~/a/**/*",), val_fraction=0.25))
    c2 = load_corpus(DataConfig(source="files", paths=(str(tmp_path / "b" / "**" / "*"),), val_fraction=0.25))
    assert c1.digest == c2.digest and c1.train == c2.train


def test_files_source_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data\.paths"):
        load_corpus(DataConfig(source="files", paths=(str(tmp_path / "nothing" / "**" / "*.txt"),)))
    with pytest.raises(ValueError, match=r"data\.paths"):
        load_corpus(DataConfig(source="files", paths=()))
    (tmp_path / "only.txt").write_text("one document")
    with pytest.raises(ValueError, match=r"data\.val_fraction"):  # one file cannot fill both splits
        load_corpus(DataConfig(source="files", paths=(str(tmp_path / "only.txt"),)))


def test_empty_split_errors():
    with pytest.raises(ValueError, match=r"data\.val_fraction.*validation.*data\.max_docs"):
        load_corpus(DataConfig(source="pydoc", val_fraction=1e-9))
    with pytest.raises(ValueError, match=r"train split"):
        load_corpus(DataConfig(source="pydoc", val_fraction=0.999999))
    with pytest.raises(ValueError, match=r"data\.source"):
        load_corpus(DataConfig(source="nope"))


def test_tfds_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install lowrank-jax\[tfds\]"):
        load_corpus(DataConfig(source="tfds", tfds_data_dir="/nonexistent"))
