"""GaLore projectors: top-r singular vectors (exact or randomized SVD), canonical signs, the refresh of a leaf;
and the random projections of GoLore (orthonormal) and APOLLO (Gaussian).

A refresh whose gradient or SVD is not finite keeps the previous projector and counts as a failure. Refreshes are
``jax.lax.cond``\\ s, so a step that does not refresh computes no SVD (see the package docstring for how a batched
leaf is refreshed under ``refresh='all'`` and ``'staggered'``).

Random matrices are drawn from ``jax.random.fold_in(fold_in(fold_in(key(seed), t), j), side)``: ``t`` the step of
the refresh, ``j`` the matrix index (leaves in flatten order, every matrix of a batched leaf counts), ``side`` 0
for the input-side projector and 1 for the output side (:func:`matrix_keys`, :func:`side_key`).

The matrix index is ``j = local · stride + offset`` with the state's ``numbering = (offset, stride)``
(:func:`matrix_indices`): ``(0, 1)`` for a transform over the whole model; the per-layer fused update
(:mod:`lowrank_jax.train.layerwise`), which runs one block's transform per layer, sets layer ``l`` of ``L`` to
``(l, L)``, so every layer's matrix gets the index it has in the stacked model (the same random draws and
staggered refresh offsets as the ordinary step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.optim.galore.plan import _Plan

REFRESH_MODES = ("all", "staggered")
SVD_MODES = ("exact", "randomized")
# 'svd': GaLore; 'random': GoLore (He et al. 2025), random orthonormal projectors from step random_from on.
PROJECTORS = ("svd", "random")

SvdFn = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def _dense_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.linalg.svd(x, full_matrices=False)


def _canonical_columns(x_kr: jax.Array) -> jax.Array:
    """Flip each column so that its largest-|·| entry is positive."""
    idx = jnp.argmax(jnp.abs(x_kr), axis=0)
    sign = jnp.sign(jnp.take_along_axis(x_kr, idx[None, :], axis=0))
    return x_kr * jnp.where(sign == 0, 1, sign).astype(x_kr.dtype)


@dataclasses.dataclass(frozen=True)
class _SvdConfig:
    svd: str
    power_iters: Any  # int or traced
    oversample: int
    canonical_signs: bool
    svd_fn: SvdFn
    projector: str = "svd"
    use_random: Any = False  # bool or traced: this step's refreshes draw random projectors (GoLore)


def default_numbering() -> jax.Array:
    """``(offset, stride) = (0, 1)``: a transform's matrices numbered as they come (see the module doc)."""
    return jnp.array([0, 1], jnp.int32)


def matrix_indices(plan: _Plan, numbering: jax.Array) -> jax.Array:
    """The global indices of a leaf's matrices, ``(B,)`` int32: ``(first + b) · stride + offset``."""
    local = jnp.arange(plan.first, plan.first + plan.nmat, dtype=jnp.int32)
    return local * numbering[1] + numbering[0]


def matrix_keys(base_key: jax.Array, idx: jax.Array) -> jax.Array:
    """One key per matrix, ``(B,)``: ``base_key`` folded with the matrix's global index (:func:`matrix_indices`)."""
    return jax.vmap(lambda j: jax.random.fold_in(base_key, j))(idx)


def side_key(key: jax.Array, use_out: bool) -> jax.Array:
    """The key of one side's projector: 0 for the input side, 1 for the output side."""
    return jax.random.fold_in(key, int(use_out))


def random_orthonormal(key: jax.Array, dim: int, r: int) -> jax.Array:
    """A ``dim × r`` matrix with orthonormal columns, uniform on the Stiefel manifold (float32).

    GoLore (arXiv 2410.11289, §4) samples ``Z`` with i.i.d. N(0, 1) entries and takes its polar factor
    ``Z (ZᵀZ)^(-1/2)`` (official ``get_random_orthogonal_matrix``, peft_pretraining/projector.py), which is
    ``U Vᵀ`` for the thin SVD ``Z = U S Vᵀ``.
    """
    z = jax.random.normal(key, (dim, r), jnp.float32)
    u, _, vh = jnp.linalg.svd(z, full_matrices=False)
    return u @ vh


def random_gaussian(key: jax.Array, dim: int, r: int) -> jax.Array:
    """APOLLO's projection: ``dim × r`` with i.i.d. N(0, 1/r) entries (float32).

    Official apollo_torch/random_projector.py, ``get_orthogonal_matrix``: ``stable_randn(shape) / sqrt(rank)``;
    not orthonormal; scaled so that ``E[P Pᵀ] = I`` (Johnson–Lindenstrauss: ``‖Pᵀx‖ ≈ ‖x‖``).
    """
    return jax.random.normal(key, (dim, r), jnp.float32) / jnp.sqrt(jnp.float32(r))


