"""GaLore's opt-in flags and robustness: staggered refresh, randomized SVD, moment reprojection /
reset, canonical signs, failed SVDs, higher-rank leaves (dimension_numbers), register_moments."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.optim import GaLoreDims, register_moments, scale_by_adam_hf, scale_by_galore

# 'a': in < out (std: input side); 'c': a batch of 3 matrices with in > out (std: output side).
TREE = {"a": (6, 10), "c": (3, 7, 5), "bias": (5,)}
RANK, T, STEPS = 2, 2, 7
B1, B2 = 0.9, 0.999


def _tree(rng: np.random.Generator, shapes: dict = TREE) -> dict:
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


GRADS = [_tree(np.random.default_rng(100 + t)) for t in range(STEPS)]


def _flipping_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A valid SVD with data-dependent column signs (they change from one refresh to the next)."""
    u, s, vh = jnp.linalg.svd(x, full_matrices=False)
    d = jnp.where(x.reshape(-1)[: s.shape[0]] > 0, 1.0, -1.0).astype(u.dtype)
    return u * d, s, vh * d[:, None]


@functools.cache
def _trajectory(**kwargs: Any) -> tuple[list, list]:
    """Updates and states after each step of scale_by_galore(RANK, update_proj_gap=T, **kwargs) on GRADS (cached)."""
    tx = scale_by_galore(RANK, update_proj_gap=T, **kwargs)
    st = jax.jit(tx.init)(GRADS[0])
    update = jax.jit(tx.update)
    updates, states = [], []
    for g in GRADS:
        u, st = update(g, st)
        updates.append(u)
        states.append(st)
    return updates, states


def _allclose(a: Any, b: Any, tol: float = 1e-6) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.allclose(x, y, rtol=tol, atol=tol)), a, b)))


# --------------------------------------------------------------------------------------------
# Staggered refresh
# --------------------------------------------------------------------------------------------


def test_staggered_refresh_spreads_svds_over_the_gap() -> None:
    shapes = {"a": (6, 10), "c": (5, 6, 4), "d": (7, 4)}  # N = 7 matrices
    n_mat, gap, steps = 7, 3, 10
    rng = np.random.default_rng(1)
    tx = scale_by_galore(2, update_proj_gap=gap, refresh="staggered")
    st = tx.init(_tree(rng, shapes))
    update = jax.jit(tx.update)
    lasts, projs = [], []
    for _ in range(steps):
        _, st = update(_tree(rng, shapes), st)
        lasts.append(np.concatenate([np.ravel(st.last_refresh[k]) for k in shapes]))
        projs.append([np.asarray(x) for k in shapes for x in np.reshape(_proj(st, k), (-1,) + _proj(st, k).shape[-2:])])
    assert (lasts[0] == 0).all()  # step 0: every projector is computed once
    refreshed = np.array([lasts[c] == c for c in range(steps)])  # (step, matrix)
    offsets = (np.arange(n_mat) * gap) // n_mat
    for c in range(1, steps):
        np.testing.assert_array_equal(refreshed[c], c % gap == offsets, err_msg=f"step {c}")
        assert refreshed[c].sum() <= math.ceil(n_mat / gap)
        for i in range(n_mat):  # projectors change exactly when a refresh is recorded
            assert (not np.array_equal(projs[c][i], projs[c - 1][i])) == refreshed[c, i]
    for start in range(1, steps - gap + 1):  # every window of T steps refreshes each matrix exactly once
        np.testing.assert_array_equal(refreshed[start : start + gap].sum(0), 1)


def _proj(st: Any, key: str) -> jax.Array:
    p = st.proj_in[key]
    return st.proj_out[key] if isinstance(p, optax.MaskedNode) else p


# --------------------------------------------------------------------------------------------
# Randomized SVD
# --------------------------------------------------------------------------------------------


def _sin_theta(p: np.ndarray, q: np.ndarray) -> float:
    """Spectral norm of sin Θ between the column spaces of orthonormal p and q."""
    return float(np.linalg.norm(p - q @ (q.T @ p), 2))


