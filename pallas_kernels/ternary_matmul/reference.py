"""Plain-XLA reference of the packed ternary matmul: unpack, then one dense matmul in float32.

    y[m, n] = rowscale[m] · Σ_k x[m, k] · W[k, n],     W = unpack(packed) ∈ {−1, 0, 1}
    rowscale[m] = scale · x_scale[m]   (x_scale omitted: 1)

``scale`` is the per-tensor weight scale (BitNet b1.58's ``mean|W|``); ``x_scale`` the per-row
dequantisation factor of int8 activations (``max|x| / 127``). Products are formed in float32 from
exactly representable inputs (bf16/int8/ternary), so only the summation order can differ from a
kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ternary_matmul.layout import unpack_ternary


def ternary_matmul_reference(
    x_MxK: jax.Array,
    packed_KqxN: jax.Array,
    scale: jax.Array | float,
    k: int,
    x_scale_M: jax.Array | None = None,
    out_dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """``rowscale ⊙ (x @ unpack(packed))`` computed by XLA in float32 (HIGHEST precision)."""
    w = unpack_ternary(packed_KqxN, k).astype(jnp.float32)
    y = jnp.matmul(x_MxK.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    y = y * jnp.asarray(scale, jnp.float32)
    if x_scale_M is not None:
        y = y * x_scale_M.astype(jnp.float32)[:, None]
    return y.astype(out_dtype)
