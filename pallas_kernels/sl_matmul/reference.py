"""Plain-XLA reference of the SLTrain matmul: materialise ``W`` then one dense matmul (naive autodiff).

SLTrain (Han, Li, Lin, Mishra, Zhu, "SLTrain: a sparse plus low-rank approach for parameter and
memory efficient pretraining", NeurIPS 2024, arXiv 2406.02214) parameterises a linear layer as

    W (in, out) = A (in, r) @ B (r, out) · s + S          s = alpha / r,  S sparse with fixed support

(Flax orientation; the paper writes ``W = B A s + S`` for the PyTorch ``(out, in)`` weight). ``S`` is
stored as ``values`` (nnz,) at distinct flat row-major indices ``idx`` (nnz,) into the ``in·out``
entries. The reference builds ``W`` in float32 (``A B s``, then a scatter-add of the values), casts
it to the input's dtype and computes ``y = x @ W`` with float32 accumulation. Differentiated by
plain autodiff, it keeps ``W`` alive as a residual for the backward pass: this is the baseline the
paper's custom backward (:mod:`pallas_kernels.sl_matmul.xla`) and the Pallas kernel improve on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def materialize_w(
    a: jax.Array, b: jax.Array, values: jax.Array, idx: jax.Array, scale: float, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """``W = A B · s + S`` as a dense ``(in, out)`` array of ``dtype`` (built in float32)."""
    k, n = a.shape[0], b.shape[1]
    w = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=HIGHEST) * scale
    w = w.reshape(-1).at[idx].add(values.astype(jnp.float32), indices_are_sorted=False, unique_indices=True)
    return w.reshape(k, n).astype(dtype)


def sl_matmul_reference(
    x: jax.Array, a: jax.Array, b: jax.Array, values: jax.Array, idx: jax.Array, scale: float
) -> jax.Array:
    """``y = x @ (A B s + S)`` for ``x (..., in)``: W materialised in ``x.dtype``, float32 accumulation."""
    w = materialize_w(a, b, values, idx, scale, x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