def test_randomized_svd_finds_the_signal_subspace() -> None:
    rng = np.random.default_rng(2)
    m, n, r = 64, 48, 4
    u0, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v0, _ = np.linalg.qr(rng.standard_normal((n, r)))
    signal = u0 @ np.diag([10.0, 8.0, 6.0, 4.0]) @ v0.T
    noise = rng.standard_normal((m, n))
    g = signal + noise * np.linalg.norm(signal) / np.linalg.norm(noise) / 100.0  # SNR 100
    u_ex, _, vh_ex = np.linalg.svd(g)
    params = {"w": jnp.asarray(g, jnp.float32)}
    tx = scale_by_galore(r, proj_type="both", svd="randomized", power_iters=1, oversample=4)
    _, st = jax.jit(tx.update)(params, tx.init(params))
    p_in, p_out = np.asarray(st.proj_in["w"], np.float64), np.asarray(st.proj_out["w"], np.float64)
    np.testing.assert_allclose(p_in.T @ p_in, np.eye(r), atol=1e-5)
    assert _sin_theta(p_in, u_ex[:, :r]) < 0.05
    assert _sin_theta(p_out, vh_ex[:r].T) < 0.05
    # sanity of the metric: the exact top-r subspace of the noise-free signal is within the same bound
    assert _sin_theta(u0, u_ex[:, :r]) < 0.05 and _sin_theta(u0, u0) < 1e-12


# --------------------------------------------------------------------------------------------
# Moments: reproject / reset
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("proj_type", "refresh"), [("std", "all"), ("both", "staggered")])
def test_reproject_makes_the_trajectory_invariant_to_projector_signs(proj_type: str, refresh: str) -> None:
    plain, _ = _trajectory(proj_type=proj_type, refresh=refresh, moments="reproject")
    flipped, st = _trajectory(proj_type=proj_type, refresh=refresh, moments="reproject", _svd_fn=_flipping_svd)
    for t in range(STEPS):
        assert _allclose(plain[t], flipped[t], 1e-5), f"step {t}"
    assert int(st[-1].svd_failures) == 0


def test_keep_is_not_invariant_to_projector_signs() -> None:
    plain, _ = _trajectory()
    flipped, _ = _trajectory(_svd_fn=_flipping_svd)
    assert _allclose(plain[T - 1], flipped[T - 1])  # identical while moments start from zero …
    assert not _allclose(plain[-1]["a"], flipped[-1]["a"], 1e-3)  # … but not after a refresh


def _low(g: jax.Array, st: Any, key: str) -> np.ndarray:
    """Low-rank gradient of a 2-D leaf under the state's projector."""
    g = np.asarray(g, np.float64)
    if isinstance(st.proj_in[key], optax.MaskedNode):
        return g @ np.asarray(st.proj_out[key], np.float64)
    return np.asarray(st.proj_in[key], np.float64).T @ g


def test_reproject_rotates_first_moment_exactly_and_second_by_the_squared_rotation() -> None:
    _, states = _trajectory(moments="reproject")
    before, after = states[T - 1], states[T]  # refresh at count T
    p_old, p_new = (np.asarray(s.proj_in["a"], np.float64) for s in (before, after))
    rot = p_new.T @ p_old
    assert not np.allclose(np.abs(rot), np.eye(RANK), atol=1e-3)  # the basis really moved
    low = _low(GRADS[T]["a"], after, "a")
    mu_old, nu_old = (np.asarray(x["a"], np.float64) for x in (before.inner_state.mu, before.inner_state.nu))
    np.testing.assert_allclose(after.inner_state.mu["a"], B1 * rot @ mu_old + (1 - B1) * low, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        after.inner_state.nu["a"], B2 * (rot * rot) @ nu_old + (1 - B2) * low**2, rtol=1e-4, atol=1e-7
    )
    assert (np.asarray(after.inner_state.nu["c"]) >= 0).all()
    # output side of the batched leaf: m <- m Rᵀ per matrix
    for j in range(3):
        po_old = np.asarray(before.proj_out["c"][j], np.float64)
        po_new = np.asarray(after.proj_out["c"][j], np.float64)
        rot_c = po_new.T @ po_old
        g = np.asarray(GRADS[T]["c"][j], np.float64) @ po_new
        want = B1 * np.asarray(before.inner_state.mu["c"][j], np.float64) @ rot_c.T + (1 - B1) * g
        np.testing.assert_allclose(after.inner_state.mu["c"][j], want, rtol=1e-4, atol=1e-6)
    # between refreshes the moments evolve as plain Adam
    u_keep, s_keep = _trajectory()
    np.testing.assert_allclose(states[T - 1].inner_state.mu["a"], s_keep[T - 1].inner_state.mu["a"], rtol=1e-6)


