"""LLaMA model: causality, parameter counts, logical axes, scan/non-scan equivalence, overfitting."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from lowrank_jax.config import ModelConfig, load_config, named_configs
from lowrank_jax.models import (
    build_model,
    count_bytes,
    formula_param_count,
    logical_axes,
    param_labels,
    param_report,
    split_model,
)
from lowrank_jax.models.llama import apply_rope, rope_tables
from lowrank_jax.train.step import cross_entropy

SMALL = ModelConfig(vocab_size=97, hidden=32, ffn=48, heads=4, layers=3, max_seq_len=16)


def _tokens(key, shape, vocab=97):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab)


def test_causality_future_tokens_do_not_change_past_logits():
    model = build_model(SMALL, 0)
    tok = _tokens(1, (2, 12))
    changed = tok.at[:, 7:].set((tok[:, 7:] + 5) % 97)
    a, b = model(tok), model(changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


@pytest.mark.parametrize("name", named_configs())
def test_param_count_of_every_named_config_matches_formula(name):
    cfg = load_config(name).model
    if cfg.vocab_size == 0:
        cfg = dataclasses.replace(cfg, vocab_size=load_config(name).data.vocab_size)
    report = param_report(cfg)
    assert report["params"] == formula_param_count(cfg)
    assert report["param_bytes"] == 4 * report["params"]


def test_paper_config_sizes():
    # SLTrain's counts for the dense baselines (vocab 32000): 60M 58.1M, 130M 134.1M, 350M 368.0M, 1B 1339M, 7B 6738M.
    expected = {
        "llama_60m": 58.1e6,
        "llama_130m": 134.1e6,
        "llama_350m": 368.0e6,
        "llama_1b": 1339e6,
        "llama_7b": 6738e6,
    }
    for name, n in expected.items():
        got = formula_param_count(load_config(name).model)
        assert abs(got - n) / n < 0.002, (name, got)


def test_every_param_has_logical_axes_and_scan_adds_layers():
    axes = logical_axes(SMALL)
    known = {"embed", "mlp", "heads", "kv", "vocab", "layers"}
    _, abstract = split_model(nnx.eval_shape(lambda: build_model(SMALL, 0)))
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_params = jax.tree.leaves(abstract)
    assert len(flat_axes) == len(flat_params)
    for spec, p in zip(flat_axes, flat_params, strict=True):
        assert len(spec) == p.ndim and set(spec) <= known, (spec, p.shape)
    assert axes["blocks"]["attn"]["q"]["kernel"] == PartitionSpec("layers", "embed", "heads")
    assert axes["blocks"]["mlp"]["down"]["kernel"] == PartitionSpec("layers", "mlp", "embed")
    assert axes["embed"] == PartitionSpec("vocab", "embed")
    no_scan = logical_axes(dataclasses.replace(SMALL, scan_layers=False))
    assert no_scan["blocks"][0]["attn"]["q"]["kernel"] == PartitionSpec("embed", "heads")
    labels = param_labels(SMALL)
    assert set(jax.tree.leaves(labels)) == {"Param"}


def _unstack(params_scan, layers):
    blocks = params_scan["blocks"]
    out = dict(params_scan)
    out["blocks"] = {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(layers)}
    return out


@pytest.mark.parametrize("remat", [pytest.param(False, marks=pytest.mark.slow), True])  # 14 s each
def test_scan_and_loop_paths_agree(remat):
    cfg = dataclasses.replace(SMALL, remat=remat)
    g_scan, p_scan = split_model(build_model(cfg, 0))
    g_loop, _ = split_model(build_model(dataclasses.replace(cfg, scan_layers=False), 0))
    p_loop = _unstack(p_scan, cfg.layers)
    tok = _tokens(2, (2, 10))

    def loss(g, p):
        return cross_entropy(nnx.merge(g, p)(tok[:, :-1]), tok[:, 1:])

    l1, g1 = jax.value_and_grad(lambda p: loss(g_scan, p))(p_scan)
    l2, g2 = jax.value_and_grad(lambda p: loss(g_loop, p))(p_loop)
    assert float(l1) == pytest.approx(float(l2), rel=1e-5)
    for a, b in zip(jax.tree.leaves(_unstack(g1, cfg.layers)), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_tiny_model_overfits_one_batch():
    g, p = split_model(build_model(SMALL, 0))
    tok = _tokens(3, (4, 16))
    tx = optax.adam(1e-2)
    opt = tx.init(p)

    @jax.jit
    def step(p, opt):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(nnx.merge(g, p)(tok[:, :-1]), tok[:, 1:]))(p)
        upd, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    first = None
    for _ in range(150):
        p, opt, loss = step(p, opt)
        first = float(loss) if first is None else first
    assert first > 4.0 and float(loss) < 0.1


def test_bf16_compute_runs_and_tracks_fp32():
    tok = _tokens(4, (2, 12))
    f32 = build_model(SMALL, 0)(tok)
    bf16 = build_model(dataclasses.replace(SMALL, dtype="bfloat16"), 0)(tok)
    assert bf16.dtype == jnp.float32  # logits are returned in float32
    assert np.abs(np.asarray(bf16 - f32)).max() < 0.05
    params16 = split_model(build_model(dataclasses.replace(SMALL, param_dtype="bfloat16"), 0))[1]
    assert count_bytes(params16) * 2 == count_bytes(split_model(build_model(SMALL, 0))[1])


def test_rope_preserves_norm_and_relative_positions():
    cos, sin = rope_tables(8, 16, 10000.0)
    x = jax.random.normal(jax.random.key(5), (1, 8, 2, 16))
    y = apply_rope(x, cos, sin)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # <R_m q, R_n k> depends on m - n only.
    q = jax.random.normal(jax.random.key(6), (16,))
    k = jax.random.normal(jax.random.key(7), (16,))
    rot = lambda v, pos: apply_rope(jnp.broadcast_to(v, (1, 8, 1, 16)), cos, sin)[0, pos, 0]
    assert float(rot(q, 5) @ rot(k, 3)) == pytest.approx(float(rot(q, 4) @ rot(k, 2)), rel=1e-4)


def test_model_rejects_bad_shapes():
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_model(dataclasses.replace(SMALL, vocab_size=0))
    with pytest.raises(ValueError, match="max_seq_len"):
        build_model(SMALL, 0)(_tokens(0, (1, 17)))


def _attention_f64(q, k, v):
    """Causal softmax attention in float64 NumPy: the reference for both attention paths."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    T = q.shape[1]
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("block", [None, pytest.param(4, marks=pytest.mark.slow), 7, 21, 64])  # 4: 10 s compile
def test_causal_attention_blocks_equal_the_float64_reference(block):
    """Query blocks (the CPU path) see exactly the keys up to their rows: same values and gradients as
    the whole-matrix path, T = 21 not a multiple of any block."""
    from lowrank_jax.models.llama import causal_attention

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 21, 3, 8)) for i in range(3))
    out = causal_attention(q, k, v, block=block)
    np.testing.assert_allclose(out, _attention_f64(q, k, v), rtol=2e-5, atol=2e-6)
    w = jax.random.normal(jax.random.key(9), out.shape)

    def loss(q, k, v, b):
        return jnp.sum(causal_attention(q, k, v, block=b) * w)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, block)
    for g, ref in zip(grads, jax.grad(loss, argnums=(0, 1, 2))(q, k, v, None), strict=True):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)
    # the last query of the first block must not see the second block's keys
    if block is not None and block < 21:
        k2 = k.at[:, block:].add(100.0)
        np.testing.assert_allclose(causal_attention(q, k2, v, block=block)[:, :block], out[:, :block], atol=1e-6)


