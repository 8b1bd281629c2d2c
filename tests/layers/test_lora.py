"""LoRA / low-rank linears: forward vs float64, gradients, init, axes, factory kinds in a full LLaMA."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.config import ModelConfig
from lowrank_jax.layers.dense import make_dense
from lowrank_jax.layers.lora import (
    FrozenWeight,
    LoRADense,
    LoRAFactor,
    LoRAScale,
    LowRankDense,
    kaiming_uniform,
    lowrank_init_std,
)
from lowrank_jax.models import build_model, count_params, param_labels, split_model

BASE = ModelConfig(vocab_size=97, hidden=32, ffn=48, heads=4, layers=2, max_seq_len=16)


def _with_lora(**lora: object) -> ModelConfig:
    return dataclasses.replace(BASE, **lora)


# Same shapes as tests/optim/test_relora.py's model, so the two files share compiled ops.
SMALL = _with_lora(lora_rank=4, lora_alpha=8.0, lora_trainable_scale=False)


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _lora(in_f=7, out_f=5, rank=3, alpha=6.0, seed=0, **kw) -> LoRADense:
    return LoRADense(in_f, out_f, rank=rank, alpha=alpha, axes=("embed", "mlp"), rngs=nnx.Rngs(seed), **kw)


@pytest.mark.parametrize("trainable_scale", [False, True])
def test_lora_forward_matches_float64(trainable_scale):
    layer = _lora(trainable_scale=trainable_scale)
    rng = np.random.default_rng(1)
    layer.lora_b.value = jnp.asarray(rng.standard_normal((3, 5), np.float32))  # B = 0 at init; test on B ≠ 0
    if trainable_scale:
        layer.lora_scale.value = jnp.asarray(0.37)
    x = jnp.asarray(rng.standard_normal((2, 4, 7), np.float32))
    w, a, b = _f64(layer.kernel[...]), _f64(layer.lora_a[...]), _f64(layer.lora_b[...])
    s = math.tanh(0.37) if trainable_scale else 6.0 / 3
    expected = _f64(x) @ w + (_f64(x) @ a) @ b * s
    np.testing.assert_allclose(_f64(layer(x)), expected, rtol=1e-5, atol=1e-6)
    # at init (B = 0) the layer is exactly the frozen linear
    fresh = _lora(seed=3, trainable_scale=trainable_scale)
    np.testing.assert_allclose(_f64(fresh(x)), _f64(x) @ _f64(fresh.kernel[...]), rtol=1e-5, atol=1e-6)


def test_lora_init_types_axes_and_distributions():
    layer = LoRADense(256, 96, rank=8, alpha=16.0, axes=("embed", "heads"), rngs=nnx.Rngs(0), init_std=0.05)
    assert type(layer.kernel) is FrozenWeight and not isinstance(layer.kernel, nnx.Param)
    assert type(layer.lora_a) is LoRAFactor and type(layer.lora_b) is LoRAFactor
    assert layer.lora_scale is None and layer.scaling == 2.0
    assert layer.kernel.get_metadata()["axes"] == ("embed", "heads")
    assert layer.lora_a.get_metadata()["axes"] == ("embed", "rank")
    assert layer.lora_b.get_metadata()["axes"] == ("rank", "heads")
    w, a = np.asarray(layer.kernel[...]), np.asarray(layer.lora_a[...])
    assert w.shape == (256, 96) and a.shape == (256, 8) and layer.lora_b[...].shape == (8, 96)
    assert abs(w.std() - 0.05) < 0.003
    # kaiming_uniform_(a=√5): U(−1/√fan_in, 1/√fan_in), fan_in = in_features; uniform std = bound/√3
    bound = 1 / math.sqrt(256)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.98 * bound
    assert abs(a.std() - bound / math.sqrt(3)) < 0.05 * bound
    assert not np.any(np.asarray(layer.lora_b[...]))
    scaled = _lora(trainable_scale=True)
    assert type(scaled.lora_scale) is LoRAScale and float(scaled.lora_scale[...]) == 1.0
    assert scaled.lora_scale.get_metadata()["axes"] == ()


def test_lora_gradients_frozen_weight_gets_none():
    """∂L/∂W is a symbolic zero (no W-sized matmul); at init ∂L/∂B ≠ 0 (A ≠ 0) and ∂L/∂A = 0 (B = 0)."""
    layer = _lora(in_f=11, out_f=6, rank=3)
    graphdef, params = split_model(layer)
    rng = np.random.default_rng(2)
    x, y = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in ((9, 11), (9, 6)))

    def loss(p):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    grad = jax.jit(jax.grad(loss))
    g = grad(params)
    assert not np.any(np.asarray(g["kernel"]))
    assert not np.any(np.asarray(g["lora_a"]))
    assert np.abs(np.asarray(g["lora_b"])).max() > 1e-4
    # no dot_general produces a W-shaped (11, 6) result in the backward pass
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    shapes = [
        tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "dot_general" for v in eqn.outvars
    ]
    assert (11, 6) not in shapes and (6, 11) not in shapes, shapes
    # once B ≠ 0, A gets a gradient too
    params["lora_b"] = jnp.asarray(rng.standard_normal((3, 6), np.float32))
    assert np.abs(np.asarray(grad(params)["lora_a"])).max() > 1e-4
    # nnx.grad / nnx.Param filters (the default wrt) never see the FrozenWeight
    assert {p[-1] for p, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))} == {"lora_a", "lora_b"}


def test_lowrank_dense_count_init_scale_and_forward():
    layer = LowRankDense(128, 96, rank=16, axes=("embed", "mlp"), rngs=nnx.Rngs(0), init_std=0.02)
    _, params = split_model(layer)
    assert count_params(params) == 16 * (128 + 96)
    assert {type(layer.lowrank_a), type(layer.lowrank_b)} == {LoRAFactor}
    assert layer.lowrank_a.get_metadata()["axes"] == ("embed", "rank")
    assert layer.lowrank_b.get_metadata()["axes"] == ("rank", "mlp")
    a, b = _f64(layer.lowrank_a[...]), _f64(layer.lowrank_b[...])
    assert abs(a.std() / lowrank_init_std(0.02, 16) - 1) < 0.05
    assert abs((a @ b).std() / 0.02 - 1) < 0.1  # the product has the dense init's scale
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 128), np.float32))
    np.testing.assert_allclose(_f64(layer(x)), _f64(x) @ a @ b, rtol=1e-4, atol=1e-6)


def test_registered_builders_read_the_model_config():
    def build(kind, cfg):  # abstract: nothing is allocated or compiled
        return nnx.eval_shape(lambda: make_dense(kind, 12, 7, axes=("embed", "mlp"), rngs=nnx.Rngs(0), config=cfg))

    cfg = _with_lora(lora_rank=5, lora_alpha=10.0, lora_trainable_scale=True)
    layer = build("lora", cfg)
    assert isinstance(layer, LoRADense) and layer.rank == 5 and layer.lora_scale is not None
    assert layer.lora_a.shape == (12, 5) and layer.scaling == 2.0
    low = build("lowrank", cfg)
    assert isinstance(low, LowRankDense) and low.lowrank_b.shape == (5, 7)
    # ModelConfig's defaults: the official r=128, alpha=32
    plain = build("lora", BASE)
    assert plain.rank == 128 and plain.scaling == 32.0 / 128 and plain.lora_scale is None


@pytest.mark.parametrize(
    "kind, scan",
    [
        # fast: one kind per scan mode here; lora + scan_layers is built, trained and merged by
        # tests/optim/test_relora.py's fixture (each eager LLaMA build costs seconds on CPU)
        ("lowrank", False),
        pytest.param("lora", True, marks=pytest.mark.slow),
        pytest.param("lora", False, marks=pytest.mark.slow),
        pytest.param("lowrank", True, marks=pytest.mark.slow),
    ],
)
def test_llama_with_lora_kinds(kind, scan):
    cfg = dataclasses.replace(SMALL, dense=kind, scan_layers=scan)
    graphdef, params = split_model(build_model(cfg, 0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 8)), jnp.int32)
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)
    assert logits.shape == (2, 8, 97) and bool(jnp.all(jnp.isfinite(logits)))
    labels = param_labels(cfg)
    q = labels["blocks"]["attn"]["q"] if scan else labels["blocks"][0]["attn"]["q"]
    if kind == "lora":
        assert q == {"kernel": "FrozenWeight", "lora_a": "LoRAFactor", "lora_b": "LoRAFactor"}
    else:
        assert q == {"lowrank_a": "LoRAFactor", "lowrank_b": "LoRAFactor"}
    assert labels["embed"] == "Param" and labels["lm_head"]["kernel"] == "Param"
    if scan:  # stacked on the leading layers axis, each layer with its own draw
        a = np.asarray(params["blocks"]["mlp"]["up"]["lora_a" if kind == "lora" else "lowrank_a"])
        assert a.shape == (2, 32, 4) and not np.allclose(a[0], a[1])


def test_errors():
    with pytest.raises(ValueError, match="rank"):
        _lora(rank=0)
    with pytest.raises(ValueError, match="rank"):
        LowRankDense(4, 4, rank=True, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="axes"):
        LoRADense(4, 4, rank=2, axes=("embed",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="alpha"):
        _lora(alpha=float("nan"))
    with pytest.raises(ValueError, match="shape"):
        kaiming_uniform(jax.random.key(0), (4,))
