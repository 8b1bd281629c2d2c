"""SWAN against its float64 NumPy port (tests/optim/ports/swan.py), options, masks, inject_hyperparams, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_helpers import train_tiny
from ports import export_step, max_rel_error, random_tree, run, torch_view
from ports.swan import SwanPort

from lowrank_jax.optim.swan import SwanState, scale_by_swan, swan
from pallas_kernels.lowering import PLATFORMS

# Flax (in, out): in < out, in > out, square, a stacked leaf; the bias goes to Adam.
SHAPES = {"a": (6, 10), "b": (11, 5), "c": (7, 7), "stack": (2, 5, 8), "bias": (10,)}
LR, STEPS = 0.05, 4


OPTIONS = [
    {},
    {"normalize": False},
    {"whiten": "exact"},
    {"whiten": "none"},
    {"ns_steps": 3, "scale": 0.5, "norm_eps": 1e-3, "eps": 1e-6, "b1": 0.8},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_trajectory_matches_the_float64_port(opts: dict) -> None:
    rng = np.random.default_rng(len(str(opts)))
    params = random_tree(rng, SHAPES, 0.05)
    grads = [random_tree(rng, SHAPES) for _ in range(STEPS)]
    traj, _ = run(swan(LR, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p), **opts), params, grads)
    err = max_rel_error(traj, SwanPort(torch_view(params), lr=LR, **opts), grads)
    print(f"swan {opts or 'default'}: max relative error {err:.2e}")
    assert err <= 1e-5


def test_whitened_update_is_the_polar_factor_and_state_is_empty() -> None:
    rng = np.random.default_rng(1)
    g = {"w": jnp.asarray(rng.standard_normal((12, 5)), jnp.float32)}
    tx = scale_by_swan(normalize=False, ns_steps=30)
    state = tx.init(g)
    assert isinstance(state, SwanState)
    assert all(x.ndim == 0 for x in jax.tree.leaves(state.base_state))  # Adam's count only: no matrix state
    u, _ = tx.update(g, state)
    uu, _, vh = np.linalg.svd(np.asarray(g["w"], np.float64), full_matrices=False)
    np.testing.assert_allclose(u["w"], uu @ vh, atol=2e-5)


def test_grad_norm_standardises_each_output_column() -> None:
    rng = np.random.default_rng(2)
    g = {"w": jnp.asarray(rng.standard_normal((9, 4)) * 3 + 1, jnp.float32)}
    u, _ = scale_by_swan(whiten="none", norm_eps=0.0).update(g, scale_by_swan().init(g))
    np.testing.assert_allclose(np.mean(u["w"], axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(np.std(u["w"], axis=0), 1, atol=1e-5)


def test_inject_hyperparams_and_bf16() -> None:
    rng = np.random.default_rng(3)
    params = random_tree(rng, {"w": (6, 8), "b": (8,)})
    mask = {"w": True, "b": False}
    tx = optax.inject_hyperparams(swan)(learning_rate=0.01, weight_decay=0.1, mask=mask)
    plain = swan(0.01, weight_decay=0.1, mask=mask)
    st, st_plain = tx.init(params), plain.init(params)
    u, _ = jax.jit(tx.update)(params, st, params)
    u_plain, _ = plain.update(params, st_plain, params)
    for k in params:
        np.testing.assert_allclose(u[k], u_plain[k], rtol=1e-5, atol=1e-7)
    bf = {k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16) for k, v in params.items()}
    out, _ = jax.eval_shape(plain.update, bf, jax.eval_shape(plain.init, bf), bf)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"whiten": "svd"}, "whiten"), ({"ns_steps": 0}, "ns_steps"), ({"scale": 0.0}, "scale"),
     ({"normalize": 1}, "normalize"), ({"norm_eps": -1.0}, "norm_eps"), ({"base_optimizer": 3}, "base_optimizer")],
)  # fmt: skip
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}: "):
        scale_by_swan(**kwargs)


def test_mask_selecting_a_vector_is_rejected() -> None:
    with pytest.raises(ValueError, match="^mask: "):
        scale_by_swan(mask={"b": True}).init({"b": jnp.ones(3)})


def test_a_second_full_size_optimizer_after_it_stops_before_training() -> None:
    params = {"w": jnp.ones((6, 8))}
    with pytest.raises(ValueError, match="second optimizer"):
        optax.chain(scale_by_swan(), optax.adam(1e-3)).init(params)
    with pytest.raises(TypeError, match="learning_rate"):
        swan()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_train_step_lowers_for_cuda_and_tpu(platform: str) -> None:
    exported = export_step(swan(0.02), platform)
    assert exported.platforms == (platform,)


@pytest.mark.parametrize("layerwise", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["step", "per_layer"])
def test_trains_through_the_trainer(tmp_path, layerwise: bool) -> None:
    overrides = ["optim.name=swan", "optim.lr=0.02"]
    state, _ = train_tiny(tmp_path, [*overrides, f"layerwise_update={str(layerwise).lower()}"], SwanState)
    assert isinstance(state, SwanState)
