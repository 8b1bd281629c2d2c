"""The XLA implementation of the packed ternary matmul, and the input gradient both implementations use.

Forward: unpack ``W`` to float32 and one HIGHEST-precision matmul, scaled per row — the computation of
:func:`~pallas_kernels.ternary_matmul.reference.ternary_matmul_reference` with
``rowscale = scale · x_scale`` folded into one factor. Ternary weights as in BitNet b1.58 (Ma et al.,
"The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", arXiv 2402.17764).

Backward (:func:`x_grad`): ``dx = (dy ⊙ rowscale) @ Wᵀ`` from the unpacked weights, in float32; the
packed weights and the scales are constants (inference weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ternary_matmul.layout import unpack_ternary
from pallas_kernels.ternary_matmul.reference import ternary_matmul_reference


def ternary_matmul_xla(
    x_MxK: jax.Array, packed: jax.Array, rowscale_M: jax.Array, k: int, out_dtype: jnp.dtype
) -> jax.Array:
    """``rowscale ⊙ (x @ unpack(packed))`` computed by XLA in float32."""
    return ternary_matmul_reference(x_MxK, packed, 1.0, k, rowscale_M, out_dtype)


def x_grad(dy_MxN: jax.Array, packed: jax.Array, rowscale_M: jax.Array, k: int, dtype: jnp.dtype) -> jax.Array:
    """``dx (M, K) = (dy ⊙ rowscale) @ Wᵀ`` in ``dtype``, W unpacked to float32 (HIGHEST precision)."""
    w = unpack_ternary(packed, k).astype(jnp.float32)
    g = dy_MxN.astype(jnp.float32) * rowscale_M.astype(jnp.float32)[:, None]
    return jnp.matmul(g, w.T, precision=jax.lax.Precision.HIGHEST).astype(dtype)
