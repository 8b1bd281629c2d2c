"""LDAdam against its float64 NumPy port of the official LDAdamW (tests/optim/ports/ldadam.py): several steps,
random shapes, every option; the state layout, inject_hyperparams and the argument errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_helpers import train_tiny
from ports import export_step, max_rel_error, random_tree, run, torch_view
from ports.ldadam import LDAdamPort

from lowrank_jax.optim.ldadam import LDAdamState, ldadam, scale_by_ldadam
from pallas_kernels.lowering import PLATFORMS

# Flax (in, out): in < out, in > out, square, a stacked leaf; the bias goes to plain AdamW.
SHAPES = {"a": (6, 10), "b": (11, 5), "c": (7, 7), "stack": (2, 5, 8), "bias": (10,)}
LR, STEPS, RANK = 0.02, 6, 3
MATRICES = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731

OPTIONS = [
    {},
    {"error_feedback": False},
    {"proj_type": "reverse_std"},
    {"proj_type": "input", "rho": 0.5},
    {"proj_type": "output", "b1": 0.8, "b2": 0.95, "eps": 1e-6, "weight_decay": 0.1},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_trajectory_matches_the_float64_port(opts: dict) -> None:
    rng = np.random.default_rng(len(str(opts)))
    params = random_tree(rng, SHAPES, 0.05)
    grads = [random_tree(rng, SHAPES) for _ in range(STEPS)]
    traj, _ = run(ldadam(LR, rank=RANK, mask=MATRICES, **opts), params, grads)
    err = max_rel_error(traj, LDAdamPort(torch_view(params), lr=LR, rank=RANK, **opts), grads)
    print(f"ldadam {opts or 'default'}: max relative error {err:.2e}")
    assert err <= 1e-5


def test_a_port_without_the_projection_aware_update_differs() -> None:
    rng = np.random.default_rng(7)
    params = random_tree(rng, SHAPES, 0.05)
    grads = [random_tree(rng, SHAPES) for _ in range(STEPS)]
    traj, _ = run(ldadam(LR, rank=RANK, mask=MATRICES), params, grads)
    port = LDAdamPort(torch_view(params), lr=LR, rank=RANK, rho=0.0)  # a different subspace rule
    assert max_rel_error(traj, port, grads) > 1e-3


def test_state_layout_and_error_buffer() -> None:
    params = {"w": jnp.ones((6, 10)), "stack": jnp.ones((2, 9, 4)), "b": jnp.ones(10)}
    st = scale_by_ldadam(rank=2).init(params)
    assert isinstance(st, LDAdamState)
    assert st.proj["w"].shape == (6, 2) and st.mu["w"].shape == (2, 10)  # std, in < out: the input side
    assert st.proj["stack"].shape == (2, 4, 2) and st.mu["stack"].shape == (2, 2, 9)  # in > out: the output side
    assert st.error["w"].shape == (6, 10) and isinstance(st.mu["b"], optax.MaskedNode)
    no_ef = scale_by_ldadam(rank=2, error_feedback=False).init(params)
    assert isinstance(no_ef.error["w"], optax.MaskedNode)


def test_error_feedback_keeps_what_the_projection_drops() -> None:
    rng = np.random.default_rng(3)
    g = {"w": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)}
    tx = scale_by_ldadam(rank=2)
    _, st = tx.update(g, tx.init(g))
    p = np.asarray(st.proj["w"], np.float64)  # (8, 2): the input side
    gw = np.asarray(g["w"], np.float64)
    np.testing.assert_allclose(st.error["w"], gw - p @ p.T @ gw, atol=1e-5)


def test_inject_hyperparams_matches_the_plain_optimizer() -> None:
    rng = np.random.default_rng(4)
    params = random_tree(rng, {"w": (6, 8), "b": (8,)})
    grads = [random_tree(rng, {"w": (6, 8), "b": (8,)}) for _ in range(3)]
    mask = {"w": True, "b": False}
    plain, _ = run(ldadam(0.01, rank=2, mask=mask), params, grads)
    inj, _ = run(optax.inject_hyperparams(ldadam)(learning_rate=0.01, rank=2, mask=mask), params, grads)
    for k in params:
        np.testing.assert_allclose(inj[-1][k], plain[-1][k], rtol=1e-5, atol=1e-7)


def test_bf16_state_keeps_its_dtypes() -> None:
    bf = {"w": jax.ShapeDtypeStruct((6, 10), jnp.bfloat16), "b": jax.ShapeDtypeStruct((10,), jnp.bfloat16)}
    tx = scale_by_ldadam(rank=2)
    st = jax.eval_shape(tx.init, bf)
    u, st2 = jax.eval_shape(tx.update, bf, st)
    sig = lambda t: [(x.shape, x.dtype) for x in jax.tree.leaves(t)]  # noqa: E731
    assert sig(st) == sig(st2) and sig(u) == sig(bf)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"rank": 0}, "rank"), ({"b1": 1.0}, "b1"), ({"b2": -0.1}, "b2"), ({"eps": 0.0}, "eps"), ({"rho": 1.0}, "rho"),
     ({"proj_type": "left"}, "proj_type"), ({"error_feedback": "yes"}, "error_feedback"),
     ({"base_optimizer": 1}, "base_optimizer")],
)  # fmt: skip
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}: "):
        scale_by_ldadam(**kwargs)


def test_rank_above_the_projected_side_is_an_error() -> None:
    with pytest.raises(ValueError, match="^rank: "):
        scale_by_ldadam(rank=5).init({"w": jnp.ones((4, 9))})


@pytest.mark.parametrize("platform", PLATFORMS)
def test_train_step_lowers_for_cuda_and_tpu(platform: str) -> None:
    exported = export_step(ldadam(1e-3, rank=4), platform)
    assert exported.platforms == (platform,)


@pytest.mark.parametrize("layerwise", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["step", "per_layer"])
def test_trains_through_the_trainer(tmp_path, layerwise: bool) -> None:
    overrides = ["optim.name=ldadamw", "ldadam.rank=4"]
    state, _ = train_tiny(tmp_path, [*overrides, f"layerwise_update={str(layerwise).lower()}"], LDAdamState)
    assert isinstance(state, LDAdamState)
