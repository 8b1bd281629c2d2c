"""BitLinear (BitNet b1.58): quantisers vs float64 formulas, STE gradients, packed inference, factory use."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowrank_jax.config import ModelConfig
from lowrank_jax.layers.bitlinear import (
    BitLinear,
    PackedTernary,
    TernaryScale,
    activation_quant,
    bitlinear,
    pack_bitlinear,
    ste,
    weight_quant,
)
from lowrank_jax.layers.dense import make_dense
from lowrank_jax.models import build_model, split_model

EPS = 1e-5


def _np_weight_quant(w):
    w = np.asarray(w, np.float64)
    gamma = np.mean(np.abs(w)) + EPS
    return np.clip(np.round(w / gamma), -1, 1), gamma


def _np_activation_quant(x):
    x = np.asarray(x, np.float64)
    m = np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), EPS)
    return np.clip(np.round(x * 127 / m), -128, 127), m[..., 0] / 127


def _away_from_ties(v, tol=1e-4):
    """Entries whose rounding cannot flip between float32 and float64 (not within tol of k + 0.5)."""
    return np.abs(np.abs(v - np.floor(v)) - 0.5) > tol


@pytest.mark.parametrize("std", [1e-3, 0.02, 1.0, 30.0])
def test_weight_quant_matches_absmean_formula(rng, std):
    w = rng.standard_normal((int(rng.integers(3, 60)), int(rng.integers(3, 60)))) * std
    w_t, gamma = weight_quant(jnp.asarray(w, jnp.float32))
    w32 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
    ref_t, ref_gamma = _np_weight_quant(w32)
    np.testing.assert_allclose(float(gamma), ref_gamma, rtol=1e-5)
    ok = _away_from_ties(w32 / ref_gamma)
    np.testing.assert_array_equal(np.asarray(w_t)[ok], ref_t[ok])
    assert set(np.unique(np.asarray(w_t))) <= {-1.0, 0.0, 1.0}
    assert ok.mean() > 0.99
    # all three values occur for a Gaussian weight (|W|/γ straddles 0.5 and 1.5)
    assert set(np.unique(np.asarray(w_t))) == {-1.0, 0.0, 1.0}


def test_activation_quant_matches_absmax_formula_per_token(rng):
    x = rng.standard_normal((3, 7, int(rng.integers(2, 90)))) * rng.uniform(0.01, 50, (3, 7, 1))
    x32 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    x_q, eta = activation_quant(jnp.asarray(x32, jnp.float32))
    ref_q, ref_eta = _np_activation_quant(x32)
    assert eta.shape == (3, 7)
    np.testing.assert_allclose(np.asarray(eta), ref_eta, rtol=1e-6)
    m = np.max(np.abs(x32), axis=-1, keepdims=True)
    ok = _away_from_ties(x32 * 127 / m)
    np.testing.assert_array_equal(np.asarray(x_q)[ok], ref_q[ok])
    q = np.asarray(x_q)
    assert np.all(q == np.round(q)) and q.min() >= -128 and q.max() <= 127
    assert np.all(np.abs(q).max(axis=-1) == 127)  # the absmax entry of every token maps to ±127
    # an all-zero token stays finite (the ε floor), not NaN
    zq, zeta = activation_quant(jnp.zeros((2, 5)))
    assert np.all(np.asarray(zq) == 0) and np.all(np.isfinite(np.asarray(zeta)))


def test_ste_value_and_identity_gradient(rng):
    x = jnp.asarray(rng.standard_normal((4, 9)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((4, 9)), jnp.float32)

    def f(x):
        return jnp.sum(c * ste(x, weight_quant(x)[0]))

    np.testing.assert_array_equal(np.asarray(jax.grad(f)(x)), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(ste(x, weight_quant(x)[0])), np.asarray(weight_quant(x)[0]))
    # without the STE the quantiser's gradient is zero almost everywhere
    assert not np.any(np.asarray(jax.grad(lambda x: jnp.sum(c * weight_quant(x)[0]))(x)))


def test_bitlinear_forward_and_ste_gradients_vs_float64(rng):
    k, n = int(rng.integers(4, 70)), int(rng.integers(2, 50))
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 5, k)) * 3, jnp.float32)
    dy = rng.standard_normal((2, 5, n))
    w_t, gamma = _np_weight_quant(np.asarray(w, np.float64))
    x_q, eta = _np_activation_quant(np.asarray(x, np.float64))
    y_ref = (x_q @ w_t) * gamma * eta[..., None]
    y, vjp = jax.vjp(lambda x, w: bitlinear(x, w), x, w)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-6 * np.abs(y_ref).max())
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    x_hat, w_hat = x_q * eta[..., None], w_t * gamma  # the dequantised operands
    np.testing.assert_allclose(np.asarray(dx), dy @ w_hat.T, rtol=1e-4, atol=1e-5)
    dw_ref = np.einsum("btk,btn->kn", x_hat, dy)
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=1e-4, atol=1e-4)
    # bf16 compute: integer operands are exact, so only the final rounding to bf16 differs
    y16 = bitlinear(x, w, dtype=jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float64), y_ref, rtol=1e-2, atol=1e-2 * np.abs(y_ref).max())


def test_layer_builds_through_factory_with_axes_and_packs(rng):
    cfg = dataclasses.replace(ModelConfig(), dense="bitlinear", init_std=0.03)
    layer = make_dense("bitlinear", 45, 19, axes=("embed", "mlp"), rngs=nnx.Rngs(0), config=cfg)
    assert isinstance(layer, BitLinear) and type(layer.kernel) is nnx.Param
    assert layer.kernel.get_metadata()["axes"] == ("embed", "mlp")
    assert abs(float(jnp.std(layer.kernel[...])) - 0.03) < 0.005
    x = jnp.asarray(rng.standard_normal((3, 4, 45)), jnp.float32)
    y = layer(x)
    for impl in ("xla", "pallas"):
        packed = pack_bitlinear(layer, implementation=impl)
        assert type(packed.packed_kernel) is PackedTernary and type(packed.scale) is TernaryScale
        assert packed.packed_kernel[...].dtype == jnp.uint8 and packed.packed_kernel.shape == (12, 19)
        assert packed.packed_kernel.get_metadata()["axes"] == ("embed", "mlp")
        assert not nnx.state(packed, nnx.Param)  # nothing trainable left
        np.testing.assert_allclose(np.asarray(packed(x)), np.asarray(y), rtol=1e-5, atol=1e-6)
    # 2 bits per weight: 8x fewer bytes than the bf16 kernel (up to the last partial byte row)
    assert packed.packed_kernel[...].nbytes * 8 <= 45 * 19 * 2 + 8 * 19


def test_bitlinear_mlp_trains_with_adam(rng):
    """A 2-layer BitLinear MLP fits a random teacher: the STE carries useful gradients."""
    cfg = dataclasses.replace(ModelConfig(), dense="bitlinear", init_std=0.1)

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = make_dense("bitlinear", 16, 64, axes=("embed", "mlp"), rngs=rngs, config=cfg)
            self.l2 = make_dense("bitlinear", 64, 4, axes=("mlp", "embed"), rngs=rngs, config=cfg)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    graphdef, params = split_model(MLP(nnx.Rngs(int(rng.integers(1000)))))
    x = jnp.asarray(rng.standard_normal((256, 16)), jnp.float32)
    labels = jnp.asarray(np.argmax(rng.standard_normal((16, 4)).T @ np.asarray(x).T, axis=0))
    tx = optax.adam(3e-3)

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), labels).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = tx.init(params)
    losses = []
    for _ in range(150):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_llama_with_bitlinear_kind(rng):
    cfg = ModelConfig(vocab_size=61, hidden=32, ffn=48, heads=2, layers=2, max_seq_len=16, dense="bitlinear")
    graphdef, _ = split_model(nnx.eval_shape(lambda: build_model(cfg, 0)))
    params = jax.jit(lambda: split_model(build_model(cfg, 0))[1])()  # one compiled init, not eager ops
    assert params["blocks"]["mlp"]["gate"]["kernel"].shape == (2, 32, 48)  # stacked over layers
    tokens = jnp.asarray(rng.integers(0, 61, (2, 9)), jnp.int32)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    assert float(jnp.abs(grads["blocks"]["attn"]["q"]["kernel"]).max()) > 0


def test_errors():
    with pytest.raises(ValueError, match="axes"):
        BitLinear(4, 5, axes=("embed",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        BitLinear(0, 5, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="out_features"):
        BitLinear(4, 2.5, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="eps"):
        BitLinear(4, 5, axes=("embed", "mlp"), rngs=nnx.Rngs(0), eps=0.0)
    packed = BitLinear(4, 5, axes=("embed", "mlp"), rngs=nnx.Rngs(0), packed=True)
    with pytest.raises(ValueError, match="layer"):
        pack_bitlinear(packed)
    with pytest.raises(ValueError, match="implementation"):
        BitLinear(4, 5, axes=("embed", "mlp"), rngs=nnx.Rngs(0), packed=True, implementation="cuda")(jnp.ones((1, 4)))
