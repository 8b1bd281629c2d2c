"""SLTrain matmul in plain XLA with the paper's memory-saving backward (``jax.custom_vjp``).

Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining", NeurIPS 2024, arXiv 2406.02214 (official code andyjm3/SLTrain). Flax orientation
``W (in, out) = A B · s + S``; ``S`` = ``values`` at the distinct flat indices ``idx``.

Forward: materialise ``W``, ``y = x W``; only the inputs ``(x, A, B, values, idx)`` are saved, not
``W``. Backward (the paper's, transposed to Flax orientation):

    Wᵀ recomputed from (A, B, values, idx)          (built transposed, behind an optimisation
                                                     barrier, so XLA cannot reuse the forward's W)
    dX = dY Wᵀ
    G  = Xᵀ dY                                      dense (in, out) gradient of W, float32
    dA = G Bᵀ · s        dB = Aᵀ G · s              dvalues = G.flat[idx]

Naive autodiff (:func:`~pallas_kernels.sl_matmul.reference.sl_matmul_reference`) keeps each layer's
``W`` alive from the forward to the backward pass; here the residuals are the parameters only.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.sl_matmul.reference import HIGHEST, materialize_w, sl_matmul_reference


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def sl_matmul_xla(
    x: jax.Array, a: jax.Array, b: jax.Array, values: jax.Array, idx: jax.Array, scale: float
) -> jax.Array:
    """``y = x @ (A B s + S)`` with W recomputed in the backward pass (see module docstring)."""
    return sl_matmul_reference(x, a, b, values, idx, scale)


def _fwd(x, a, b, values, idx, scale):
    return sl_matmul_reference(x, a, b, values, idx, scale), (x, a, b, values, idx)


def paper_backward(x, a, b, values, idx, scale, dy):
    """``(dX, dA, dB, dvalues)`` of ``y = x @ (A B s + S)``: W recomputed, dense G (the paper's backward)."""
    k, n = a.shape[0], b.shape[1]
    # W recomputed, directly in the transposed layout Wᵀ = s·Bᵀ Aᵀ + Sᵀ that dX needs. Being a
    # different expression from the forward's W, no backend can merge it with the forward's W by
    # common-subexpression elimination (XLA:CPU drops optimisation barriers before CSE).
    row, col = idx // n, idx % n
    w_t = materialize_w(b.T, a.T, values, col * k + row, scale, x.dtype)  # (out, in)
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    dx = jnp.dot(dy2, w_t, preferred_element_type=jnp.float32).astype(x.dtype).reshape(x.shape)
    g = jnp.dot(x2.T, dy2, preferred_element_type=jnp.float32)  # (in, out) dense gradient of W
    da = (jnp.dot(g, b.astype(jnp.float32).T, precision=HIGHEST) * scale).astype(a.dtype)
    db = (jnp.dot(a.astype(jnp.float32).T, g, precision=HIGHEST) * scale).astype(b.dtype)
    dv = g.reshape(-1)[idx].astype(values.dtype)
    return dx, da, db, dv


def _bwd(scale, res, dy):
    # The barrier hides that W is the forward's W, so XLA recomputes it here instead of keeping it.
    x, a, b, values, idx, dy = jax.lax.optimization_barrier((*res, dy))
    return (*paper_backward(x, a, b, values, idx, scale, dy), None)


sl_matmul_xla.defvjp(_fwd, _bwd)


def materialize_w_lowp(a: jax.Array, b: jax.Array, values: jax.Array, idx: jax.Array, scale: float, dtype) -> jax.Array:
    """``W = A B · s + S`` built in ``dtype`` itself: one default-precision GEMM of ``A, B`` cast to ``dtype``
    (float32 accumulation, ``dtype`` result), then the values added in ``dtype`` — what the official SLTrain
    code does under bf16 autocast. No float32 copy of ``W`` exists at any point."""
    k, n = a.shape[0], b.shape[1]
    w = jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=dtype) * jnp.asarray(scale, dtype)
    w = w.reshape(-1).at[idx].add(values.astype(dtype), indices_are_sorted=False, unique_indices=True)
    return w.reshape(k, n)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def sl_matmul_bf16w(
    x: jax.Array, a: jax.Array, b: jax.Array, values: jax.Array, idx: jax.Array, scale: float
) -> jax.Array:
    """``y = x @ (A B s + S)`` with ``W`` materialised in ``x.dtype`` (:func:`materialize_w_lowp`) and multiplied
    at the default precision, ``W`` recomputed in the backward pass (Han et al., arXiv 2406.02214; the
    official code's bf16 path). The float32 gradient ``G = Xᵀ dY`` gives ``dvalues``; ``dA``, ``dB`` are
    GEMMs of ``G`` cast to ``x.dtype``."""
    w = materialize_w_lowp(a, b, values, idx, scale, x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _bf16w_fwd(x, a, b, values, idx, scale):
    return sl_matmul_bf16w(x, a, b, values, idx, scale), (x, a, b, values, idx)


def _bf16w_bwd(scale, res, dy):
    x, a, b, values, idx, dy = jax.lax.optimization_barrier((*res, dy))
    k, n, cd = a.shape[0], b.shape[1], x.dtype
    row, col = idx // n, idx % n
    w_t = materialize_w_lowp(b.T, a.T, values, col * k + row, scale, cd)  # (out, in)
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    dx = jnp.dot(dy2, w_t, preferred_element_type=jnp.float32).astype(cd).reshape(x.shape)
    g = jnp.dot(x2.T, dy2, preferred_element_type=jnp.float32)  # (in, out)
    g_c = g.astype(cd)
    da = (jnp.dot(g_c, b.astype(cd).T, preferred_element_type=jnp.float32) * scale).astype(a.dtype)
    db = (jnp.dot(a.astype(cd).T, g_c, preferred_element_type=jnp.float32) * scale).astype(b.dtype)
    dv = g.reshape(-1)[idx].astype(values.dtype)
    return dx, da, db, dv, None


sl_matmul_bf16w.defvjp(_bf16w_fwd, _bf16w_bwd)
