"""Block sizes of the packed ternary kernel per target and shape, and the on-chip memory they need.

A call's tiles are ``(bm, bn, bkq)``: ``bm`` activation rows, ``bn`` output columns and ``bkq`` packed
weight rows (``4·bkq`` input rows, :mod:`pallas_kernels.ternary_matmul.layout`) per reduction step.
"""

from __future__ import annotations

from typing import NamedTuple

from pallas_kernels.platforms import (
    GPU_SMEM_BUDGET,
    LANE,
    TPU_VMEM_BUDGET,
    Target,
    fit_block,
    pow2_at_least,
    round_up,
    sublane,
)

NUM_STAGES = 2  # Triton pipelining depth of the packed-row loop


class TernaryBlocks(NamedTuple):
    """Tile sizes of one call: ``bm`` rows, ``bn`` columns, ``bkq`` packed rows; Triton's ``num_warps``."""

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
