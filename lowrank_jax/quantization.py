"""Asymmetric integer quantisation with round-to-nearest or stochastic rounding, shared by Q-GaLore's INT4
projectors (:mod:`lowrank_jax.optim.q_galore`) and its INT8 weights (:mod:`lowrank_jax.layers.int8`).

Per group: scale ``s = max(max − min, 1e-5) / levels`` and zero point ``z = clip(−round(min / s), 0, levels)``;
a value ``x`` is stored as ``clip(rnd(x / s) + z, 0, levels)`` and read back as ``(q − z) · s``. Stochastic rounding
(Q-GaLore, Zhang et al., arXiv:2407.08296) rounds up with probability equal to the fractional part, so the stored
value is unbiased.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scales_zeros(x: jax.Array, levels: int, axis: int) -> tuple[jax.Array, jax.Array]:
    """Per-group ``(s, z)`` over ``axis`` (kept): ``s = max(max − min, 1e-5) / levels``, ``z = clip(−round(min/s))``."""
    lo, hi = jnp.min(x, axis=axis, keepdims=True), jnp.max(x, axis=axis, keepdims=True)
    scales = jnp.maximum(hi - lo, 1e-5) / levels
    return scales, jnp.clip(-jnp.round(lo / scales), 0, levels)


def codes_of(x: jax.Array, scales: jax.Array, zeros: jax.Array, levels: int, key: jax.Array | None) -> jax.Array:
    """``clip(rnd(x / s) + z, 0, levels)`` as float: round to nearest (``key`` None) or stochastic rounding."""
    y = x / scales
    if key is None:
        y = jnp.round(y)
    else:
        low = jnp.floor(y)
        y = jnp.where(jax.random.uniform(key, y.shape) < y - low, low + 1, low)
    return jnp.clip(y + zeros, 0, levels)