def test_causal_attention_bf16_keeps_float32_scores():
    from lowrank_jax.models.llama import causal_attention

    q, k, v = (jax.random.normal(jax.random.key(i), (1, 16, 2, 8)) for i in range(3))
    ref = _attention_f64(q, k, v)
    for block in (None, 4):
        out = causal_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), block=block)
        assert out.dtype == jnp.bfloat16
        assert np.abs(np.asarray(out, np.float64) - ref).max() < 0.05


@pytest.mark.parametrize("scan", [True, False])
def test_residual_rms_is_the_rms_after_each_block(scan):
    cfg = dataclasses.replace(SMALL, scan_layers=scan)
    model = build_model(cfg, 0)
    tok = _tokens(5, (2, 9))
    embed_rms, block_rms = model.residual_rms(tok)
    x = model.embed_tokens(tok)
    np.testing.assert_allclose(embed_rms, np.sqrt(np.mean(np.square(np.asarray(x)))), rtol=1e-6)
    cos, sin = model.rope(9)
    blocks = _unstack_blocks(model, cfg) if scan else list(model.blocks)
    want = []
    for block in blocks:
        x = block(x, cos, sin)
        want.append(np.sqrt(np.mean(np.square(np.asarray(x)))))
    np.testing.assert_allclose(block_rms, want, rtol=1e-5)
    np.testing.assert_allclose(model.head(x), model(tok), rtol=1e-5, atol=1e-6)


def _unstack_blocks(model, cfg):
    graphdef, state = nnx.split(model.blocks)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(cfg.layers)]
