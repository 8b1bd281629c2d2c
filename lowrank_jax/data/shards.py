"""Pre-tokenized token shards on disk, streamed through grain: training never holds the corpus in memory.

``lowrank-jax prepare CONFIG data.shards=DIR`` (:func:`prepare_shards`) reads the corpus one
document at a time (:class:`~lowrank_jax.data.corpus.CorpusStream`), tokenizes it in chunks and
writes each split as one token stream cut into fixed-size blocks of ``block_tokens`` tokens, one
ArrayRecord record per block (``group_size:1``, so any block is one random read), ``blocks_per_file``
blocks per file::

    DIR/manifest.json          format, corpus digest, tokenizer fingerprint, token and document counts, files
    DIR/tokenizer.json|.model  a copy of the tokenizer the ids came from
    DIR/unigram_counts.npy     int64 counts of each id in the training split (the unigram baseline)
    DIR/train-00000.arrayrecord, ...  DIR/val-00000.arrayrecord, ...

The stream is the same as :func:`~lowrank_jax.data.packing.encode_corpus` makes in memory: every
document's ids followed by ``eos``, in corpus order. Everything is written into a temporary sibling
directory that is renamed to ``DIR`` once the manifest is in it, so a directory with a manifest is
complete and an interrupted prepare leaves nothing that looks finished.

With ``data.shards = ""`` (the default) training prepares the shards itself, once, under
``<cache_dir>/shards/<corpus digest>-<tokenizer fingerprint>`` — the embedded stdlib corpus needs no
prepare step.

Training examples are the windows ``w_i = tokens[i*L : i*L + L + 1]`` of the training stream
(:class:`WindowSource`). :class:`ShardBatches` orders them with grain's index shuffle
(``MapDataset.range(n_windows).shuffle(seed).repeat()``: a fresh permutation every epoch, computed
per index in O(1) memory) and defines global batch ``t`` as the elements
``t*B .. t*B + B - 1`` of that order. Each process reads only its own rows of the global batch, and
batch ``t`` is a pure function of ``(t, seed)``: a run resumed at step ``k`` sees exactly the batches
of an uninterrupted one whatever the number of processes before and after, as long as
``batch_size``, ``seq_len``, ``seed`` and the shards are the same (the checkpointed
:meth:`ShardBatches.state_dict` is checked on resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lowrank_jax import storage
from lowrank_jax.data.corpus import SPLITS, stream_corpus
from lowrank_jax.data.packing import encoded_chunks, num_windows
from lowrank_jax.data.tokenizer import Tokenizer, atomic_write_bytes, get_tokenizer, load_tokenizer

if TYPE_CHECKING:  # annotations only: config imports this package's choice lists
    from lowrank_jax.config import DataConfig

FORMAT = "lowrank-jax-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
UNIGRAM = "unigram_counts.npy"
BLOCK_TOKENS = 16384  # tokens per ArrayRecord record
BLOCKS_PER_FILE = 4096  # records per file: 64M tokens, 128 MiB of uint16 ids
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: a block is one read, nothing to decode
MAX_WINDOWS = 2**32  # grain's index shuffle works on 32-bit indices


def _error(msg: str) -> ValueError:
    return ValueError(f"data.shards: {msg}")


def auto_dir(cfg: DataConfig, corpus_digest: str, fingerprint: str) -> Path:
    """Where training keeps the shards it prepares itself (``data.shards = ""``)."""
    return Path(cfg.cache_dir).expanduser() / "shards" / f"{corpus_digest}-{fingerprint}"


class _SplitWriter:
    """Appends ids to one split's stream, writing full blocks as records and rolling files."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, vocab_size: int, block: int, per_file: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.block, self.per_file = block, per_file
        self.buffer = np.zeros(0, dtype=dtype)
        self.files: list[dict[str, Any]] = []
        self.tokens = 0
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.hash = hashlib.sha256()  # of the ids as little-endian int32: independent of the file layout
        self._writer = None

    def _write_block(self, block: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self.files[-1]["records"] == self.per_file:
            self._close_file()
            name = f"{self.split}-{len(self.files):05d}.arrayrecord"
            self.files.append({"name": name, "records": 0, "tokens": 0})
            self._writer = ArrayRecordWriter(str(self.directory / name), WRITER_OPTIONS)
        self._writer.write(block.tobytes())
        self.files[-1]["records"] += 1
        self.files[-1]["tokens"] += int(block.size)

    def add(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        self.counts += np.bincount(ids, minlength=self.counts.size)
        self.tokens += int(ids.size)
        self.hash.update(ids.astype("<i4").tobytes())
        buf = np.concatenate([self.buffer, ids])
        n_full = buf.size // self.block
        for i in range(n_full):
            self._write_block(buf[i * self.block : (i + 1) * self.block])
        self.buffer = buf[n_full * self.block :].copy()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            f = self.files[-1]
            f["bytes"] = (self.directory / f["name"]).stat().st_size

    def close(self) -> dict[str, Any]:
        if self.buffer.size:
            self._write_block(self.buffer)
            self.buffer = self.buffer[:0]
        self._close_file()
        return {"tokens": self.tokens, "stream_digest": self.hash.hexdigest()[:16], "files": self.files}


def _encode_split(tok: Tokenizer, texts: Iterator[str], writer: _SplitWriter) -> tuple[int, int]:
    """Tokenize ``texts`` a chunk at a time into ``writer``; returns (documents, characters)."""
    counts = [0, 0]

    def counted() -> Iterator[str]:
        for text in texts:
            counts[0] += 1
            counts[1] += len(text)
            yield text

    for ids in encoded_chunks(tok, counted()):
        writer.add(ids)
    return counts[0], counts[1]


def prepare_shards(
    cfg: DataConfig,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
    block_tokens: int = BLOCK_TOKENS,
    blocks_per_file: int = BLOCKS_PER_FILE,
) -> Path | str:
    """Tokenize ``cfg``'s corpus into shards under ``out`` (default: ``data.shards``, else the cache); returns the dir.

    A directory that already holds a complete manifest for the same corpus digest and tokenizer is
    reused as it is. Memory use does not grow with the corpus: documents are read, encoded and
    written a chunk at a time.
    """
    stream = stream_corpus(cfg)
    t0 = time.time()
    digest = stream.digest()
    tok = get_tokenizer(cfg, stream, digest)
    where = str(out or cfg.shards or auto_dir(cfg, digest, tok.fingerprint))
    if storage.is_remote(where):
        return _prepare_remote(cfg, where, stream, digest, tok, log, block_tokens, blocks_per_file)
    target = Path(where).expanduser()
    if (target / MANIFEST).is_file():
        manifest = read_manifest(target)
        if manifest["corpus_digest"] == digest and manifest["tokenizer"]["fingerprint"] == tok.fingerprint:
            log(f"shards: {target} already holds corpus {digest} with tokenizer {tok.fingerprint}")
            return target
        raise _error(
            f"{str(target)!r} already holds other shards (corpus {manifest['corpus_digest']}, tokenizer "
            f"{manifest['tokenizer']['fingerprint']}); remove it or choose another directory"
        )
    if target.exists() and any(target.iterdir()):
        raise _error(f"{str(target)!r} exists, is not empty and has no {MANIFEST}; remove it or choose another")
    _write_shards(cfg, target, stream, digest, tok, log, block_tokens, blocks_per_file, t0)
    log(f"shards: wrote {target} in {time.time() - t0:.0f}s")
    return target


def _prepare_remote(cfg, url, stream, digest, tok, log, block_tokens, blocks_per_file) -> str:
    """Prepare into a local folder, then upload it to ``url`` (the manifest last: a remote directory with a
    manifest is complete, as a local one is)."""
    t0 = time.time()
    remote = storage.as_path(url)
    if (remote / MANIFEST).exists():
        manifest = json.loads((remote / MANIFEST).read_text())
        if (
            manifest.get("corpus_digest") == digest
            and manifest.get("tokenizer", {}).get("fingerprint") == tok.fingerprint
        ):
            log(f"shards: {url} already holds corpus {digest} with tokenizer {tok.fingerprint}")
            return url
        raise _error(f"{url!r} already holds other shards; remove them or choose another directory")
    if remote.exists() and any(remote.iterdir()):
        raise _error(f"{url!r} exists, is not empty and has no {MANIFEST}; remove it or choose another")
    staging = storage.mirror_dir(cfg.cache_dir, url) / "prepare"
    shutil.rmtree(staging, ignore_errors=True)
    _write_shards(cfg, staging, stream, digest, tok, log, block_tokens, blocks_per_file, t0)
    manifest_bytes = (staging / MANIFEST).read_bytes()
    (staging / MANIFEST).unlink()
    storage.upload_tree(staging, url)
    (remote / MANIFEST).write_bytes(manifest_bytes)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"shards: wrote {url} in {time.time() - t0:.0f}s")
    return url


def _write_shards(cfg, target: Path, stream, digest, tok, log, block_tokens, blocks_per_file, t0) -> None:
    """Write the shards into a temporary sibling of ``target`` and rename it to ``target`` when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.int32)
        splits: dict[str, Any] = {}
        counts = None
        for split in SPLITS:
            writer = _SplitWriter(tmp, split, dtype, tok.vocab_size, block_tokens, blocks_per_file)
            docs, chars = _encode_split(tok, stream.texts(split), writer)
            splits[split] = {**writer.close(), "docs": docs, "chars": chars}
            log(f"shards: {split} {docs:,} docs, {chars:,} chars -> {splits[split]['tokens']:,} tokens")
            if split == "train":
                counts = writer.counts
        np.save(tmp / UNIGRAM, counts, allow_pickle=False)
        tok_name = "tokenizer" + Path(tok.path).suffix
        shutil.copyfile(tok.path, tmp / tok_name)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "corpus": stream.name,
            "corpus_digest": digest,
            "tokenizer": {
                "fingerprint": tok.fingerprint,
                "file": tok_name,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
            },
            "dtype": dtype.name,
            "block_tokens": block_tokens,
            "splits": splits,
            "source": {"data_source": cfg.source, "max_docs": cfg.max_docs, "val_fraction": cfg.val_fraction},
            "prepare_seconds": round(time.time() - t0, 1),
        }
        atomic_write_bytes(str(tmp / MANIFEST), json.dumps(manifest, indent=1).encode())
        try:
            if target.exists():
                target.rmdir()  # an empty directory the user created
            os.replace(tmp, target)
        except OSError:
            if not (target / MANIFEST).is_file():  # not a concurrent prepare of the same shards that won
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory, with every listed file checked for presence and size."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise _error(f"no such directory {str(d)!r} (write it with `lowrank-jax prepare CONFIG data.shards={d}`)")
    path = d / MANIFEST
    if not path.is_file():
        raise _error(f"{str(d)!r} has no {MANIFEST}: not a shard directory, or an unfinished prepare (run it again)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _error(f"{str(path)!r} is not readable JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise _error(f"{str(path)!r} is not a version-{VERSION} {FORMAT} manifest")
    for split in SPLITS:
        for f in manifest["splits"][split]["files"]:
            p = d / f["name"]
            if not p.is_file():
                raise _error(f"shard {f['name']!r} listed in {str(path)!r} is missing")
            size = p.stat().st_size
            if size != f["bytes"]:
                raise _error(f"shard {str(p)!r} has {size} bytes, the manifest says {f['bytes']} (partial copy?)")
    for name in (UNIGRAM, manifest["tokenizer"]["file"]):
        if not (d / name).is_file():
            raise _error(f"{name!r} listed in {str(path)!r} is missing")
    return manifest


class TokenStream:
    """One split's token stream read from its shards: ``read(start, stop)`` is ``tokens[start:stop]`` as int32."""

    def __init__(self, directory: Path, manifest: dict[str, Any], split: str):
        import grain

        info = manifest["splits"][split]
        self.split = split
        self.n_tokens = int(info["tokens"])
        self.block = int(manifest["block_tokens"])
        self.dtype = np.dtype(manifest["dtype"])
        self.digest = info["stream_digest"]
        paths = [str(directory / f["name"]) for f in info["files"]]
        self._records = grain.sources.ArrayRecordDataSource(paths) if paths else []

    def __len__(self) -> int:
        return self.n_tokens

    def _block(self, b: int) -> np.ndarray:
        return np.frombuffer(self._records[b], dtype=self.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"read({start}, {stop}) outside the {self.split} stream of {self.n_tokens} tokens")
        if start == stop:
            return np.zeros(0, dtype=np.int32)
        b0, b1 = start // self.block, (stop - 1) // self.block
        parts = [self._block(b) for b in range(b0, b1 + 1)]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        lo = start - b0 * self.block
        return flat[lo : lo + stop - start].astype(np.int32)


class WindowSource:
    """The training windows of a stream, by index: item ``i`` is ``tokens[i*L : i*L+L+1]``."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.n = num_windows(stream.n_tokens, seq_len)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return self.stream.read(start, start + self.seq_len + 1)


@dataclass
class TokenShards:
    """An opened shard directory: both streams, the tokenizer and the unigram counts of the training split."""

    directory: Path
    manifest: dict[str, Any]
    train: TokenStream
    val: TokenStream
    tokenizer: Tokenizer

    @property
    def digest(self) -> str:
        """The corpus digest (what the checkpoints record as ``data_digest``)."""
        return self.manifest["corpus_digest"]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def unigram_counts(self) -> np.ndarray:
        return np.load(self.directory / UNIGRAM, allow_pickle=False)

    def val_prefix(self, n_tokens: int) -> np.ndarray:
        """The first ``n_tokens`` tokens of the validation stream (fewer if it is shorter)."""
        return self.val.read(0, min(n_tokens, self.val.n_tokens))


def open_shards(directory: str | Path, tokenizer_path: str = "") -> TokenShards:
    """Open a complete shard directory; ``tokenizer_path`` (``data.tokenizer``), if given, must be its tokenizer."""
    d = Path(directory).expanduser()
    manifest = read_manifest(d)
    expected = manifest["tokenizer"]["fingerprint"]
    if tokenizer_path:
        given = load_tokenizer(tokenizer_path)
        if given.fingerprint != expected:
            raise ValueError(
                f"data.tokenizer: {tokenizer_path!r} (fingerprint {given.fingerprint}) is not the tokenizer the "
                f"shards in {str(d)!r} were made with ({expected}); drop data.tokenizer or prepare the shards again"
            )
    tok = load_tokenizer(str(d / manifest["tokenizer"]["file"]))
    if tok.fingerprint != expected:
        raise _error(f"the tokenizer file in {str(d)!r} does not match its manifest (fingerprint {tok.fingerprint})")
    return TokenShards(d, manifest, TokenStream(d, manifest, "train"), TokenStream(d, manifest, "val"), tok)


def load_shards(cfg: DataConfig, log: Callable[[str], None] = print) -> TokenShards:
    """The shards training reads: ``data.shards`` if set, else the cache's (prepared now if absent)."""
    tokenizer = cfg.tokenizer
    if tokenizer and storage.is_remote(tokenizer):
        tokenizer = storage.local_file(tokenizer, cfg.cache_dir)
    if cfg.shards:
        directory = cfg.shards
        if storage.is_remote(directory):  # array_record reads local files only: a checked copy per host
            directory = storage.local_copy(directory, cfg.cache_dir, "data.shards")
        return open_shards(directory, tokenizer)
    return open_shards(prepare_shards(cfg, log=log))


class ShardBatches:
    """Global batch ``t`` = windows ``order[t*B : (t+1)*B]`` of grain's shuffled, repeated window dataset.

    ``rows`` selects the rows of the global batch this process reads (all by default). See the
    module docstring for the exactness guarantees.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int, rows: slice | None = None):
        import grain

        if batch_size <= 0:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        if seq_len <= 0:
            raise ValueError(f"seq_len: must be positive, got {seq_len}")
        self.source = WindowSource(stream, seq_len)
        if len(self.source) < 1:
            raise ValueError(
                f"seq_len: the {stream.split} stream ({stream.n_tokens} tokens) is too short for one window of "
                f"seq_len+1={seq_len + 1} tokens"
            )
        if len(self.source) >= MAX_WINDOWS:
            raise ValueError(f"seq_len: {len(self.source):,} windows exceed grain's 32-bit index shuffle")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rows = range(batch_size)[rows or slice(None)]
        self.stream_digest = stream.digest
        # element j of the run's window order: epoch j // n, shuffled with seed + epoch (grain's index shuffle)
        self.order = grain.MapDataset.range(len(self.source)).shuffle(seed=seed % 2**32).repeat()

    @property
    def n_windows(self) -> int:
        return len(self.source)

    def window_indices(self, step: int) -> np.ndarray:
        """Indices (into the training stream's windows) of this process's rows of global batch ``step``."""
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        base = step * self.batch_size
        return np.array([self.order[base + r] for r in self.rows], dtype=np.int64)

    def batch(self, step: int) -> np.ndarray:
        """int32 ``[len(rows), seq_len + 1]``: this process's rows of global batch ``step``."""
        return np.stack([self.source[i] for i in self.window_indices(step)])

    def iterate(self, start: int, stop: int, threads: int = 2, prefetch: int = 4) -> Iterator[np.ndarray]:
        """Batches ``start .. stop - 1`` in order, read ahead by grain worker threads."""
        import grain

        steps = grain.MapDataset.range(start, stop).map(self.batch)
        return iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))

    def state_dict(self, step: int) -> dict[str, Any]:
        """What the checkpoint records about the data position before ``step`` runs."""
        return {
            "step": step,
            "windows_consumed": step * self.batch_size,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "stream_digest": self.stream_digest,
        }

    def check_state(self, state: dict[str, Any], step: int) -> None:
        """Refuse to resume at ``step`` from a checkpoint whose data position this loader cannot continue."""
        for key, value in self.state_dict(step).items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"resume: the checkpoint's data loader has {key}={state[key]!r}, this run {value!r} "
                    "(the same shards, batch_size, seq_len and seed continue a run exactly)"
                )
