"""Token streams, packed training batches, the fixed held-out set and the unigram baseline.

Each split is one int32 stream: every document's ids followed by ``eos``, concatenated in corpus
order (:func:`encode_corpus`). Training examples are the non-overlapping windows
``w_i = tokens[i*L : i*L + L + 1]`` (inputs ``w[:-1]``, targets ``w[1:]``), ``n = (N - 1) // L`` of
them. :class:`BatchIterator` draws them without replacement inside an epoch; batch ``t`` is a pure
function of ``(t, seed)``::

    j = t * B + b                                   # global example index, b < B
    window = perm_e[j mod n],  e = j div n,  perm_e = default_rng([seed, e]).permutation(n)

so a run resumed at step ``k`` sees exactly the batches an uninterrupted run would. The held-out set
(:func:`eval_batches`) is the first ``max_tokens`` target tokens of the validation stream, and
:func:`unigram_cross_entropy` is the add-one unigram baseline every trained model must beat.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lowrank_jax.data.corpus import load_corpus
from lowrank_jax.data.tokenizer import Tokenizer, atomic_write_bytes, get_tokenizer

if TYPE_CHECKING:  # annotations only: config imports this package's choice lists
    from lowrank_jax.config import DataConfig

ENCODE_CHUNK_CHARS = 4_000_000  # characters handed to one encode_batch call


def encoded_chunks(tokenizer: Tokenizer, docs: Iterable[str]) -> Iterator[np.ndarray]:
    """The stream of :func:`encode_corpus` in pieces: one int64 array per ~``ENCODE_CHUNK_CHARS`` characters of docs."""
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    chunk: list[str] = []
    size = 0

    def encoded() -> np.ndarray:
        parts = [p for ids in tokenizer.encode_batch(chunk) for p in (np.asarray(ids, dtype=np.int64), eos)]
        chunk.clear()
        return np.concatenate(parts)

    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= ENCODE_CHUNK_CHARS:
            yield encoded()
            size = 0
    if chunk:
        yield encoded()


def encode_corpus(tokenizer: Tokenizer, docs: Sequence[str]) -> np.ndarray:
    """One int32 stream: each document's ids followed by ``tokenizer.eos_id``, in order."""
    parts = list(encoded_chunks(tokenizer, docs))
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), dtype=np.int32)


@dataclass
class TokenData:
    """Encoded splits of a corpus and the tokenizer that produced them."""

    train: np.ndarray  # int32 [N_train]
    val: np.ndarray  # int32 [N_val]
    tokenizer: Tokenizer
    digest: str  # the corpus digest (Corpus.digest); info["tokenizer"] is the tokenizer fingerprint
    vocab_size: int
    info: dict[str, Any] = field(default_factory=dict)


def _save_npy(path: str, arr: np.ndarray) -> None:
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def token_cache_paths(cfg: DataConfig, corpus_digest: str, fingerprint: str) -> dict[str, str]:
    stem = os.path.join(os.path.expanduser(cfg.cache_dir), "tokens", f"{corpus_digest}-{fingerprint}")
    return {"train": stem + ".train.npy", "val": stem + ".val.npy", "info": stem + ".json"}


def prepare_data(cfg: DataConfig) -> TokenData:
    """Load the corpus, get its tokenizer and encode both splits; encoded splits are cached as .npy."""
    corpus = load_corpus(cfg)
    tok = get_tokenizer(cfg, corpus)
    paths = token_cache_paths(cfg, corpus.digest, tok.fingerprint)
    cached = all(os.path.isfile(paths[k]) for k in ("train", "val"))
    if cached:
        train = np.load(paths["train"], allow_pickle=False)
        val = np.load(paths["val"], allow_pickle=False)
    else:
        train = encode_corpus(tok, corpus.train)
        val = encode_corpus(tok, corpus.val)
        # val first: the presence of the train file is not enough to declare a hit.
        _save_npy(paths["val"], val)
        _save_npy(paths["train"], train)
    info = {
        "corpus": corpus.name,
        "corpus_digest": corpus.digest,
        "tokenizer": tok.fingerprint,
        "tokenizer_path": tok.path,
        "vocab_size": tok.vocab_size,
        "train_docs": len(corpus.train),
        "val_docs": len(corpus.val),
        "train_chars": sum(len(d) for d in corpus.train),
        "val_chars": sum(len(d) for d in corpus.val),
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
    }
    if not cached:
        atomic_write_bytes(paths["info"], json.dumps(info, indent=1).encode())
    info["cached"] = cached
    return TokenData(train=train, val=val, tokenizer=tok, digest=corpus.digest, vocab_size=tok.vocab_size, info=info)


