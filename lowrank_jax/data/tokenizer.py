"""Tokenizers: a byte-level BPE trained on the corpus, or a SentencePiece / HF ``tokenizer.json`` file.

With ``data.tokenizer = ""`` a byte-level BPE (GPT-2 style pre-tokenizer, all 256 byte symbols in
the initial alphabet, so every string round-trips exactly) with ``data.vocab_size`` entries is
trained with the HF ``tokenizers`` library on the first ``data.tokenizer_train_chars`` characters
of the *training* split, in corpus order. The special token ``<|eos|>`` (id 0) separates
documents. The result is cached as
``<cache_dir>/tokenizers/<corpus digest>-<vocab_size>-<train_chars>.json`` and reused; training is
deterministic, so the file bytes are the same on every machine for the same corpus.

:attr:`Tokenizer.fingerprint` (sha256 of the tokenizer file, 16 hex chars) names the token
caches built with a tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from lowrank_jax import storage
from lowrank_jax.data.corpus import Corpus, CorpusStream

if TYPE_CHECKING:  # annotations only: config imports this package's choice lists
    from lowrank_jax.config import DataConfig

EOS = "<|eos|>"
# End-of-document tokens recognised in user-supplied tokenizer.json files, in order of preference.
EOS_CANDIDATES = (EOS, "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class Tokenizer:
    """Common interface of the tokenizer backends: ids are plain ``int``; no BOS/EOS is added by ``encode``."""

    vocab_size: int
    eos_id: int
    fingerprint: str  # stable id of the tokenizer file (cache keys)
    path: str  # file the tokenizer was loaded from

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"fingerprint={self.fingerprint}, path={self.path!r})"
        )


def file_fingerprint(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


class HFTokenizer(Tokenizer):
    """A HF ``tokenizers`` tokenizer read from a ``tokenizer.json`` file."""

    def __init__(self, path: str):
        import tokenizers

        self.path = path
        self._tok = tokenizers.Tokenizer.from_file(path)
        # Special-token strings inside documents are encoded as plain text, so eos only ever marks
        # a document boundary added by the packer.
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(t) for t in EOS_CANDIDATES]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise ValueError(f"data.tokenizer: {path!r} has none of the end-of-document tokens {EOS_CANDIDATES}")
        self.eos_id = ids[0]
        self.fingerprint = file_fingerprint(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file; its own ``</s>`` is the end-of-document token."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"data.tokenizer: SentencePiece model {path!r} has no eos piece (eos_id=-1)")
        self.fingerprint = file_fingerprint(path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a SentencePiece ``.model`` or an HF ``.json`` file."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ValueError(f"data.tokenizer: no such file {path!r}")
    kinds = {".model": (SentencePieceTokenizer, "SentencePiece model"), ".json": (HFTokenizer, "tokenizer.json")}
    kind = next((v for ext, v in kinds.items() if path.endswith(ext)), None)
    if kind is None:
        raise ValueError(f"data.tokenizer: expected a SentencePiece .model or a tokenizer .json file, got {path!r}")
    cls, what = kind
    try:
        return cls(path)
    except ValueError:
        raise
    except Exception as e:  # the libraries raise bare Exception / RuntimeError on a bad file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"data.tokenizer: {path!r} is not a readable {what} ({reason})") from None


def training_text(docs: Iterable[str], max_chars: int) -> Iterator[str]:
    """The first ``max_chars`` characters of ``docs`` (in order), one string per document."""
    left = max_chars
    for doc in docs:
        if left <= 0:
            return
        piece = doc[:left]
        left -= len(piece)
        if piece:
            yield piece


def train_bpe_json(docs: Iterable[str], vocab_size: int, max_chars: int) -> str:
    """Train the byte-level BPE and return its ``tokenizer.json`` text (deterministic for fixed inputs)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(docs, max_chars), trainer=trainer)
    return tok.to_str(pretty=True)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def tokenizer_cache_path(cfg: DataConfig, corpus: Corpus | CorpusStream, digest: str | None = None) -> str:
    digest = digest or (corpus.digest if isinstance(corpus, Corpus) else corpus.digest())
    root = os.path.expanduser(cfg.cache_dir)
    return os.path.join(root, "tokenizers", f"{digest}-{cfg.vocab_size}-{cfg.tokenizer_train_chars}.json")


def get_tokenizer(cfg: DataConfig, corpus: Corpus | CorpusStream | None, digest: str | None = None) -> Tokenizer:
    """The tokenizer named by ``cfg.tokenizer``, or the corpus BPE (trained once, then read from the cache).

    ``corpus`` is an in-memory :class:`Corpus` or a :class:`CorpusStream` (then only the first
    ``tokenizer_train_chars`` characters of its training split are read); ``digest``, when known,
    saves the stream a digest pass.
    """
    if cfg.tokenizer:
        if storage.is_remote(cfg.tokenizer):
            return load_tokenizer(storage.local_file(cfg.tokenizer, cfg.cache_dir))
        return load_tokenizer(cfg.tokenizer)
    if cfg.vocab_size < 256 + 1:
        raise ValueError(f"data.vocab_size: a byte-level BPE needs at least 257 entries, got {cfg.vocab_size}")
    path = tokenizer_cache_path(cfg, corpus, digest)
    if not os.path.isfile(path):
        docs = corpus.train if isinstance(corpus, Corpus) else corpus.texts("train")
        text = train_bpe_json(docs, cfg.vocab_size, cfg.tokenizer_train_chars)
        atomic_write_bytes(path, text.encode("utf-8"))
    return HFTokenizer(path)
