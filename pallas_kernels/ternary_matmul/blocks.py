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


GPU_SMS = 132  # streaming multiprocessors of an H100 / H200 SXM: the split-K GEMV fills these


class TernaryBlocks(NamedTuple):
    """Tile sizes of one call: ``bm`` rows, ``bn`` columns, ``bkq`` packed rows; Triton's ``num_warps``;
    ``splits``: programs sharing one output tile's reduction (split-K, GPU only)."""

    bm: int
    bn: int
    bkq: int
    num_warps: int = 4
    splits: int = 1


def wave_efficiency(programs: int, sms: int = GPU_SMS) -> float:
    """Share of the SM slots busy over the waves ``programs`` one-program-per-SM tiles take."""
    return programs / (-(-programs // sms) * sms)


def choose_splits(tiles: int, n_red: int, most: int = 8) -> int:
    """Split-K factor for ``tiles`` output tiles of ``n_red`` reduction steps: the divisor of ``n_red``
    up to ``most`` whose grid fills the SMs best (:func:`wave_efficiency`), the smallest among ties
    within 2 %."""
    options = [s for s in range(1, most + 1) if n_red % s == 0]
    best = max(wave_efficiency(tiles * s) for s in options)
    return next(s for s in options if wave_efficiency(tiles * s) >= best - 0.02)


def smem_bytes(blk: TernaryBlocks, itemsize: int) -> int:
    """Estimate of one Triton program's shared memory: the larger of the loop's buffers (:data:`NUM_STAGES`
    copies of each iteration's loads — packed tile + four activation tiles — and one unpacked plane
    staged for the dot) and the epilogue's float32 output tile, which reuses the loop's shared memory
    (the compiled sm_90a kernels show it: experiments/results/sass)."""
    bm, bn, bkq = blk.bm, blk.bn, blk.bkq
    return max(NUM_STAGES * (bkq * bn + 4 * bm * bkq * itemsize) + 2 * bkq * bn, 4 * bm * bn)


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
    """``(bm, bn, bkq)`` for an ``(m, 4·kq) @ (4·kq, n)`` problem on ``target`` (``blocks``: a request, with
    an optional fourth entry, the GPU split-K factor).

    GPU (Triton): powers of two ≥ 16 (Triton's tensor and dot minimums); GEMV (``m ≤ 16``): ``bn ≤ 64``
    and split-K (:func:`choose_splits`: 4096×11008 has 172 tiles, 65 % of two waves on 132 SMs; 8
    splits make 1376 programs, 95 %); GEMM: ``bm`` 128 rows (8 warps) once ``m ≥ 128`` so each
    decoded weight tile serves 128 rows, ``bn ≤ 128``; each preferring a size that divides the extent
    so the packed weights are not padded (a per-call copy); ``bkq`` the largest of 128 … 16 under
    :data:`GPU_SMEM_BUDGET`.

    TPU (Mosaic): ``bm`` spans all rows up to 256 (a block equal to the full dimension is legal at any
    size: a GEMV moves one row, not 8 or 32), else 256; ``bn`` and ``bkq`` multiples of 128 up to
    512 that divide the extent where possible (uint8 weights tile (32, 128), the activations' lane dim
    is ``bkq``), under :data:`TPU_VMEM_BUDGET`. A request is legalised the same way (interpreted: as given).
    """
    if blocks is not None and target.interpret:
        return TernaryBlocks(*blocks[:3], 4, *blocks[3:])
    if target.tpu:
        if blocks is not None:
            bm, bn, bkq = blocks[:3]
            return TernaryBlocks(_legal_tpu(bm, m, sublane(itemsize)), round_up(bn, LANE), round_up(bkq, LANE))
        bm = m if m <= 256 else 256
        bn = fit_block(n, LANE, 512)
        for bkq in (512, 256, 128):
            blk = TernaryBlocks(bm, bn, min(bkq, fit_block(kq, LANE, bkq)))
            if vmem_bytes(blk, itemsize) <= TPU_VMEM_BUDGET:
                break
        return blk
    if blocks is not None:
        return TernaryBlocks(*(pow2_at_least(b, 16) for b in blocks[:3]), 4, *blocks[3:])
    bm = 128 if m >= 128 else min(64, pow2_at_least(m, 16))
    bn = fit_block(n, 16, 64 if m <= 16 else 128)
    warps = 8 if bm >= 128 else 4
    for bkq in (128, 64, 32, 16):
        blk = TernaryBlocks(bm, bn, min(bkq, fit_block(kq, 16, bkq)), warps)
        if smem_bytes(blk, itemsize) <= GPU_SMEM_BUDGET:
            break
    if m <= 16:
        tiles, n_red = -(-n // bn), -(-kq // blk.bkq)
        blk = blk._replace(splits=choose_splits(tiles, n_red))
    return blk
