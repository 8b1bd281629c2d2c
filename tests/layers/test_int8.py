"""Q-GaLore's INT8 dense kind: quantization against the float64 port's, forward vs float64, gradients reach the
delta, stochastic-rounding requantization (unbiased, delta zeroed), a training step with Q-GaLore, the factory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from optim.ports.q_galore import dequantize as np_dequantize
from optim.ports.q_galore import quantize as np_quantize

from lowrank_jax.layers.int8 import (
    Int8Codes,
    Int8Delta,
    Int8Dense,
    Int8Scales,
    dequantize_kernel,
    drop_deltas,
    quantize_kernel,
    requantize,
    zero_deltas,
)
from lowrank_jax.optim.q_galore import q_galore


def _torch_reference(w: np.ndarray, group: int) -> np.ndarray:
    """The official quantize / dequantize of the PyTorch weight ``w.T`` (groups along ``in``), back as (in, out)."""
    wt = np.asarray(w, np.float64).T
    return np_dequantize(*np_quantize(wt, group, 8), wt.shape).T


@pytest.mark.parametrize(("shape", "group"), [((512, 6), 256), ((24, 5), 8)])
def test_round_to_nearest_matches_the_official_grouping(shape: tuple, group: int) -> None:
    w = np.random.default_rng(group).standard_normal(shape).astype(np.float32) * 0.02
    codes, scales, zeros = quantize_kernel(jnp.asarray(w), group)
    assert codes.dtype == jnp.uint8 and scales.shape == (shape[0] // group, shape[1])
    np.testing.assert_allclose(dequantize_kernel(codes, scales, zeros), _torch_reference(w, group), atol=1e-7)


def test_forward_matches_float64_and_the_gradient_reaches_the_delta() -> None:
    rng = np.random.default_rng(1)
    layer = Int8Dense(16, 5, axes=("embed", "mlp"), rngs=nnx.Rngs(0), group_size=8)
    assert isinstance(layer.codes, Int8Codes) and isinstance(layer.scales, Int8Scales)
    x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    w = np.asarray(dequantize_kernel(layer.codes[...], layer.scales[...], layer.zeros[...]), np.float64)
    np.testing.assert_allclose(layer(x), np.asarray(x, np.float64) @ w, rtol=1e-5, atol=1e-6)
    graphdef, delta, rest = nnx.split(layer, Int8Delta, ...)
    grads = jax.grad(lambda d: jnp.sum(nnx.merge(graphdef, d, rest)(x) ** 2))(delta)
    g = np.asarray(jax.tree.leaves(grads)[0])
    y = np.asarray(x, np.float64) @ w
    np.testing.assert_allclose(g, 2 * np.asarray(x, np.float64).T @ y, rtol=1e-4, atol=1e-6)


def test_requantize_is_unbiased_and_zeroes_the_delta() -> None:
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((16, 4)) * 0.02, jnp.float32)
    codes, scales, zeros = quantize_kernel(w, 16)
    delta = jnp.asarray(rng.standard_normal((16, 4)) * 1e-4, jnp.float32)  # far below one level
    layer = {"codes": codes, "scales": scales, "zeros": zeros, "delta": delta}
    target = np.asarray(dequantize_kernel(codes, scales, zeros) + delta)
    outs = jax.jit(jax.vmap(lambda k: requantize(layer, k)))(jax.random.split(jax.random.key(0), 3000))
    assert not np.any(outs["delta"])
    deq = jax.vmap(dequantize_kernel)(outs["codes"], outs["scales"], outs["zeros"])
    step = np.asarray(outs["scales"][0])  # the range does not move much: about one level
    inside = (target > target.min(axis=0)) & (target < target.max(axis=0))
    bias = np.abs(np.asarray(jnp.mean(deq, axis=0)) - target)
    assert np.all(bias[inside] <= 0.08 * np.broadcast_to(step.max(axis=0), target.shape)[inside])
    nearest = np.asarray(dequantize_kernel(*quantize_kernel(jnp.asarray(target), 16)))
    assert np.mean(bias) < 0.3 * np.mean(np.abs(nearest - target))  # rounding to nearest would lose the update


def test_stacked_requantize_and_a_q_galore_step_with_deltas_built_in_the_step() -> None:
    rng = np.random.default_rng(3)
    layer = Int8Dense(32, 8, axes=("embed", "mlp"), rngs=nnx.Rngs(1), group_size=16)
    graphdef, deltas, rest = nnx.split(layer, Int8Delta, ...)
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
    tx = q_galore(0.05, rank=2, update_proj_gap=1, proj_group_size=16, mask=lambda p: jax.tree.map(lambda _: True, p))
    opt_state = tx.init(nnx.to_pure_dict(deltas))

    @jax.jit
    def step(rest, opt_state, key):
        d0 = zero_deltas(jax.eval_shape(lambda: nnx.to_pure_dict(deltas)))
        loss = lambda d: jnp.mean(nnx.merge(graphdef, _state(d), rest)(x) ** 2)  # noqa: E731
        value, g = jax.value_and_grad(loss)(d0)
        u, opt_state = tx.update(g, opt_state, d0)
        layer_dict = {"codes": rest["codes"][...], "scales": rest["scales"][...], "zeros": rest["zeros"][...],
                      "delta": u["delta"]}  # fmt: skip
        new = requantize(layer_dict, key)
        for k in ("codes", "scales", "zeros"):
            rest[k] = rest[k].replace(new[k])
        return rest, opt_state, value

    def _state(d):  # noqa: ANN001, ANN202
        st = jax.tree.map(lambda x: x, deltas)
        st["delta"] = st["delta"].replace(d["delta"])
        return st

    losses = []
    for i in range(40):
        rest, opt_state, value = step(rest, opt_state, jax.random.key(i))
        losses.append(float(value))
    assert rest["codes"][...].dtype == jnp.uint8
    assert losses[-1] < 0.5 * losses[0], losses


def test_drop_deltas_splits_the_state_and_the_factory_builds_the_kind() -> None:
    layer = Int8Dense(8, 4, axes=("embed", "mlp"), rngs=nnx.Rngs(0), group_size=4)
    deltas, rest = drop_deltas(nnx.state(layer))
    assert set(nnx.to_pure_dict(deltas)) == {"delta"} and set(nnx.to_pure_dict(rest)) == {"codes", "scales", "zeros"}
    from lowrank_jax.layers import dense_kinds

    assert "int8" in dense_kinds()


def test_group_size_falls_back_to_a_divisor_and_bad_values_raise() -> None:
    layer = Int8Dense(24, 4, axes=("embed", "mlp"), rngs=nnx.Rngs(0), group_size=16)
    assert layer.scales[...].shape == (2, 4)  # groups of 12
    with pytest.raises(ValueError, match="^group_size: "):
        Int8Dense(24, 4, axes=("embed", "mlp"), rngs=nnx.Rngs(0), group_size=0)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_a_train_step_on_int8_layers_lowers_for_cuda_and_tpu(platform: str) -> None:
    from optim.ports import export_step

    assert export_step(q_galore(0.01, rank=4, proj_group_size=16), platform, dense="int8").platforms == (platform,)
