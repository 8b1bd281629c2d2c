"""Tiny random LLaMA checkpoints written by transformers itself (no download), shared by the hf tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96
# name -> LlamaConfig keywords (every variant tiny: hidden 32, 2 layers)
VARIANTS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied_llama3": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "head_dim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12, tie_word_embeddings=False),
}


def hf_config(variant: str, vocab: int = VOCAB, **changes):
    kw = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        **VARIANTS[variant],
    )
    kw.update(changes)
    return transformers.LlamaConfig(**kw)


def make_checkpoint(path: Path, variant: str, seed: int = 0, **save_kwargs):
    """A random ``LlamaForCausalLM`` of ``variant`` saved at ``path`` (norm scales randomised too)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(variant)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path, **save_kwargs)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``{variant: (directory, transformers model)}`` for every variant."""
    root = tmp_path_factory.mktemp("hf_checkpoints")
    return {v: (root / v, make_checkpoint(root / v, v, seed=i)) for i, v in enumerate(VARIANTS)}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def write_word_tokenizer(directory: Path) -> Path:
    """A word-level ``tokenizer.json`` over :data:`WORDS` plus ``</s>`` and ``<unk>`` (``VOCAB`` ids)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {"</s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    path = Path(directory) / "tokenizer.json"
    tok.save(str(path))
    return path


def word_text(seed: int, n: int) -> str:
    """``n`` words drawn from a skewed distribution (so a model can do better than uniform)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(WORDS) + 1)
    return " ".join(rng.choice(WORDS, size=n, p=p / p.sum()))


@pytest.fixture(scope="session")
def with_tokenizer(tmp_path_factory):
    """``(directory, transformers model)``: a GQA checkpoint with a word-level tokenizer.json."""
    path = tmp_path_factory.mktemp("hf_tok") / "gqa"
    model = make_checkpoint(path, "gqa_tied_llama3", seed=11)
    write_word_tokenizer(path)
    return path, model
