"""Block sizes of the SLTrain Pallas kernels per target and shape, and the on-chip memory they need.

A call's tiles are ``(bm, bk, bn)``: ``bm`` rows of the activations, ``(bk, bn)`` of the weight ``W``
(in, out). Each weight tile holds its share of the sparse support in ``P`` slots
(:mod:`pallas_kernels.sl_matmul.layout`), ``P`` from the hypergeometric bound on the per-tile count.

Cost per W tile rebuild, relative to the tile matmul ``2·bm·bk·bn``: sparse part ``parts·P/bm``
(forward and dX, once per m-tile), low-rank ``r/bm`` (``'tile'`` only); ``'factored'`` adds
``r/K + r/N`` for its factor products. dvalues pays ``parts·P/M`` once per weight tile. Larger
``bm`` amortises the sparse part, which is why the TPU chooser grows ``bm`` to its VMEM budget.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

from pallas_kernels.platforms import (
    GPU_SMEM_BUDGET,
    LANE,
    TPU_VMEM_BUDGET,
    Target,
    pow2_at_least,
    round_up,
    sublane,
)

if TYPE_CHECKING:
    from pallas_kernels.sl_matmul.kernel import KernelConfig


class Blocks(NamedTuple):
    """Tile sizes of one call: ``(bm, bk, bn)``, ``slots`` P = ``chunks · chunk``, rank padded to ``rp``
    and contracted ``rc`` at a time; Triton's ``num_warps``."""

    bm: int
    bk: int
    bn: int
    slots: int
    chunk: int
    rp: int
    rc: int
    num_warps: int = 4

    @property
    def chunks(self) -> int:
        return self.slots // self.chunk


def slot_bound(nnz: int, k: int, n: int, bk: int, bn: int, slots: int | None) -> int:
    if slots is not None:
        return slots
    mu = nnz * bk * bn / (k * n)
    return max(1, min(bk * bn, nnz, math.ceil(mu + 7.0 * math.sqrt(mu) + 16)))


def _request(v: int | None, default: int, extent: int, lo: int) -> int:
    """A power-of-two tile ``<=`` the extent rounded up to a power of two (and ``>= lo``)."""
    return min(v or default, pow2_at_least(extent, lo))


def choose_blocks(
    target: Target, m: int, k: int, n: int, nnz: int, rank: int, itemsize: int, cfg: KernelConfig
) -> Blocks:
    """Tile sizes for an ``(m, k) @ (k, n)`` SL matmul of rank ``rank`` on ``target``.

    GPU (Triton, and the interpreter): powers of two ≥ 16 (Triton's tensor and dot rules); default
    ``bm = 128, bk = bn = 64`` — at δ = 0.03 a 64×64 tile holds μ ≈ 123 entries, so P = 224 and the
    sparse rebuild costs ≈ 1.75× the tile matmul at ``bm = 128`` while the float32 accumulator
    (32 KiB) and one pipelined stage of operands stay in registers / under :data:`GPU_SMEM_BUDGET`;
    chunks of C = 32 slots (16 for tiny tiles), rank in chunks of ≤ 64.

    TPU (Mosaic): lane dims (``bk``, ``bn``, C, the padded rank) are multiples of 128, ``bm`` a
    multiple of the dtype's sublane tiling; default ``bk = bn = 128`` (P ≈ 768 at δ = 0.03, six
    128-slot chunks) and ``bm`` the largest of 1024 … 16 (or all of ``m``) whose double-buffered blocks
    and scratch fit :data:`TPU_VMEM_BUDGET` — big ``bm`` amortises the sparse rebuild.
    """
    if target.tpu and not target.interpret:
        return _tpu_blocks(m, k, n, nnz, rank, itemsize, cfg)
    return _gpu_blocks(target, m, k, n, nnz, rank, itemsize, cfg)


