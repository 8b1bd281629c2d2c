"""The Pallas implementation of the packed ternary matmul, for the platform being lowered.

``ternary_matmul_pallas(x, packed, rowscale, k, out_dtype, blocks, interpret)`` computes
``rowscale ⊙ (x @ W)`` for 2-D ``x (M, K)`` with the kernel of :mod:`pallas_kernels.ternary_matmul.tiles`
— Triton on GPUs, Mosaic on TPUs, the interpreter on CPU, picked when the computation is lowered
(:func:`pallas_kernels.platforms.per_platform`). Per call it chooses blocks
(:mod:`pallas_kernels.ternary_matmul.blocks`), pads the operands to them
(:mod:`pallas_kernels.ternary_matmul.layout`) and slices the result back. Not differentiable by
itself: the op's VJP (:mod:`pallas_kernels.ternary_matmul.api`) comes from the unpacked weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.platforms import per_platform
from pallas_kernels.ternary_matmul.blocks import choose_blocks
from pallas_kernels.ternary_matmul.layout import pad_operands
from pallas_kernels.ternary_matmul.tiles import ternary_matmul_pallas_padded


def _pallas_on(target, k, out_dtype, blocks, x_MxK, packed, rowscale_M):
    m, (kq, n) = x_MxK.shape[0], packed.shape
    blk = choose_blocks(target, m, kq, n, jnp.dtype(x_MxK.dtype).itemsize, blocks)
    xp, wp, sp = pad_operands(x_MxK, packed, rowscale_M, k, blk)
    if blk.splits > 1:  # float32 partials of the split-K GEMV, summed here
        parts = ternary_matmul_pallas_padded(
            xp,
            wp,
            sp,
            bm=blk.bm,
            bn=blk.bn,
            bkq=blk.bkq,
            out_dtype=jnp.float32,
            target=target,
            num_warps=blk.num_warps,
            splits=blk.splits,
        )
        return parts[:, :m, :n].sum(axis=0).astype(out_dtype)
    y = ternary_matmul_pallas_padded(
        xp, wp, sp, bm=blk.bm, bn=blk.bn, bkq=blk.bkq, out_dtype=out_dtype, target=target, num_warps=blk.num_warps
    )
    return y[:m, :n]


def ternary_matmul_pallas(
    x_MxK: jax.Array,
    packed: jax.Array,
    rowscale_M: jax.Array,
    k: int,
    out_dtype: jnp.dtype,
    blocks: tuple[int, int, int] | None,
    interpret: bool,
) -> jax.Array:
    """``rowscale ⊙ (x @ unpack(packed))`` by the Pallas kernel; ``blocks``: a request, legalised per target."""
    build = lambda target: functools.partial(_pallas_on, target, k, out_dtype, blocks)
    return per_platform(build, x_MxK, packed, rowscale_M, interpret=interpret)
