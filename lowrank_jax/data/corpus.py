"""Text corpora: a named list of training and validation documents with a content digest.

Sources (``DataConfig.source``):

- ``stdlib``: every ``.py`` file of the running interpreter's standard library (no site-packages),
  about 34 MB of Python for CPython 3.11 — a corpus that is always present, even offline.
- ``pydoc``: the prose of ``pydoc_data.topics`` (the language reference topics, ~0.8 MB).
- ``files``: the files matched by the globs in ``data.paths``.
- ``tfds``: two splits of a prepared TensorFlow Datasets directory read through ``tfds.data_source``
  (ArrayRecord files, no TensorFlow needed) and iterated with grain, e.g. C4.

Documents of the first three sources are assigned to the validation split by a stable hash of
their name (:func:`in_validation`), so adding a file does not move any other file between splits.
``data.max_docs > 0`` keeps the first N documents of each split. :attr:`Corpus.digest` identifies
the exact ordered contents; the tokenizer and token caches are keyed by it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: config imports this package's choice lists
    from lowrank_jax.config import DataConfig


EXCLUDED_DIRS = ("site-packages", "dist-packages")


@dataclass(frozen=True)
class Corpus:
    """Training and validation documents, in a fixed order, with a content digest."""

    name: str
    train: list[str]
    val: list[str]
    digest: str  # sha256 of names + contents of train then val (first 16 hex chars)

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, train={len(self.train)} docs, val={len(self.val)} docs, digest={self.digest})"


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` across processes and machines (unlike ``hash()``)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def in_validation(key: str, val_fraction: float) -> bool:
    return stable_fraction(key) < val_fraction


def corpus_digest(train: Iterable[tuple[str, str]], val: Iterable[tuple[str, str]]) -> str:
    """sha256 (16 hex chars) of the ordered ``(name, text)`` pairs of both splits, length-prefixed."""
    h = hashlib.sha256()
    for tag, docs in ((b"train", train), (b"val", val)):
        h.update(tag)
        for name, text in docs:
            for part in (name.encode("utf-8"), text.encode("utf-8", errors="surrogatepass")):
                h.update(len(part).to_bytes(8, "little"))
                h.update(part)
    return h.hexdigest()[:16]


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _split_named(cfg: DataConfig, name: str, named: list[tuple[str, str]]) -> Corpus:
    """Hash-split sorted ``(name, text)`` pairs, cap each split at ``max_docs`` and build the Corpus."""
    train = [(k, t) for k, t in named if not in_validation(k, cfg.val_fraction)]
    val = [(k, t) for k, t in named if in_validation(k, cfg.val_fraction)]
    return _make_corpus(cfg, name, train, val, total=len(named))


def _make_corpus(
    cfg: DataConfig, name: str, train: list[tuple[str, str]], val: list[tuple[str, str]], total: int
) -> Corpus:
    if cfg.max_docs > 0:
        train, val = train[: cfg.max_docs], val[: cfg.max_docs]
    for split, docs in (("train", train), ("validation", val)):
        if not docs:
            raise ValueError(
                f"data.val_fraction: the {split} split of corpus {name!r} is empty ({total} documents in all, "
                f"val_fraction={cfg.val_fraction}, max_docs={cfg.max_docs}); adjust data.val_fraction or data.max_docs"
            )
    return Corpus(name=name, train=[t for _, t in train], val=[t for _, t in val], digest=corpus_digest(train, val))


def stdlib_files() -> list[tuple[str, str]]:
    """Sorted ``(relative posix path, absolute path)`` of the standard library's ``.py`` files."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for fn in filenames:
            if fn.endswith(".py"):
                full = os.path.join(dirpath, fn)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                if not any(part in EXCLUDED_DIRS for part in rel.split("/")) and os.path.isfile(full):
                    out.append((rel, full))
    out.sort()
    return out


def _load_stdlib(cfg: DataConfig) -> Corpus:
    import platform  # noqa: PLC0415

    files = stdlib_files()
    if not files:
        raise ValueError(f"data.source: no .py files under {sysconfig.get_paths()['stdlib']!r}")
    named = [(rel, _read_text(full)) for rel, full in files]
    return _split_named(cfg, f"stdlib-{platform.python_version()}", named)


def _load_pydoc(cfg: DataConfig) -> Corpus:
    from pydoc_data.topics import topics  # noqa: PLC0415

    return _split_named(cfg, "pydoc", [(k, topics[k]) for k in sorted(topics)])


def glob_files(patterns: Iterable[str]) -> list[str]:
    """Absolute paths of the regular files matched by ``patterns`` (``**`` and ``~`` allowed), de-duplicated, sorted."""
    found = set()
    for pattern in patterns:
        for p in glob.glob(os.path.expanduser(pattern), recursive=True):
            if os.path.isfile(p):
                found.add(os.path.abspath(p))
    return sorted(found)


def _load_files(cfg: DataConfig) -> Corpus:
    paths = glob_files(cfg.paths)
    if not paths:
        raise ValueError(f"data.paths: no files match {list(cfg.paths)!r}")
    # Names are relative to the deepest common directory, so the digest and the split do not
    # depend on where the data set lives on disk.
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    named = [(os.path.relpath(p, root).replace(os.sep, "/"), _read_text(p)) for p in paths]
    return _split_named(cfg, "files", named)


def _record_text(record: object) -> str:
    text = record["text"] if isinstance(record, dict) else record
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if hasattr(text, "item"):  # numpy scalar / 0-d array
        text = text.item()
        if isinstance(text, bytes):
            return text.decode("utf-8", errors="replace")
    return str(text)


def _read_tfds_split(tfds, name: str, data_dir: str | None, split: str, max_docs: int) -> list[str]:
    import grain  # noqa: PLC0415

    try:
        source = tfds.data_source(name, data_dir=data_dir, split=split)
    except ValueError as e:
        if type(e).__name__ != "DatasetNotFoundError":
            raise
        raise ValueError(
            f"data.tfds_name: no prepared dataset {name!r} under data.tfds_data_dir={data_dir!r} (expected "
            "<data_dir>/<name>[/<config>]/<version>/ holding dataset_info.json and ArrayRecord files; prepare it "
            "beforehand, e.g. `tfds build c4/en --file_format=array_record` where TensorFlow is installed)"
        ) from None
    ds = grain.MapDataset.source(source)
    if max_docs > 0:
        ds = ds[: min(max_docs, len(ds))]
    ds = ds.map(_record_text)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=8, prefetch_buffer_size=256))
    return list(it)


def _load_tfds(cfg: DataConfig) -> Corpus:
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("data.source=tfds needs tensorflow-datasets: pip install lowrank-jax[tfds]") from e
    data_dir = os.path.expanduser(cfg.tfds_data_dir) if cfg.tfds_data_dir else None
    max_docs = cfg.max_docs
    train, val = (
        [(f"{split}/{i}", t) for i, t in enumerate(_read_tfds_split(tfds, cfg.tfds_name, data_dir, split, max_docs))]
        for split in (cfg.tfds_split, cfg.tfds_val_split)
    )
    return _make_corpus(cfg, f"tfds:{cfg.tfds_name}", train, val, total=len(train) + len(val))


LOADERS = {"stdlib": _load_stdlib, "pydoc": _load_pydoc, "files": _load_files, "tfds": _load_tfds}
SOURCES = tuple(LOADERS)  # the values of data.source


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the corpus named by ``cfg.source`` and split it into training and validation documents."""
    if cfg.source not in LOADERS:
        raise ValueError(f"data.source: must be one of {SOURCES}, got {cfg.source!r}")
    return LOADERS[cfg.source](cfg)
