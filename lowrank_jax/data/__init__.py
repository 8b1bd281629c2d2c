"""Data pipeline: corpora, tokenizers, packed token streams and deterministic resumable batches.

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
)
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
]
