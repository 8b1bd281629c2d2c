"""GaLore projectors: top-r singular vectors (exact or randomized SVD), canonical signs, the refresh of a leaf.

A refresh whose gradient or SVD is not finite keeps the previous projector and counts as a failure. Refreshes are
``jax.lax.cond``\\ s, so a step that does not refresh computes no SVD (see the package docstring for how a batched
leaf is refreshed under ``refresh='all'`` and ``'staggered'``).
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
    one = lambda g, pi, po, k: _new_projectors(g, pi, po, k, plan, cfg)
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
