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
import itertools
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowrank_jax import storage

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
    if storage.is_remote(path):
        return storage.as_path(path).read_bytes().decode("utf-8", errors="replace")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


@dataclass(frozen=True)
class CorpusStream:
    """A corpus read one document at a time: :meth:`docs` yields a split's ``(name, text)`` in corpus order.

    Nothing is held in memory between documents, so a corpus of any size can be digested and
    tokenized (:func:`lowrank_jax.data.shards.prepare_shards`). Each call of :meth:`docs` reads the
    split again from its source.
    """

    name: str
    read: Callable[[str], Iterator[tuple[str, str]]]  # split ("train" | "val") -> (name, text) pairs
    max_docs: int = 0  # 0: all documents of each split
    val_fraction: float = 0.05  # for the empty-split message

    def docs(self, split: str) -> Iterator[tuple[str, str]]:
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
        docs = self.read(split)
        return itertools.islice(docs, self.max_docs) if self.max_docs > 0 else docs

    def texts(self, split: str) -> Iterator[str]:
        return (text for _, text in self.docs(split))

    def check_nonempty(self, split: str, count: int) -> None:
        if count == 0:
            label = "validation" if split == "val" else split
            raise ValueError(
                f"data.val_fraction: the {label} split of corpus {self.name!r} is empty (val_fraction="
                f"{self.val_fraction}, max_docs={self.max_docs}); adjust data.val_fraction or data.max_docs"
            )

    def digest(self) -> str:
        """:attr:`Corpus.digest` of this corpus, computed in one streaming pass (empty splits are an error)."""
        counts = dict.fromkeys(SPLITS, 0)

        def counted(split: str) -> Iterator[tuple[str, str]]:
            for doc in self.docs(split):
                counts[split] += 1
                yield doc

        digest = corpus_digest(counted("train"), counted("val"))
        for split in SPLITS:
            self.check_nonempty(split, counts[split])
        return digest


SPLITS = ("train", "val")


def _hash_split(cfg: DataConfig, name: str, keys: list[str], read: Callable[[str], str]) -> CorpusStream:
    """A stream over sorted document ``keys``, split by :func:`in_validation`; ``read(key)`` gives the text."""

    def docs(split: str) -> Iterator[tuple[str, str]]:
        want_val = split == "val"
        for key in keys:
            if in_validation(key, cfg.val_fraction) == want_val:
                yield key, read(key)

    return CorpusStream(name, docs, cfg.max_docs, cfg.val_fraction)


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


def _stream_stdlib(cfg: DataConfig) -> CorpusStream:
    import platform

    files = dict(stdlib_files())
    if not files:
        raise ValueError(f"data.source: no .py files under {sysconfig.get_paths()['stdlib']!r}")
    return _hash_split(cfg, f"stdlib-{platform.python_version()}", sorted(files), lambda k: _read_text(files[k]))


def _stream_pydoc(cfg: DataConfig) -> CorpusStream:
    from pydoc_data.topics import topics

    return _hash_split(cfg, "pydoc", sorted(topics), topics.__getitem__)


def glob_files(patterns: Iterable[str]) -> list[str]:
    """Absolute paths of the regular files matched by ``patterns`` (``**`` and ``~`` allowed), de-duplicated, sorted."""
    found = set()
    for pattern in patterns:
        if storage.is_remote(pattern):
            found.update(remote_glob(pattern))
            continue
        for p in glob.glob(os.path.expanduser(pattern), recursive=True):
            if os.path.isfile(p):
                found.add(os.path.abspath(p))
    return sorted(found)


