"""What APOLLO and Fira share: the low-rank Adam ratio as a scaling factor, and the norm-growth limiter.

Both run HF-style Adam (:func:`~lowrank_jax.optim.adam_hf.scale_by_adam_hf`, or its 8-bit form) on a projected
gradient ``R`` and read off how much Adam rescales it, ``‖N‖ / ‖R‖`` with ``N = m / (√v + ε)`` (the official
``norm_grad = exp_avg / denom``, *before* the bias correction, which the official code folds into the step size).
The factor is per channel (norms over the rank axis of ``R``) or per matrix (Frobenius norms, APOLLO-Mini).

Norm-growth limiter (Fira, Chen et al. 2024, arXiv:2410.01623, §3.3; official fira_adamw.py, used as-is by
APOLLO): with ``S_t`` the scaled update of a matrix and ``s_{t-1}`` the norm kept from the previous step,
``λ = max(‖S_t‖ / (s_{t-1} + 1e-8), γ) / γ``, ``S_t ← S_t / λ``, ``s_t = ‖S_t‖`` (after the division); nothing is
limited at the first step, which only records ``s_0 = ‖S_0‖``. So the norm grows by at most ``γ`` per step
(official γ = 1.01); ``γ = 0`` switches the limiter off (APOLLO's ``disable_nl``).

Memory: only the factors, norms and limiter values are float32 (``(B, 1, n)`` or smaller); the full-size
arithmetic runs in the gradient dtype, as in the official code, and the norms are float32 reductions.

Orientation: a Flax gradient matrix is ``m (in) × n (out)``. With an input-side projector the low-rank ``R`` is
``r × n`` and the channels are the ``n`` output columns; with an output-side projector ``R`` is ``m × r`` and the
channels are the ``m`` input rows: the norms always run over the rank axis, the official rule
(``norm_dim = 0 if shape[0] < shape[1] else 1`` in PyTorch orientation picks the rank axis for every one-sided
projector the official code can run).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim.adam_8bit import scale_by_adam_8bit
from lowrank_jax.optim.adam_hf import scale_by_adam_hf
from lowrank_jax.optim.checks import check_bool, check_real, is_traced
from lowrank_jax.optim.projection import Plan

SCALE_TYPES = ("channel", "tensor")
# one-sided projections only: a two-sided R (r × r) has no channels of the gradient's shape
ONE_SIDED_PROJ_TYPES = ("std", "reverse_std", "input", "output")
NORM_EPS = 1e-8  # official: torch.norm(grad, dim=norm_dim) + 1e-8 (fira_adamw.py, apollo.py); also the limiter's


def hf_adam(b1: float, b2: float, eps: float, eight_bit: bool) -> optax.GradientTransformation:
    """The official inner optimizer: HF-transformers AdamW without lr, in float or 8-bit moments."""
    check_bool(eight_bit, "eight_bit")
    if eight_bit:
        return scale_by_adam_8bit(b1, b2, eps, eps_placement="hf")
    return scale_by_adam_hf(b1, b2, eps)


def check_norm_growth_limit(value: Any) -> None:
    """γ = 0 (no limiter) or γ >= 1 (the norm may grow by at most γ per step)."""
    v = check_real(value, "norm_growth_limit", lo=0.0)
    if v is not None and 0.0 < v < 1.0:
        raise ValueError(f"norm_growth_limit: must be 0 (off) or >= 1 (official 1.01), got {value!r}")


def hf_step_size(b1: Any, b2: Any, count: jax.Array) -> jax.Array:
    """``√(1 − b2ᵗ) / (1 − b1ᵗ)`` for ``t = count + 1``: the bias correction HF-Adam multiplies its step by."""
    t = (count + 1).astype(jnp.float32)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return jnp.sqrt(1 - jnp.power(f32(b2), t)) / (1 - jnp.power(f32(b1), t))


def scaling_factor(n_b: jax.Array, r_b: jax.Array, plan: Plan, scale_type: str) -> jax.Array:
    """``‖N‖ / (‖R‖ + 1e-8)`` of low-rank ``(B, ·, ·)`` matrices, broadcastable to the gradient's ``(B, m, n)``.

    ``'channel'``: over the rank axis, shape ``(B, 1, n)`` (input side projected) or ``(B, m, 1)``;
    ``'tensor'``: over the whole matrix, ``(B, 1, 1)``.
    """
    n_b, r_b = n_b.astype(jnp.float32), r_b.astype(jnp.float32)
    axis = (1, 2) if scale_type == "tensor" else (1 if plan.use_in else 2)
    norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return norm(n_b) / (norm(r_b) + NORM_EPS)


def frobenius(x_b: jax.Array, factor: jax.Array | float = 1.0) -> jax.Array:
    """``‖factor ⊙ x‖`` per matrix of ``(B, m, n)``, accumulated in float32 (no float32 copy of ``x`` is kept)."""
    return jnp.sqrt(jnp.sum(jnp.square(x_b.astype(jnp.float32) * factor), axis=(1, 2)))


def growth_limiter(norm_b: jax.Array, prev_b: jax.Array, first: jax.Array, gamma: Any) -> tuple[jax.Array, jax.Array]:
    """The limiter (module doc) from the updates' norms ``(B,)``: ``(divisor λ, norm kept for the next step)``."""
    if not is_traced(gamma) and float(gamma) == 0.0:
        return jnp.ones_like(norm_b), norm_b
    g = jnp.asarray(gamma, jnp.float32)
    safe_g = jnp.where(g > 0, g, 1.0)
    limiter = jnp.maximum(norm_b / (prev_b + NORM_EPS), safe_g) / safe_g
    limiter = jnp.where(first | (g == 0), 1.0, limiter)
    return limiter, norm_b / limiter