def test_reset_zeroes_the_moments_of_refreshed_matrices() -> None:
    _, states = _trajectory(moments="reset")
    before, after = states[T - 1], states[T]
    low = _low(GRADS[T]["a"], after, "a")
    np.testing.assert_allclose(after.inner_state.mu["a"], (1 - B1) * low, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(after.inner_state.nu["a"], (1 - B2) * low**2, rtol=1e-5, atol=1e-9)
    # unprojected leaves keep accumulating; the inner count (bias correction) keeps counting
    bias_mu = B1 * np.asarray(before.inner_state.mu["bias"]) + (1 - B1) * np.asarray(GRADS[T]["bias"])
    np.testing.assert_allclose(after.inner_state.mu["bias"], bias_mu, rtol=1e-5, atol=1e-7)
    assert int(after.inner_state.count) == T + 1


class _MyAdamState(NamedTuple):
    count: jax.Array
    exp_avg: Any
    exp_avg_sq: Any


def test_register_moments_hook_for_another_state_type() -> None:
    hf = scale_by_adam_hf()

    def init(params: Any) -> _MyAdamState:
        return _MyAdamState(*hf.init(params))

    def update(updates: Any, state: _MyAdamState, params: Any = None) -> tuple[Any, _MyAdamState]:
        u, s = hf.update(updates, hf.init(updates)._replace(count=state.count, mu=state.exp_avg, nu=state.exp_avg_sq))
        return u, _MyAdamState(*s)

    inner = optax.GradientTransformation(init, update)
    with pytest.raises(ValueError, match="^moments='reproject'"):
        jax.eval_shape(scale_by_galore(RANK, base_optimizer=inner, moments="reproject").init, GRADS[0])
    register_moments(
        _MyAdamState, lambda s: (s.exp_avg, s.exp_avg_sq), lambda s, m, v: s._replace(exp_avg=m, exp_avg_sq=v)
    )
    mine, _ = _trajectory(moments="reproject", base_optimizer=inner)
    want, _ = _trajectory(moments="reproject")
    for t in range(STEPS):
        assert _allclose(mine[t], want[t]), f"step {t}"


# --------------------------------------------------------------------------------------------
# Canonical signs, failures
# --------------------------------------------------------------------------------------------


def test_canonical_signs_remove_the_svd_sign_ambiguity() -> None:
    plain, s_plain = _trajectory(proj_type="both", canonical_signs=True)
    flipped, s_flip = _trajectory(proj_type="both", canonical_signs=True, _svd_fn=_flipping_svd)
    for t in range(STEPS):
        for key in ("a", "c"):
            np.testing.assert_array_equal(s_plain[t].proj_in[key], s_flip[t].proj_in[key])
            np.testing.assert_array_equal(s_plain[t].proj_out[key], s_flip[t].proj_out[key])
        assert _allclose(plain[t], flipped[t])
    for p in (s_plain[-1].proj_in["a"], s_plain[-1].proj_out["a"], *s_plain[-1].proj_in["c"]):
        p = np.asarray(p)
        assert (p[np.argmax(np.abs(p), axis=0), np.arange(p.shape[1])] > 0).all()


def test_nan_gradient_at_a_refresh_keeps_the_projector_and_counts_a_failure() -> None:
    tx = scale_by_galore(RANK, update_proj_gap=T)
    st = tx.init(GRADS[0])
    update = jax.jit(tx.update)
    for g in GRADS[:T]:
        _, st = update(g, st)
    before = st
    bad = dict(GRADS[T], a=GRADS[T]["a"].at[1, 2].set(jnp.nan), c=GRADS[T]["c"].at[1, 0, 0].set(jnp.inf))
    _, st = update(bad, st)
    np.testing.assert_array_equal(st.proj_in["a"], before.proj_in["a"])
    np.testing.assert_array_equal(st.proj_out["c"][1], before.proj_out["c"][1])
    assert not np.array_equal(st.proj_out["c"][0], before.proj_out["c"][0])  # the finite matrices refresh
    assert int(st.svd_failures) == 2
    assert int(st.last_refresh["a"]) == 0 and list(np.asarray(st.last_refresh["c"])) == [T, 0, T]
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((st.proj_in, st.proj_out)))


