"""Public entry point of the packed ternary matmul: ``implementation='auto' | 'xla' | 'pallas'``.

``ternary_matmul(x, packed, scale, k=K)`` computes ``scale · x̃ @ W`` (and ``· x_scale`` per row for
int8 activations) for a ternary kernel ``W (K, N)`` stored 4 weights per byte
(:func:`~pallas_kernels.ternary_matmul.packing.pack_ternary`). ``x`` may carry leading batch
dimensions ``(..., K)``; its dtype is bfloat16, float32 or int8 (then ``x_scale (...)`` is required).

``implementation='auto'`` (the default; ``None`` is the same) is the Pallas kernel on GPU and TPU
backends — Triton on GPUs, Mosaic on TPUs, chosen when the computation is lowered
(:mod:`pallas_kernels.platforms`) — and the XLA reference on CPU, where Pallas only interprets
(``implementation='pallas'`` there runs the interpreter, for tests). Each decision is recorded
(:mod:`pallas_kernels.selection`). The VJP with respect to floating ``x`` is
``dx = (dy ⊙ rowscale) @ Wᵀ`` (XLA, from the unpacked weights); ``packed``, ``scale`` and ``x_scale``
are treated as constants (inference weights).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.platforms import (
    GPU_SMEM_BUDGET,
    LANE,
    TPU_VMEM_BUDGET,
    Target,
    fit_block,
    per_platform,
    pow2_at_least,
    round_up,
    sublane,
)
from pallas_kernels.selection import IMPLEMENTATIONS, choose, signature
from pallas_kernels.ternary_matmul.kernel import ternary_matmul_pallas_padded
from pallas_kernels.ternary_matmul.packing import packed_rows, unpack_ternary
from pallas_kernels.ternary_matmul.reference import ternary_matmul_reference

__all__ = ["IMPLEMENTATIONS", "TernaryBlocks", "choose_blocks", "pad_operands", "ternary_matmul"]
NUM_STAGES = 2  # Triton pipelining depth of the packed-row loop


class TernaryBlocks(NamedTuple):
    bm: int
    bn: int
    bkq: int
    num_warps: int = 4


def smem_bytes(blk: TernaryBlocks, itemsize: int) -> int:
    """Estimate of one Triton program's shared memory: :data:`NUM_STAGES` copies of each iteration's
    loads (packed tile + four activation tiles), one unpacked plane staged for the dot, the epilogue tile."""
    bm, bn, bkq = blk.bm, blk.bn, blk.bkq
    return NUM_STAGES * (bkq * bn + 4 * bm * bkq * itemsize) + 2 * bkq * bn + 4 * bm * bn


def vmem_bytes(blk: TernaryBlocks, itemsize: int) -> int:
    """Estimate of one TPU kernel's VMEM: double-buffered blocks, the accumulator and the unpacked planes."""
    bm, bn, bkq = blk.bm, blk.bn, blk.bkq
    blocks = 2 * (bkq * bn + 4 * bm * bkq * itemsize + bm * 4 + bm * bn * 4)
    return blocks + 4 * bm * bn + bkq * bn * (4 + 4 * 2)


def _legal_tpu(b: int, extent: int, align: int) -> int:
    """A TPU block: the whole (unpadded) extent if it fits in ``b``, else ``b`` rounded up to ``align``."""
    return extent if extent <= b else round_up(b, align)