def num_windows(n_tokens: int, seq_len: int) -> int:
    """How many non-overlapping ``seq_len + 1`` windows (stride ``seq_len``) fit in ``n_tokens``."""
    return max(0, (n_tokens - 1) // seq_len)


class BatchIterator:
    """Deterministic, resumable batches of ``seq_len + 1`` token windows; ``batch(step)`` is pure in (step, seed).

    Iterating yields ``batch(step)`` for ``step = start_step, start_step + 1, ...`` and advances
    :attr:`step`; resuming a run is constructing the iterator with the same arguments and
    ``start_step=k`` (or calling :meth:`load_state_dict`).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, start_step: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        if seq_len <= 0:
            raise ValueError(f"seq_len: must be positive, got {seq_len}")
        if start_step < 0:
            raise ValueError(f"start_step: must be >= 0, got {start_step}")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens: expected a 1-D stream, got shape {tokens.shape}")
        self.n_windows = num_windows(tokens.size, seq_len)
        if self.n_windows < 1:
            raise ValueError(
                f"seq_len: the token stream ({tokens.size} tokens) is too short for one window of "
                f"seq_len+1={seq_len + 1} tokens"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.step = start_step
        self._perms: dict[int, np.ndarray] = {}
        self._offsets = np.arange(seq_len + 1)

    @property
    def steps_per_epoch(self) -> float:
        return self.n_windows / self.batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of ``epoch`` (the current and previous epochs are cached)."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def window_indices(self, step: int) -> np.ndarray:
        """Indices of the windows in batch ``step`` (shape ``[batch_size]``)."""
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        j = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, pos = np.divmod(j, self.n_windows)
        out = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[pos[sel]]
        return out

    def batch(self, step: int) -> np.ndarray:
        """int32 ``[batch_size, seq_len + 1]``: the windows of batch ``step``."""
        starts = self.window_indices(step) * self.seq_len
        return np.asarray(self.tokens[starts[:, None] + self._offsets[None, :]], dtype=np.int32)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state["step"]``; the other entries must match this iterator's arguments."""
        for key in ("seed", "batch_size", "seq_len", "n_windows"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"{key}: checkpointed iterator has {state[key]}, this one {getattr(self, key)}")
        self.step = int(state["step"])


def eval_batches(tokens: np.ndarray, seq_len: int, max_tokens: int, batch_size: int) -> list[np.ndarray]:
    """The fixed held-out set: consecutive windows (stride ``seq_len``) scoring the first ``max_tokens`` targets.

    ``n = min(max_tokens // seq_len, (len(tokens) - 1) // seq_len)`` windows are taken, so the
    targets are ``tokens[1 : n*seq_len + 1]``; they are grouped into batches of ``batch_size`` (the
    last one may be smaller).
    """
    if seq_len <= 0 or batch_size <= 0 or max_tokens <= 0:
        raise ValueError(
            f"eval_batches: seq_len, max_tokens and batch_size must be positive, got "
            f"{seq_len}, {max_tokens}, {batch_size}"
        )
    tokens = np.asarray(tokens)
    n = min(max_tokens // seq_len, num_windows(tokens.size, seq_len))
    if n < 1:
        raise ValueError(
            f"eval_tokens: no evaluation window of seq_len+1={seq_len + 1} tokens (max_tokens={max_tokens}, "
            f"validation stream has {tokens.size} tokens)"
        )
    starts = np.arange(n, dtype=np.int64) * seq_len
    windows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]], dtype=np.int32)
    return [windows[i : i + batch_size] for i in range(0, n, batch_size)]


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Nats/token on ``val`` of the add-one-smoothed unigram model fitted on ``train``."""
    train = np.asarray(train)
    if train.size and (train.min() < 0 or train.max() >= vocab_size):
        raise ValueError(f"train: token ids must lie in [0, vocab_size={vocab_size})")
    return unigram_cross_entropy_from_counts(np.bincount(train, minlength=vocab_size), val)


def unigram_cross_entropy_from_counts(counts: np.ndarray, val: np.ndarray) -> float:
    """:func:`unigram_cross_entropy` from the training split's id counts (``len(counts)`` is the vocabulary)."""
    counts, val = np.asarray(counts), np.asarray(val)
    vocab_size = counts.size
    if val.size == 0:
        raise ValueError("val: empty token stream")
    if val.min() < 0 or val.max() >= vocab_size:
        raise ValueError(f"val: token ids must lie in [0, vocab_size={vocab_size})")
    logp = np.log(counts.astype(np.float64) + 1.0) - np.log(counts.sum() + vocab_size)
    return float(-logp[val].mean())
