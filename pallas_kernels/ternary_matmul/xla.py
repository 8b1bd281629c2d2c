"""The XLA implementation of the packed ternary matmul, and the input gradient both implementations use.

Forward: unpack ``W`` to float32 and one HIGHEST-precision matmul, scaled per row — the computation of
:func:`~pallas_kernels.ternary_matmul.reference.ternary_matmul_reference` with
``rowscale = scale · x_scale`` folded into one factor. Ternary weights as in BitNet b1.58 (Ma et al.,
"The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", arXiv 2402.17764).

Backward (:func:`x_grad`): ``dx = rowscale ⊙ (dy @ Wᵀ)`` from the weights unpacked to bfloat16, which holds
−1, 0 and 1 exactly, as bfloat16 GEMMs accumulating in float32 (the packed weights and the scales are
constants: inference weights). Every product ``dy · w`` is then exact, so a bfloat16 ``dy`` costs one GEMM
and loses nothing but float32 summation order. A float32 ``dy`` is split into three bfloat16 parts,
``dy = p₀ + p₁ + p₂ + ε`` with ``|ε| ≤ 2⁻²⁴ |dy|`` (each part the rounding of what the previous ones left),
so three tensor-core GEMMs give the float32 result — the product of a float32 GEMM at HIGHEST precision,
which GPUs run on the CUDA cores (``tests/pallas_kernels/test_ternary_matmul.py`` holds both paths to a
float64 reference).
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
    """``dx (M, K) = rowscale ⊙ (dy @ Wᵀ)`` in ``dtype``: bfloat16 GEMMs against the exactly unpacked ``W``
    with float32 accumulation, one for a bfloat16 ``dy``, three (its bfloat16 parts) otherwise (module doc)."""
    wt = unpack_ternary(packed, k).astype(jnp.bfloat16).T
    acc, rest = None, dy_MxN
    for _ in range(1 if dy_MxN.dtype == jnp.bfloat16 else 3):
        part = rest.astype(jnp.bfloat16)
        term = jnp.matmul(part, wt, preferred_element_type=jnp.float32)
        acc = term if acc is None else acc + term
        rest = rest.astype(jnp.float32) - part.astype(jnp.float32)
    return (acc * rowscale_M.astype(jnp.float32)[:, None]).astype(dtype)