def _tpu_blocks(m: int, k: int, n: int, nnz: int, rank: int, itemsize: int, cfg: KernelConfig) -> Blocks:
    bk = round_up(_request(cfg.block_k, 128, k, LANE), LANE)
    bn = round_up(_request(cfg.block_n, 128, n, LANE), LANE)
    slots = round_up(slot_bound(nnz, k, n, bk, bn, cfg.slots), LANE)
    rp = round_up(rank, LANE)
    sub, most = sublane(itemsize), cfg.block_m or 1024
    whole = round_up(m, sub)  # one m-tile spanning all rows when it is small enough
    sizes = ([whole] if whole <= most else []) + [b for b in (1024, 512, 256, 128, 64, 32, 16) if sub <= b < whole]
    sizes = [b for b in sizes if b <= most] or [sub]
    blocks = [Blocks(bm, bk, bn, slots, LANE, rp, rp) for bm in sizes]
    return next((b for b in blocks if vmem_bytes(b, itemsize) <= TPU_VMEM_BUDGET), blocks[-1])


def _gpu_blocks(target, m: int, k: int, n: int, nnz: int, rank: int, itemsize: int, cfg: KernelConfig) -> Blocks:
    def blocks(bm: int, bk: int, bn: int, rc: int) -> Blocks:
        raw = slot_bound(nnz, k, n, bk, bn, cfg.slots)
        chunk = 16 if raw <= 64 else 32
        if target.tpu:  # the TPU structure, interpreted: one rank contraction, as on the chip
            rc = round_up(rank, 16)
        return Blocks(
            bm, bk, bn, round_up(raw, chunk), chunk, round_up(rank, rc), rc, 8 if bm * max(bk, bn) >= 8192 else 4
        )

    blk = blocks(
        _request(cfg.block_m, 128, m, 16),
        _request(cfg.block_k, 64, k, 16),
        _request(cfg.block_n, 64, n, 16),
        min(64, pow2_at_least(rank, 16)),
    )
    while smem_bytes(blk, itemsize) > GPU_SMEM_BUDGET:  # only large explicit requests get here: shrink
        bm, bk, bn, rc = blk.bm, blk.bk, blk.bn, blk.rc
        if rc > 16 and not target.tpu:
            rc //= 2
        elif bm > 16:
            bm //= 2
        elif max(bk, bn) > 16:
            bk, bn = (bk // 2, bn) if bk >= bn else (bk, bn // 2)
        else:
            break
        blk = blocks(bm, bk, bn, rc)
    return blk


def vmem_bytes(blk: Blocks, itemsize: int) -> int:
    """Upper estimate of the VMEM one TPU kernel call uses (max over forward / dX / dvalues): every input
    and output block double-buffered, the float32 scratch accumulator, and the large temporaries."""
    bm, bk, bn, p, c, rp = blk.bm, blk.bk, blk.bn, blk.slots, blk.chunk, blk.rp
    slots = 2 * 4 * p * 2  # local + values, double-buffered
    temps = 4 * (bk * bn * 2 + (bk + bn) * c * 3)  # S / W tile, one-hot chunks
    fwd = 2 * itemsize * (bm * bk + bm * rp + rp * bn + bm * bn) + slots + 4 * 2 * bm * bn + temps
    dx = 2 * itemsize * (bm * bn + bm * rp + bk * rp + bm * bk) + slots + 4 * 2 * bm * bk + temps
    dv = 2 * itemsize * (bm * bk + bm * bn) + 2 * 4 * p * 2 + 4 * bn * bk * 3 + temps
    return max(fwd, dx, dv)


def smem_bytes(blk: Blocks, itemsize: int, num_stages: int = 2) -> int:
    """Estimate of one Triton program's shared memory (max over the kernels): ``num_stages`` copies of the
    largest tile any loop loads per iteration (Triton's software pipeline), the largest operand computed
    on chip and staged for a dot (the W tile), and the epilogue's layout conversion of the output tile."""
    bm, bk, bn, c, rc = blk.bm, blk.bk, blk.bn, blk.chunk, blk.rc
    wide = max(bk, bn)
    loaded = max(itemsize * bm * wide, 2 * 4 * c, itemsize * rc * (bm + wide), itemsize * bm * (bk + bn))
    staged = max(itemsize * bk * bn, 2 * (bk + bn) * c)
    return num_stages * loaded + staged + itemsize * bm * wide