def _top_singular(
    x_mn: jax.Array, r: int, key: jax.Array | None, cfg: _SvdConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-r ``(u (m×r), s (r,), vh (r×n))`` of a float32 matrix."""
    m, n = x_mn.shape
    if cfg.svd == "exact":
        u, s, vh = cfg.svd_fn(x_mn)
        return u[:, :r], s[:r], vh[:r]
    k = min(r + cfg.oversample, m, n)
    omega_nk = jax.random.normal(key, (n, k), jnp.float32)
    q_mk, _ = jnp.linalg.qr(x_mn @ omega_nk)

    def power(_: Any, q: jax.Array) -> jax.Array:
        z_nk, _ = jnp.linalg.qr(x_mn.T @ q)
        q, _ = jnp.linalg.qr(x_mn @ z_nk)
        return q

    q_mk = jax.lax.fori_loop(0, cfg.power_iters, power, q_mk)
    ub_kk, s, vh_kn = cfg.svd_fn(q_mk.T @ x_mn)
    return (q_mk @ ub_kk)[:, :r], s[:r], vh_kn[:r]


def _random_projectors(
    p_in: jax.Array | None, p_out: jax.Array | None, key: jax.Array, plan: _Plan
) -> tuple[jax.Array | None, jax.Array | None, jax.Array]:
    """GoLore: fresh random orthonormal projectors for the projected side(s); never a failure."""
    new_in = None if p_in is None else random_orthonormal(side_key(key, False), plan.m, plan.rank).astype(p_in.dtype)
    new_out = None if p_out is None else random_orthonormal(side_key(key, True), plan.n, plan.rank).astype(p_out.dtype)
    return new_in, new_out, jnp.ones((), bool)


def _new_projectors(
    g_mn: jax.Array,
    p_in: jax.Array | None,
    p_out: jax.Array | None,
    key: jax.Array | None,
    plan: _Plan,
    cfg: _SvdConfig,
) -> tuple[jax.Array | None, jax.Array | None, jax.Array]:
    """Projectors from the SVD of one gradient matrix, or the old ones if anything is not finite."""
    x = g_mn.astype(jnp.float32)
    finite_in = jnp.all(jnp.isfinite(x))
    u, s, vh = _top_singular(jnp.where(finite_in, x, 0.0), plan.rank, key, cfg)
    if cfg.canonical_signs:
        u, vh = _canonical_columns(u), _canonical_columns(vh.T).T
    ok = finite_in & jnp.all(jnp.isfinite(s)) & jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(vh))
    new_in = None if p_in is None else jnp.where(ok, u.astype(p_in.dtype), p_in)
    new_out = None if p_out is None else jnp.where(ok, vh.T.astype(p_out.dtype), p_out)
    return new_in, new_out, ok


def _refresh_leaf(
    plan: _Plan,
    g_b: jax.Array,
    pin_b: jax.Array | None,
    pout_b: jax.Array | None,
    do_b: jax.Array,
    keys_b: jax.Array | None,
    staggered: bool,
    cfg: _SvdConfig,
) -> tuple[jax.Array | None, jax.Array | None, jax.Array, jax.Array]:
    """New ``(pin_b, pout_b, refreshed_b, failed_b)`` for the ``B`` matrices of a leaf."""

    def one(g: jax.Array, pi: Any, po: Any, k: Any) -> tuple[Any, Any, jax.Array]:
        svd_fn = lambda: _new_projectors(g, pi, po, k, plan, cfg)
        if cfg.projector == "svd":
            return svd_fn()
        # GoLore: with projector='random' a cond on this step's use_random draws random ones instead (no SVD)
        return jax.lax.cond(cfg.use_random, lambda: _random_projectors(pi, po, k, plan), svd_fn)

    yes = jnp.ones((), bool)
    if staggered and plan.nmat > 1:
        # One cond per matrix inside a sequential map: only the due matrices compute an SVD.
        def body(args: tuple) -> tuple:
            g, pi, po, do, k = args
            pi, po, ok = jax.lax.cond(do, one, lambda g, pi, po, k: (pi, po, yes), g, pi, po, k)
            return pi, po, do & ok, do & ~ok

        return jax.lax.map(body, (g_b, pin_b, pout_b, do_b, keys_b))

    # Every matrix of the leaf is due at the same steps (or B == 1): one cond, all SVDs inside.
    def refresh_all(g: jax.Array, pi: Any, po: Any, k: Any) -> tuple[Any, Any, jax.Array]:
        if jax.default_backend() == "cpu":
            # Batched CPU LAPACK kernels fan their batch out onto the thread pool that every host
            # device also runs on; with several CPU devices refreshing at once they all wait on
            # tasks that no free thread can pick up (a deadlock seen with jax 0.10.2 on 8 devices).
            # One matrix at a time keeps each kernel unbatched; on CPU this costs no parallelism
            # the thunk executor does not already get from the independent leaves.
            return jax.lax.map(lambda a: one(*a), (g, pi, po, k))
        return jax.vmap(one)(g, pi, po, k)

    def keep_all(g: jax.Array, pi: Any, po: Any, k: Any) -> tuple[Any, Any, jax.Array]:
        return pi, po, jnp.ones(do_b.shape, bool)

    pin_b, pout_b, ok_b = jax.lax.cond(do_b[0], refresh_all, keep_all, g_b, pin_b, pout_b, keys_b)
    return pin_b, pout_b, do_b & ok_b, do_b & ~ok_b