def choose_blocks(
    target: Target, m: int, kq: int, n: int, itemsize: int, blocks: tuple[int, int, int] | None = None
) -> TernaryBlocks:
    """``(bm, bn, bkq)`` for an ``(m, 4·kq) @ (4·kq, n)`` problem on ``target`` (``blocks``: a request).

    GPU (Triton): powers of two ≥ 16 (Triton's tensor and dot minimums); ``bm ≤ 64``; ``bn ≤ 64`` for
    GEMV (``m ≤ 16``: 4096×11008 then has 172 programs, more than an H100's 132 SMs) and ≤ 128 for
    GEMM; each preferring a size that divides the extent so the packed weights are not padded
    (a per-call copy); ``bkq`` the largest of 128 … 16 under :data:`GPU_SMEM_BUDGET`.

    TPU (Mosaic): ``bm`` spans all rows up to 256 (a block equal to the full dimension is legal at any
    size: a GEMV moves one row, not 8 or 32), else 256; ``bn`` and ``bkq`` multiples of 128 up to
    512 that divide the extent where possible (uint8 weights tile (32, 128), the activations' lane dim
    is ``bkq``), under :data:`TPU_VMEM_BUDGET`. A request is legalised the same way (interpreted: as given).
    """
    if blocks is not None and target.interpret:
        return TernaryBlocks(*blocks)
    if target.tpu:
        if blocks is not None:
            bm, bn, bkq = blocks
            return TernaryBlocks(_legal_tpu(bm, m, sublane(itemsize)), round_up(bn, LANE), round_up(bkq, LANE))
        bm = m if m <= 256 else 256
        bn = fit_block(n, LANE, 512)
        for bkq in (512, 256, 128):
            blk = TernaryBlocks(bm, bn, min(bkq, fit_block(kq, LANE, bkq)))
            if vmem_bytes(blk, itemsize) <= TPU_VMEM_BUDGET:
                break
        return blk
    if blocks is not None:
        return TernaryBlocks(*(pow2_at_least(b, 16) for b in blocks))
    bm = min(64, pow2_at_least(m, 16))
    bn = fit_block(n, 16, 64 if m <= 16 else 128)
    for bkq in (128, 64, 32, 16):
        blk = TernaryBlocks(bm, bn, min(bkq, fit_block(kq, 16, bkq)))
        if smem_bytes(blk, itemsize) <= GPU_SMEM_BUDGET:
            break
    return blk


def pad_operands(x_MxK, packed, rowscale_M, k, blk: TernaryBlocks):
    """Pad to block multiples in the kernel's layout: ``(x (Mp, 4·Kqp), packed (Kqp, Np), rowscale (Mp, 1))``.

    Activation plane ``j`` (columns ``j·Kq … j·Kq + Kq`` after zero-padding ``K`` to ``4·Kq``) is
    moved to columns ``j·Kqp …``; padded packed bytes are 0x55 (four zero weights) and padded
    activations are 0, so padded outputs are exactly 0. Nothing is copied along an axis that needs no padding.
    """
    m = x_MxK.shape[0]
    kq, n = packed.shape
    mp, np_, kqp = round_up(m, blk.bm), round_up(n, blk.bn), round_up(kq, blk.bkq)
    xp = jnp.pad(x_MxK, ((0, 0), (0, 4 * kq - k))).reshape(m, 4, kq)
    xp = jnp.pad(xp, ((0, mp - m), (0, 0), (0, kqp - kq))).reshape(mp, 4 * kqp)
    wp = packed if (kqp, np_) == (kq, n) else jnp.pad(packed, ((0, kqp - kq), (0, np_ - n)), constant_values=0x55)
    sp = jnp.pad(rowscale_M.astype(jnp.float32), (0, mp - m)).reshape(mp, 1)
    return xp, wp, sp


def _pallas_on(target, k, out_dtype, blocks, x_MxK, packed, rowscale_M):
    m, (kq, n) = x_MxK.shape[0], packed.shape
    blk = choose_blocks(target, m, kq, n, jnp.dtype(x_MxK.dtype).itemsize, blocks)
    xp, wp, sp = pad_operands(x_MxK, packed, rowscale_M, k, blk)
    y = ternary_matmul_pallas_padded(
        xp, wp, sp, bm=blk.bm, bn=blk.bn, bkq=blk.bkq, out_dtype=out_dtype, target=target, num_warps=blk.num_warps
    )
    return y[:m, :n]


