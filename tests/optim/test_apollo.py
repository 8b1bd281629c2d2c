"""APOLLO / APOLLO-Mini against an independent float64 NumPy port of the official apollo_torch update.

The reference follows apollo_torch/apollo.py ``AdamW.step`` and random_projector.py in PyTorch orientation
(weights ``(out, in)``): ``std`` side rule (``m >= n``: right projector ``(r, n)``, else left ``(m, r)``), a new
Gaussian ``N(0, 1)/√r`` at ``step % T == 0``, HF-style Adam moments of the projected gradient, the scaling factor
``‖exp_avg / denom‖ / (‖R‖ + 1e-8)`` over ``norm_dim = 0 if m < n else 1`` (channel) or the whole matrix (tensor),
``scaled = grad * factor``, ``np.sqrt(scale)`` before (``scale_front``) or after Fira's norm-growth limiter, and
``p -= lr · √(1−b2ᵗ)/(1−b1ᵗ) · scaled``; parameters without ``rank`` take plain HF AdamW. The Gaussian draws are
regenerated with ``jax.random`` from the documented ``fold_in(fold_in(fold_in(key(seed), t), matrix), side)``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_helpers import (
    BF16_SHAPES,
    SHAPES,
    Port,
    adam_moments,
    assert_state_stable,
    growing_gradient_norms,
    max_rel_error,
    random_tree,
    run_beside_plain_adam,
    train_tiny,
    trajectory,
)

from lowrank_jax.optim import ApolloState, scale_by_apollo, scale_by_apollo_mini
from lowrank_jax.optim.adam_8bit import QuantizedArray

# SHAPES (method_helpers): APOLLO does not clamp the rank of "small" (rank > in).
MATRIX = {"a": 0, "b": 1, "c": 2, "small": 3, "stack0": 4, "stack1": 5}  # flatten order, selected matrices only
RANK, T, STEPS, LR, SEED = 4, 3, 10, 0.02, 7


class RefApollo(Port):
    """apollo_torch ``AdamW`` (float64, PyTorch orientation); ``broken`` names a deliberate deviation."""

    def __init__(self, params: dict, *, scale: float, scale_type: str, scale_front: bool, gamma: float = 1.01,
                 rank: int = RANK, broken: str | None = None) -> None:  # fmt: skip
        super().__init__(params, LR)
        self.scale, self.scale_type, self.front, self.gamma, self.rank = scale, scale_type, scale_front, gamma, rank
        self.broken = broken
        self.proj: dict[str, Any] = {}

    def _gaussian(self, key: str, g: np.ndarray) -> np.ndarray:
        right = g.shape[0] >= g.shape[1]
        dim = g.shape[1] if right else g.shape[0]
        k = jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED), self.t), MATRIX[key])
        z = jax.random.normal(jax.random.fold_in(k, 0 if right else 1), (dim, self.rank), jnp.float32)
        return np.asarray(z, np.float64) / math.sqrt(self.rank)  # stable_randn(...) / math.sqrt(rank)

    def matrix_step(self, key: str, g: np.ndarray, c: float, _probe: Any) -> np.ndarray:
        right = g.shape[0] >= g.shape[1]
        if self.t % T == 0:
            self.proj[key] = self._gaussian(key, g)
        p = self.proj[key]
        low = g @ p if right else p.T @ g  # torch: grad @ B.t()  /  A.t() @ grad
        self.m[key], self.v[key], n = adam_moments(self.m[key], self.v[key], low)
        if self.broken == "bias_corrected_ratio":
            n = n * c
        norm_dim = 0 if g.shape[0] < g.shape[1] else 1
        if self.scale_type == "channel" and self.broken != "tensor_for_channel":
            factor = np.linalg.norm(n, axis=norm_dim) / (np.linalg.norm(low, axis=norm_dim) + 1e-8)
            factor = factor[:, None] if norm_dim == 1 else factor[None, :]
        else:
            factor = np.linalg.norm(n) / (np.linalg.norm(low) + 1e-8)
        scaled = g * factor
        root = self.scale if self.broken == "scale_not_sqrt" else math.sqrt(self.scale)
        if self.front:
            scaled = scaled * root
        if self.broken != "no_limiter":
            scaled = self.limit(key, scaled, self.gamma)
        if not self.front:
            scaled = scaled * root
        return LR * c * scaled


def _trajectory(tx: optax.GradientTransformation, params: dict, grads: list) -> list:
    return trajectory(tx, params, grads, LR)[0]


def _max_rel_error(traj: list, ref: RefApollo, grads: list) -> float:
    return max_rel_error(traj, ref, grads, [None] * len(grads))


# name: (the port's settings, our transform with the test's gap and seed)
VARIANTS = {
    "apollo": (
        dict(scale=4.0, scale_type="channel", scale_front=False),
        lambda: scale_by_apollo(RANK, scale=4.0, update_proj_gap=T, seed=SEED),
    ),
    "apollo_mini": (
        dict(scale=128.0, scale_type="tensor", scale_front=True, rank=1),
        lambda: scale_by_apollo_mini(update_proj_gap=T, seed=SEED),
    ),
    "tensor_scale_after": (
        dict(scale=2.0, scale_type="tensor", scale_front=False),
        lambda: scale_by_apollo(RANK, scale=2.0, scale_type="tensor", update_proj_gap=T, seed=SEED),
    ),
}


@pytest.fixture(scope="module")
def runs() -> dict:
    rng = np.random.default_rng(0)
    params, grads = random_tree(rng, SHAPES), [random_tree(rng, SHAPES) for _ in range(STEPS)]
    return {name: (params, grads, _trajectory(build(), params, grads)) for name, (_, build) in VARIANTS.items()}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_the_official_update_over_several_refreshes(runs, name: str) -> None:
    params, grads, traj = runs[name]  # refreshes at 0, 3, 6, 9
    err = _max_rel_error(traj, RefApollo(params, **VARIANTS[name][0]), grads)
    assert err < 2e-5, f"{name}: max relative error {err:.2e}"


@pytest.mark.parametrize("broken", ["bias_corrected_ratio", "tensor_for_channel", "scale_not_sqrt", "no_limiter"])
def test_a_broken_rule_is_caught(runs, broken: str) -> None:
    params, grads, traj = runs["apollo"]
    assert _max_rel_error(traj, RefApollo(params, **VARIANTS["apollo"][0], broken=broken), grads) > 1e-3


def _nbytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_apollo_mini_state_is_rank_one_and_sgd_like() -> None:
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    params = {"up": f32((512, 1376)), "down": f32((1376, 512))}
    st = jax.eval_shape(scale_by_apollo_mini().init, params)
    assert isinstance(st, ApolloState) and st._fields[0] == "count"
    assert st.inner_state.mu["up"].shape == (1, 1376) and st.inner_state.nu["down"].shape == (1376, 1)
    assert st.update_norm["up"].shape == ()
    # two rank-1 moments per matrix, one norm each, two int32 counts, the int32 (offset, stride) numbering:
    # no projection is stored
    assert _nbytes(st) == 4 * (2 * 1376 * 2) + 4 * 2 + 4 * 2 + 4 * 2
    assert _nbytes(st) < 0.002 * 2 * _nbytes(params)  # vs AdamW's two full moments
    st256 = jax.eval_shape(scale_by_apollo(256).init, params)
    assert st256.inner_state.mu["up"].shape == (256, 1376) and st256.inner_state.mu["down"].shape == (1376, 256)


def test_stacked_layers_get_one_projection_and_norm_each() -> None:
    params = random_tree(np.random.default_rng(2), {"stack": (3, 6, 10)})
    st = scale_by_apollo(2, update_proj_gap=2).init(params)
    assert st.inner_state.mu["stack"].shape == (3, 2, 10) and st.update_norm["stack"].shape == (3,)
    u, st = jax.jit(scale_by_apollo(2, update_proj_gap=2).update)(params, st)
    assert u["stack"].shape == (3, 6, 10) and bool(jnp.all(st.update_norm["stack"] > 0))


def test_norm_growth_limiter_caps_growth_at_gamma() -> None:
    g = random_tree(np.random.default_rng(3), {"w": (8, 12)})
    norm_of = lambda st: st.update_norm["w"]
    norms = growing_gradient_norms(scale_by_apollo(3, update_proj_gap=100), g, norm_of, 6)
    np.testing.assert_allclose(np.array(norms[1:]) / np.array(norms[:-1]), 1.01, rtol=1e-5)
    off = growing_gradient_norms(scale_by_apollo(3, update_proj_gap=100, norm_growth_limit=0), g, norm_of, 2)
    assert off[1] > 1.05 * norms[0]  # the limiter off: the norm grows faster


def test_seed_and_refresh_determinism(runs) -> None:
    params, grads, traj = runs["apollo"]
    again = _trajectory(VARIANTS["apollo"][1](), params, grads[:2])
    jax.tree.map(np.testing.assert_array_equal, again[1], traj[1])
    other = _trajectory(scale_by_apollo(RANK, scale=4.0, update_proj_gap=T, seed=SEED + 1), params, grads[:1])
    assert not np.allclose(other[0]["a"], traj[0]["a"], atol=1e-7)


def test_mask_leaves_other_leaves_plain_adam_and_eight_bit() -> None:
    rng = np.random.default_rng(4)
    grads = [random_tree(rng, {"w": (64, 96), "v": (8, 5), "b": (10,)}) for _ in range(3)]
    mask = {"w": True, "v": False, "b": False}
    us, st = run_beside_plain_adam(scale_by_apollo(48, mask=mask), grads, ("v", "b"))
    us8, st8 = run_beside_plain_adam(scale_by_apollo(48, mask=mask, eight_bit=True), grads, ())  # its own float32 Adam
    assert isinstance(st.update_norm["v"], optax.MaskedNode) and st.inner_state.mu["v"].shape == (8, 5)
    assert isinstance(st8.inner_state.mu["w"], QuantizedArray)  # (48, 96): 4608 values >= min_size 4096
    np.testing.assert_allclose(us8[0]["w"], us[0]["w"], rtol=1e-5, atol=1e-8)  # step 1: unquantized moments
    np.testing.assert_allclose(us8[-1]["w"], us[-1]["w"], rtol=0.05, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(rank=0), "rank"),
        (dict(rank=1.5), "rank"),
        (dict(update_proj_gap=0), "update_proj_gap"),
        (dict(scale=0.0), "scale"),
        (dict(scale_type="row"), "scale_type"),
        (dict(proj_type="both"), "proj_type"),
        (dict(proj_type="left"), "proj_type"),
        (dict(norm_growth_limit=0.5), "norm_growth_limit"),
        (dict(norm_growth_limit=-1.0), "norm_growth_limit"),
        (dict(scale_front=1), "scale_front"),
        (dict(b1=1.0), "b1"),
        (dict(eps=-1e-6), "eps"),
        (dict(eight_bit="yes"), "eight_bit"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    kwargs = {"rank": 2, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}: "):
        scale_by_apollo(kwargs.pop("rank"), **kwargs)
    with pytest.raises(TypeError, match="scale_type"):  # APOLLO-Mini is tensor-wise by definition
        scale_by_apollo_mini(scale_type="channel")


@pytest.mark.parametrize(("name", "moment"), [("apollo_adamw", (1, 8, 128)), ("apollo_mini_adamw", (1, 1, 128))])
def test_trains_through_the_trainer(tmp_path, name: str, moment: tuple) -> None:
    section = name.removesuffix("_adamw")
    overrides = [f"optim.name={name}", f"{section}.update_proj_gap=3"]  # 7 steps: refreshes at 0, 3, 6
    st, _ = train_tiny(tmp_path, [*overrides, "apollo.rank=8"] if name == "apollo_adamw" else overrides, ApolloState)
    assert st.inner_state.mu["blocks"]["attn"]["q"]["kernel"].shape == moment  # (layers, r, out)
    assert st.inner_state.mu["embed"].shape == (512, 128)  # not a method leaf: full-size Adam
    assert st.update_norm["blocks"]["mlp"]["down"]["kernel"].shape == (1,)


def test_update_keeps_state_structure_shapes_and_dtypes_in_bf16() -> None:
    st = assert_state_stable(scale_by_apollo(3, update_proj_gap=2), BF16_SHAPES)
    assert st.inner_state.mu["w"].dtype == jnp.bfloat16 and st.update_norm["w"].dtype == jnp.float32
