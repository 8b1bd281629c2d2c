"""LLaMA-family shapes: grouped-query attention, explicit head_dim, tied embeddings, Llama-3 rope scaling."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.config import Config, ConfigError, ModelConfig, load_config
from lowrank_jax.models import abstract_params, build_model, flops, formula_param_count, param_report, split_model
from lowrank_jax.models.llama import rope_frequencies

BASE = ModelConfig(vocab_size=61, hidden=32, ffn=40, heads=4, layers=2, max_seq_len=32)


def _logits(cfg, params, tokens):
    from flax import nnx

    graphdef, _ = abstract_params(cfg)
    return np.asarray(nnx.merge(graphdef, params)(tokens))


def _tokens(seed=0, shape=(2, 11)):
    return jax.random.randint(jax.random.key(seed), shape, 0, 61)


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    """A GQA model is the MHA model whose k/v heads are copies of the shared head of their group."""
    gqa = dataclasses.replace(BASE, num_kv_heads=2, scan_layers=False)
    _, params = split_model(build_model(gqa, 3))
    hd, groups = gqa.head_size, gqa.heads // gqa.kv_heads
    mha = dataclasses.replace(gqa, num_kv_heads=0)
    blocks = {}
    for i, layer in params["blocks"].items():
        attn = dict(layer["attn"])
        for name in ("k", "v"):
            w = np.asarray(attn[name]["kernel"]).reshape(gqa.hidden, gqa.kv_heads, hd)
            attn[name] = {"kernel": jnp.asarray(np.repeat(w, groups, axis=1).reshape(gqa.hidden, -1))}
        blocks[i] = {**layer, "attn": attn}
    x = _tokens(1)
    np.testing.assert_allclose(
        _logits(gqa, params, x), _logits(mha, {**params, "blocks": blocks}, x), rtol=1e-5, atol=1e-5
    )


def test_tied_embeddings_equal_an_lm_head_holding_the_embedding():
    tied = dataclasses.replace(BASE, tie_embeddings=True, num_kv_heads=1)
    _, params = split_model(build_model(tied, 5))
    assert "lm_head" not in params
    untied = dataclasses.replace(tied, tie_embeddings=False)
    with_head = {**params, "lm_head": {"kernel": params["embed"].T}}
    x = _tokens(2)
    np.testing.assert_allclose(_logits(tied, params, x), _logits(untied, with_head, x), rtol=1e-5, atol=1e-5)


def test_explicit_head_dim_shapes_and_counts():
    cfg = dataclasses.replace(BASE, head_dim=6, num_kv_heads=2)
    _, params = abstract_params(cfg)
    attn = params["blocks"]["attn"]
    assert attn["q"]["kernel"].shape == (2, 32, 24) and attn["k"]["kernel"].shape == (2, 32, 12)
    assert attn["o"]["kernel"].shape == (2, 24, 32)
    for variant in (cfg, dataclasses.replace(cfg, tie_embeddings=True), BASE):
        assert param_report(variant)["params"] == formula_param_count(variant)
    out = build_model(cfg, 0)(_tokens(3))
    assert out.shape == (2, 11, 61) and np.isfinite(np.asarray(out)).all()


def test_llama3_rope_frequencies_match_the_published_rule():
    cfg = dataclasses.replace(
        BASE, rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=64, rope_theta=500000.0, hidden=64
    )
    hd = 16
    got = np.asarray(rope_frequencies(hd, cfg.rope_theta, cfg), np.float64)
    base = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    want = []
    for f in base:  # Llama 3.1: keep high frequencies, divide low ones by the factor, interpolate between
        wavelen = 2 * math.pi / f
        if wavelen < 64 / 4.0:
            want.append(f)
        elif wavelen > 64 / 1.0:
            want.append(f / 8.0)
        else:
            s = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want.append((1 - s) * f / 8.0 + s * f)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    kinds = {"kept": np.isclose(got, base, rtol=1e-5), "divided": np.isclose(got, base / 8, rtol=1e-5)}
    assert kinds["kept"].any() and kinds["divided"].any() and (~kinds["kept"] & ~kinds["divided"]).any()
    np.testing.assert_allclose(np.asarray(rope_frequencies(hd, 500000.0)), base, rtol=1e-6)


def test_presets_match_the_published_parameter_counts():
    # SmolLM2-135M: 134,515,008; Llama-3.2-1B: 1,235,814,400 (the model cards' safetensors totals)
    for name, published in (("smollm2_135m", 134_515_008), ("llama_3_2_1b", 1_235_814_400)):
        cfg = load_config(name).model
        assert param_report(cfg)["params"] == formula_param_count(cfg) == published


def test_gqa_flops_hand_computation():
    cfg = ModelConfig(vocab_size=100, hidden=64, ffn=96, heads=8, num_kv_heads=2, layers=3, tie_embeddings=True)
    # per layer: q,o 64x64 each, k,v 64x16 each, gate/up/down 64x96: 2*4096 + 2*1024 + 3*6144 = 28672 MACs
    assert flops.linear_flops_per_token(cfg) == 2 * (3 * 28672 + 64 * 100)
    assert flops.attention_flops_per_token(cfg, 16) == 3 * 2 * (2 * 16 * 64)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_kv_heads=3), r"^model\.num_kv_heads: 3 does not divide heads=4"),
        (dict(num_kv_heads=8), r"^model\.num_kv_heads: 8 does not divide heads=4"),
        (dict(head_dim=7), r"^model\.head_dim: must be even for rotary embeddings, got 7"),
        (dict(norm_eps=1.0), r"^model\.norm_eps: must be"),
        (dict(num_kv_heads=-1), r"^model\.num_kv_heads: must be >= 0"),
        (dict(rope_scaling="yarn"), r"^model\.rope_scaling: must be one of"),
        (dict(rope_scaling="llama3", rope_low_freq_factor=4.0), r"^model\.rope_high_freq_factor: must exceed"),
        (dict(rope_factor=0.5), r"^model\.rope_factor: must be >= 1"),
    ],
)
def test_bad_shapes_are_one_line_errors(changes, message):
    with pytest.raises(ConfigError, match=message) as e:
        Config(model=dataclasses.replace(ModelConfig(), **changes))
    assert "\n" not in str(e.value)


def test_head_dim_lifts_the_divisibility_rule():
    cfg = Config(model=ModelConfig(hidden=30, heads=4, head_dim=8, num_kv_heads=2))
    assert (cfg.model.head_size, cfg.model.kv_heads) == (8, 2)