def _pallas_2d(x_MxK, packed, rowscale_M, k, out_dtype, blocks, interpret):
    build = lambda target: functools.partial(_pallas_on, target, k, out_dtype, blocks)  # noqa: E731
    return per_platform(build, x_MxK, packed, rowscale_M, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _matmul_float(x_MxK, packed, rowscale_M, k, impl, out_dtype, blocks, interpret):
    if impl == "xla":
        return ternary_matmul_reference(x_MxK, packed, 1.0, k, rowscale_M, out_dtype)
    return _pallas_2d(x_MxK, packed, rowscale_M, k, out_dtype, blocks, interpret)


def _fwd(x_MxK, packed, rowscale_M, k, impl, out_dtype, blocks, interpret):
    y = _matmul_float(x_MxK, packed, rowscale_M, k, impl, out_dtype, blocks, interpret)
    return y, (packed, rowscale_M, jnp.zeros((0,), x_MxK.dtype))  # last: x's dtype only


def _bwd(k, impl, out_dtype, blocks, interpret, res, dy_MxN):
    packed, rowscale_M, x_like = res
    w = unpack_ternary(packed, k).astype(jnp.float32)
    g = dy_MxN.astype(jnp.float32) * rowscale_M.astype(jnp.float32)[:, None]
    dx = jnp.matmul(g, w.T, precision=jax.lax.Precision.HIGHEST).astype(x_like.dtype)
    return dx, np.zeros(packed.shape, jax.dtypes.float0), jnp.zeros_like(rowscale_M)


_matmul_float.defvjp(_fwd, _bwd)


def ternary_matmul(
    x: jax.Array,
    packed_KqxN: jax.Array,
    scale: jax.Array | float,
    *,
    k: int,
    x_scale: jax.Array | None = None,
    out_dtype: jnp.dtype = jnp.float32,
    implementation: str | None = "auto",
    blocks: tuple[int, int, int] | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``y = scale · x_scale ⊙ (x @ W)`` with ``W = unpack(packed_KqxN) (k, N)`` ternary.

    Args:
      x: ``(..., k)`` bfloat16 / float32 activations, or int8 quantised activations.
      packed_KqxN: ``(ceil(k/4), N)`` uint8 from :func:`pack_ternary`.
      scale: per-tensor weight scale (scalar).
      k: number of input rows of ``W`` (not recoverable from the packed shape when ``k % 4 != 0``).
      x_scale: ``(...)`` per-row dequantisation factor; required for int8 ``x``, optional otherwise.
      implementation: ``'xla'``, ``'pallas'`` or ``'auto'`` / ``None`` (Pallas on GPU and TPU, else XLA).
      blocks: ``(bm, bn, bkq)`` requested Pallas tiles, legalised per backend (default :func:`choose_blocks`).
      interpret: run the Pallas kernel interpreted on every platform (CPU always interprets).
    """
    if packed_KqxN.ndim != 2 or packed_KqxN.dtype != jnp.uint8:
        raise ValueError(f"packed_KqxN: expected a 2-D uint8 array, got {packed_KqxN.dtype} {packed_KqxN.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or packed_rows(k) != packed_KqxN.shape[0]:
        raise ValueError(f"k: {k!r} does not match packed rows {packed_KqxN.shape[0]} (need ceil(k/4))")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x: last dimension must be k={k}, got shape {x.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float32, jnp.int8):
        raise ValueError(f"x: dtype must be bfloat16, float32 or int8, got {x.dtype}")
    if x.dtype == jnp.int8 and x_scale is None:
        raise ValueError("x_scale: int8 activations need their per-row dequantisation scale")
    if x_scale is not None and x_scale.shape != x.shape[:-1]:
        raise ValueError(f"x_scale: expected shape {x.shape[:-1]}, got {x_scale.shape}")
    if blocks is not None and (len(blocks) != 3 or any(b < 1 for b in blocks)):
        raise ValueError(f"blocks: expected three positive tile sizes (bm, bn, bkq), got {blocks!r}")
    # every operand the checks above accept is supported by the kernel on every platform
    impl = choose("ternary_matmul", implementation, signature(x=x, packed=packed_KqxN), None)
    interpret = bool(interpret)
    lead = x.shape[:-1]
    m = int(np.prod(lead)) if lead else 1
    x2 = x.reshape(m, k)
    rowscale = jnp.broadcast_to(jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32)), (m,))
    if x_scale is not None:
        rowscale = rowscale * jax.lax.stop_gradient(x_scale.reshape(m).astype(jnp.float32))
    blocks = tuple(blocks) if blocks is not None else None
    if x.dtype == jnp.int8:  # integer input: nothing to differentiate
        if impl == "xla":
            y = ternary_matmul_reference(x2, packed_KqxN, 1.0, k, rowscale, out_dtype)
        else:
            y = _pallas_2d(x2, packed_KqxN, rowscale, k, out_dtype, blocks, interpret)
    else:
        y = _matmul_float(x2, packed_KqxN, rowscale, k, impl, out_dtype, blocks, interpret)
    return y.reshape(*lead, packed_KqxN.shape[1])