def remote_glob(pattern: str) -> list[str]:
    """The objects matched by a ``gs://bucket/dir/*.txt``-style glob (wildcards after the last fixed folder)."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts + ["*"]) if any(c in part for c in "*?["))
    base = storage.as_path("/".join(parts[:fixed]))
    rest = "/".join(parts[fixed:])
    if not rest:
        return [str(base)] if base.is_file() else []
    return sorted(str(p) for p in base.glob(rest) if p.is_file())


def _stream_files(cfg: DataConfig) -> CorpusStream:
    paths = glob_files(cfg.paths)
    if not paths:
        raise ValueError(f"data.paths: no files match {list(cfg.paths)!r}")
    # Names are relative to the deepest common directory, so the digest and the split do not
    # depend on where the data set lives on disk.
    if any(storage.is_remote(p) for p in paths):  # names relative to the common prefix of the URLs
        root = os.path.commonpath([p.split("://", 1)[1].rsplit("/", 1)[0] for p in paths])
        files = {p.split("://", 1)[1][len(root) :].lstrip("/"): p for p in paths}
    else:
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        files = {os.path.relpath(p, root).replace(os.sep, "/"): p for p in paths}
    return _hash_split(cfg, "files", sorted(files), lambda k: _read_text(files[k]))


def _record_text(record: object) -> str:
    text = record["text"] if isinstance(record, dict) else record
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if hasattr(text, "item"):  # numpy scalar / 0-d array
        text = text.item()
        if isinstance(text, bytes):
            return text.decode("utf-8", errors="replace")
    return str(text)


def _tfds_split_texts(tfds, name: str, data_dir: str | None, split: str, max_docs: int) -> Iterator[str]:
    import grain

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
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=8, prefetch_buffer_size=256)))


def _stage_tfds(url: str, name: str, cache_dir: str) -> str:
    """A local data_dir holding the dataset ``name`` copied from the remote ``url``; its path.

    ArrayRecord's reader opens local paths only (its C++ file layer reaches gs:// through TensorFlow's
    file system, which this project does not install), so the dataset's folder (``name/config/version``,
    or every version when ``name`` has none) is copied into ``cache_dir`` first. Files already there
    with the bucket's size are kept, so a second run copies nothing.
    """
    base, _, version = name.partition(":")
    rel = "/".join([*base.split("/"), *([version] if version else [])])
    src = storage.join(url, rel)
    local = storage.mirror_dir(cache_dir, url) / "tfds"
    names = storage.walk_files(src)
    if not names:
        return str(local)  # tfds then reports the missing dataset with its own message
    root = storage.as_path(src)
    for name_ in names:
        dest = local.joinpath(*rel.split("/"), *name_.split("/"))
        remote = root.joinpath(name_)
        if dest.is_file() and dest.stat().st_size == remote.stat().length:
            continue
        storage.write_local(dest, remote.read_bytes())
    return str(local)


def _stream_tfds(cfg: DataConfig) -> CorpusStream:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("data.source=tfds needs tensorflow-datasets: pip install lowrank-jax[tfds]") from e
    data_dir = cfg.tfds_data_dir or None
    if data_dir and storage.is_remote(data_dir):
        data_dir = _stage_tfds(data_dir, cfg.tfds_name, cfg.cache_dir)
    elif data_dir:
        data_dir = os.path.expanduser(data_dir)
    splits = {"train": cfg.tfds_split, "val": cfg.tfds_val_split}

    def docs(split: str) -> Iterator[tuple[str, str]]:
        texts = _tfds_split_texts(tfds, cfg.tfds_name, data_dir, splits[split], cfg.max_docs)
        return ((f"{splits[split]}/{i}", t) for i, t in enumerate(texts))

    return CorpusStream(f"tfds:{cfg.tfds_name}", docs, cfg.max_docs, cfg.val_fraction)


STREAMS = {"stdlib": _stream_stdlib, "pydoc": _stream_pydoc, "files": _stream_files, "tfds": _stream_tfds}
SOURCES = tuple(STREAMS)  # the values of data.source


def stream_corpus(cfg: DataConfig) -> CorpusStream:
    """The corpus named by ``cfg.source`` as a :class:`CorpusStream` (documents are read lazily)."""
    if cfg.source not in STREAMS:
        raise ValueError(f"data.source: must be one of {SOURCES}, got {cfg.source!r}")
    return STREAMS[cfg.source](cfg)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the whole corpus named by ``cfg.source`` into memory, split into training and validation documents."""
    stream = stream_corpus(cfg)
    train, val = (list(stream.docs(split)) for split in SPLITS)
    for split, docs in zip(SPLITS, (train, val), strict=True):
        stream.check_nonempty(split, len(docs))
    return Corpus(stream.name, [t for _, t in train], [t for _, t in val], corpus_digest(train, val))
