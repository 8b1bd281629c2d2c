"""HF-transformers-style Adam without learning rate: the inner optimizer of the official GaLore code.

Reference: the ``AdamW`` of HuggingFace transformers, as used by galore-torch (Zhao et al., "GaLore:
Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024, arXiv:2403.03507)::

    t ← t + 1;  m ← b1 m + (1-b1) g;  v ← b2 v + (1-b2) g²;  u = m / (√v + eps) · √(1-b2ᵗ) / (1-b1ᵗ)

It differs from :func:`optax.scale_by_adam` only in where ``eps`` enters (before the bias correction).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim.checks import check_real


class ScaleByAdamHFState(NamedTuple):
    """State of :func:`scale_by_adam_hf`: step count, first moment ``mu``, second moment ``nu``."""

    count: jax.Array  # int32 []
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_hf(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
    """Adam as in HF-transformers' ``AdamW`` (the official GaLore optimizer), without learning rate.

    ``t ← t + 1; m ← b1 m + (1-b1) g; v ← b2 v + (1-b2) g²;
    u = m / (√v + eps) · √(1-b2ᵗ) / (1-b1ᵗ)``. Unlike :func:`optax.scale_by_adam`, ``eps`` is
    added *before* the bias correction (so it acts as ``eps·√(1-b2ᵗ)`` in optax's convention).
    Defaults are galore-torch's (its ``eps`` default is 1e-6; the paper says 1e-8). The moments
    have the dtype of the params they are initialised on; updates have the gradient dtype.
    """
    check_real(b1, "b1", lo=0.0, hi=1.0, hi_open=True)
    check_real(b2, "b2", lo=0.0, hi=1.0, hi_open=True)
    check_real(eps, "eps", lo=0.0)

    def init_fn(params: optax.Params) -> ScaleByAdamHFState:
        zeros = optax.tree.zeros_like(params)
        return ScaleByAdamHFState(jnp.zeros([], jnp.int32), zeros, optax.tree.zeros_like(params))

    def update_fn(
        updates: optax.Updates, state: ScaleByAdamHFState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdamHFState]:
        del params
        count = optax.safe_int32_increment(state.count)
        mu = jax.tree.map(lambda g, m: (b1 * m + (1 - b1) * g).astype(m.dtype), updates, state.mu)
        nu = jax.tree.map(lambda g, v: (b2 * v + (1 - b2) * jnp.square(g)).astype(v.dtype), updates, state.nu)
        t = count.astype(jnp.float32)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        step = jnp.sqrt(1 - jnp.power(f32(b2), t)) / (1 - jnp.power(f32(b1), t))
        new_updates = jax.tree.map(lambda g, m, v: (m / (jnp.sqrt(v) + eps) * step).astype(g.dtype), updates, mu, nu)
        return new_updates, ScaleByAdamHFState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)