def test_failing_svd_never_produces_nans() -> None:
    def broken_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        u, s, vh = jnp.linalg.svd(x, full_matrices=False)
        return u * jnp.nan, s, vh

    updates, states = _trajectory(_svd_fn=broken_svd)
    assert all(bool(jnp.all(jnp.isfinite(x))) for u in updates for x in jax.tree.leaves(u))
    np.testing.assert_array_equal(states[-1].proj_in["a"], np.eye(6, RANK))  # the initial truncated identity
    n_refresh = len(range(0, STEPS, T))
    assert int(states[-1].svd_failures) == n_refresh * 4  # 4 matrices ('a' + 3 in 'c') per refresh
    assert int(states[-1].last_refresh["a"]) == -1


# --------------------------------------------------------------------------------------------
# Higher-rank leaves
# --------------------------------------------------------------------------------------------


def test_dimension_numbers_reshape_and_batch_axes() -> None:
    rng = np.random.default_rng(3)
    # r: (embed, heads, head_dim) seen as embed × (heads·head_dim); q: batch axis in the middle.
    shapes = {"q": (6, 3, 5), "r": (6, 2, 5)}
    grads = [_tree(rng, shapes) for _ in range(4)]
    dims = {"q": GaLoreDims(batch=(1,), rows=(0,), cols=(2,)), "r": GaLoreDims(rows=(0,), cols=(1, 2))}
    as_matrices = lambda g: {
        "q0": g["q"][:, 0],
        "q1": g["q"][:, 1],
        "q2": g["q"][:, 2],
        "r": g["r"].reshape(6, 10),
    }
    tx_dims = scale_by_galore(RANK, update_proj_gap=T, dimension_numbers=dims)
    tx_flat = scale_by_galore(RANK, update_proj_gap=T)
    s1, s2 = tx_dims.init(grads[0]), tx_flat.init(as_matrices(grads[0]))
    assert s1.inner_state.mu["q"].shape == (3, 6, RANK)  # batch axis first; std: 6 > 5 -> output side
    assert s1.proj_in["r"].shape == (6, RANK)
    up1, up2 = jax.jit(tx_dims.update), jax.jit(tx_flat.update)
    for g in grads:
        u1, s1 = up1(g, s1)
        u2, s2 = up2(as_matrices(g), s2)
        assert u1["q"].shape == (6, 3, 5)
        assert _allclose(as_matrices(u1), u2, 1e-5)


def test_stacked_layers_get_one_projector_each() -> None:
    # the default for ndim > 2 (a scanned LLaMA's (layers, in, out) kernels) equals separate leaves
    _, states = _trajectory()
    g = {f"c{j}": GRADS[0]["c"][j] for j in range(3)}
    tx = scale_by_galore(RANK, update_proj_gap=T)
    _, st = jax.jit(tx.update)(g, tx.init(g))
    for j in range(3):
        np.testing.assert_allclose(states[0].proj_out["c"][j], st.proj_out[f"c{j}"], atol=1e-6)
