"""Data pipeline: corpora, tokenizers, packed token streams and deterministic resumable batches.

Training reads pre-tokenized shards (:mod:`lowrank_jax.data.shards`: ``prepare_shards`` writes them,
``load_shards`` opens or prepares them, ``ShardBatches`` streams the global batches through grain).
The in-memory path below serves the analyses and tests on small corpora:
``prepare_data(cfg.data)`` returns both encoded splits and the tokenizer; ``BatchIterator`` draws
training batches as a pure function of ``(step, seed)``; ``eval_batches`` is the fixed held-out
set; ``unigram_cross_entropy`` is the baseline a trained model must beat.
"""

from lowrank_jax.data.corpus import Corpus, load_corpus
from lowrank_jax.data.packing import (
    BatchIterator,
    TokenData,
    encode_corpus,
    eval_batches,
    prepare_data,
    unigram_cross_entropy,
    unigram_cross_entropy_from_counts,
)
from lowrank_jax.data.shards import ShardBatches, TokenShards, load_shards, open_shards, prepare_shards
from lowrank_jax.data.tokenizer import Tokenizer, get_tokenizer, load_tokenizer

__all__ = [
    "BatchIterator",
    "Corpus",
    "TokenData",
    "Tokenizer",
    "encode_corpus",
    "eval_batches",
    "get_tokenizer",
    "load_corpus",
    "load_tokenizer",
    "prepare_data",
    "unigram_cross_entropy",
    "unigram_cross_entropy_from_counts",
    "ShardBatches",
    "TokenShards",
    "load_shards",
    "open_shards",
    "prepare_shards",
]
