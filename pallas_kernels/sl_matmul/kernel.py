"""Pallas SLTrain matmul ``y = x · (A B s + S)`` that builds W tiles on chip (W never in HBM).

SLTrain: Han, Li, Lin, Mishra, Zhu, "SLTrain: a sparse plus low-rank approach for parameter and
memory efficient pretraining", NeurIPS 2024, arXiv 2406.02214. The official code materialises W
per layer in device memory and has no kernel; this module fuses the reconstruction into the matmul.

Support layout (:func:`tile_layout`). The support stays the paper's uniform random set of flat
indices ``idx`` into the row-major ``(in, out)`` weight; the kernels consume a *view* of it built per
call (jittable, one argsort): entries are grouped by weight tile ``(k-tile, n-tile)`` of size
``(bk, bn)``, each tile padded to ``P`` slots stored as ``P / C`` rows of ``C`` (a *chunk*):

    local (Kt, Nt, P/C, C) int32   row_in_tile · bn + col_in_tile,  −1 in padding
    vals  (Kt, Nt, P/C, C)         the values at those slots (0 in padding)

The per-tile count is hypergeometric with mean ``μ = nnz·bk·bn/(in·out)``; ``P`` is
``min(bk·bn, nnz, μ + 7√μ + 16)`` rounded up to a multiple of ``C``. Entries beyond ``P`` in their
tile (never at the default bound in practice; forced by a small explicit ``slots``) *spill*: up to
:data:`SPILL` of them are added exactly by a small XLA gather/scatter correction (``M × SPILL``
temporaries, under ``lax.cond`` so it costs nothing when there is none); more than that poisons the
result with NaN rather than return a wrong one. The view costs 8 bytes per slot (≈ 0.5 byte per
weight entry at δ = 0.03), built per call.

Kernels (float32 accumulators; ``KernelConfig.lowrank``): ``'factored'`` (default) starts each output
tile from the low-rank product ``s·(x A)_m B_n`` (forward) / ``s·(dY Bᵀ)_m A_kᵀ`` (dX), with the
``(M, r)`` products computed by XLA, and builds only the sparse tiles in the reduction; ``'tile'``
builds every ``W_t = A_t B_t s + S_t`` on chip.

* forward, output tile ``(bm, bn)``, reduction over k-tiles: ``acc += x[m, k] W_t``.
* dX, output tile ``(bm, bk)``, reduction over n-tiles: ``acc += dY[m, n] W_tᵀ``.
* dvalues (sampled dense-dense product), one program per weight tile, reduction over m-tiles:
  ``Gᵀ_t = Σ_m dY[m, n]ᵀ x[m, k]`` on chip, then the P sampled entries. G never reaches HBM.
* dA = s · Xᵀ (dY Bᵀ) and dB = s · (X A)ᵀ dY in XLA: factored, ``(M, r)`` intermediates only.

One-hot tile algebra, per chunk ``c`` of ``C`` slots (all lane-dense, no gathers):
``Rᵀ_c (bk, C) = [row_p = i]`` and ``Cᵀ_c (bn, C) = v_p·[col_p = j]``, ``S_t = Σ_c Rᵀ_c C_cᵀ`` — an NT
matmul with contraction ``C`` (exact: each entry of S receives at most one product). The one-hots
are exact in bfloat16, so every one-hot matmul runs on the bf16 MXU / tensor cores; float32 values
(and the float32 ``Gᵀ`` for dvalues) are split into 2–3 bfloat16 parts ``hi + mid + lo`` whose
products are exact, so the result is float32-accurate with bf16 throughput. dvalues:
``dv_c = Σ_j [col_p = j] (Gᵀ Rᵀ_c)[j, p]``.

Two structures (:mod:`pallas_kernels.platforms`), one tile math. GPU (Triton): grid over output tiles,
``fori_loop`` over the reduction on refs that span it, the rank contracted in chunks of ≤ 64 so
Triton stages only small operands in shared memory. TPU (Mosaic): the reduction is the last grid axis
(``"arbitrary"``) with a float32 VMEM scratch accumulator; blocks are (8, 128)-aligned and the rank
is contracted in one MXU matmul. Block sizes per target and shape: :func:`choose_blocks`.

Cost per W tile rebuild, relative to the tile matmul ``2·bm·bk·bn``: sparse part ``parts·P/bm``
(forward and dX, once per m-tile), low-rank ``r/bm`` (``'tile'`` only); ``'factored'`` adds
``r/K + r/N`` for its factor products. dvalues pays ``parts·P/M`` once per weight tile. Larger
``bm`` amortises the sparse part, which is why the TPU chooser grows ``bm`` to its VMEM budget.

Status: numerics tested in interpret mode for both structures; lowered for ``cuda`` and ``tpu`` at
the 1B shapes in the CPU suite (``tests/pallas_kernels/test_lowering.py``); not yet run on a device.
What only a device can confirm: Triton's register / shared-memory allocation at these tiles, and that
Mosaic's layout passes accept the patterns used here — single-row loads and stores at a dynamic
sublane offset of 32-bit ``(P/C, C)`` refs, the transposed-lhs matmul of dvalues, (1, C) rows
broadcast over sublanes.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.platforms import (
    GPU_SMEM_BUDGET,
    LANE,
    TARGETS,
    TPU_VMEM_BUDGET,
    Target,
    compiler_params,
    is_pow2,
    per_platform,
    pow2_at_least,
    round_up,
    sublane,
)

F32, BF16 = jnp.float32, jnp.bfloat16
SPILL = 512  # entries beyond their tile's P slots corrected exactly (more: NaN)
NN, NT, TN = ((1,), (0,)), ((1,), (1,)), ((0,), (0,))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel settings.

    ``block_m/k/n``: requested tile sizes (powers of two ≥ 16; None: chosen per target and shape by
    :func:`choose_blocks`). A request is shrunk to the padded problem and, on TPU, rounded up to
    Mosaic's tiling (lane dims to 128): every target can take any request. ``slots``: per-tile
    capacity P (None: the probabilistic bound). ``lowrank``: ``'factored'`` or ``'tile'`` (module
    docstring). ``interpret``: run in the Pallas interpreter on every platform; ``interpret_as``: the
    structure the interpreter runs (``'gpu'`` or ``'tpu'``; also what CPU runs). ``poison``: fill
    every kernel output with NaN (aliased input) before the kernel writes it — for tests.
    """

    block_m: int | None = None
    block_k: int | None = None
    block_n: int | None = None
    slots: int | None = None
    lowrank: str = "factored"
    interpret: bool = False
    interpret_as: str = "gpu"
    poison: bool = False

    def __post_init__(self):
        if self.lowrank not in ("factored", "tile"):
            raise ValueError(f"lowrank: must be 'factored' or 'tile', got {self.lowrank!r}")
        for name in ("block_m", "block_k", "block_n"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 16 or not is_pow2(v)):
                raise ValueError(f"{name}: must be a power of two >= 16 or None, got {v!r}")
        s = self.slots
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ValueError(f"slots: must be a positive integer or None, got {s!r}")
        if self.interpret_as not in TARGETS:
            raise ValueError(f"interpret_as: must be one of {TARGETS}, got {self.interpret_as!r}")


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


def _slot_bound(nnz: int, k: int, n: int, bk: int, bn: int, slots: int | None) -> int:
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
    slots = round_up(_slot_bound(nnz, k, n, bk, bn, cfg.slots), LANE)
    rp = round_up(rank, LANE)
    sub, most = sublane(itemsize), cfg.block_m or 1024
    whole = round_up(m, sub)  # one m-tile spanning all rows when it is small enough
    sizes = ([whole] if whole <= most else []) + [b for b in (1024, 512, 256, 128, 64, 32, 16) if sub <= b < whole]
    sizes = [b for b in sizes if b <= most] or [sub]
    blocks = [Blocks(bm, bk, bn, slots, LANE, rp, rp) for bm in sizes]
    return next((b for b in blocks if vmem_bytes(b, itemsize) <= TPU_VMEM_BUDGET), blocks[-1])


def _gpu_blocks(target, m: int, k: int, n: int, nnz: int, rank: int, itemsize: int, cfg: KernelConfig) -> Blocks:
    def blocks(bm: int, bk: int, bn: int, rc: int) -> Blocks:
        raw = _slot_bound(nnz, k, n, bk, bn, cfg.slots)
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


class TileLayout(NamedTuple):
    local: jax.Array  # (Kt, Nt, P/C, C) int32, -1 = padding
    slot: jax.Array  # (nnz,) int32 flat position in (Kt*Nt*P); out of range for a spilled entry
    spill: jax.Array  # (E,) int32 positions in idx of spilled entries (nnz = none)
    n_spill: jax.Array  # int32 scalar


def tile_layout(idx: jax.Array, k: int, n: int, blk: Blocks) -> TileLayout:
    """Group the flat support ``idx`` of a row-major ``(k, n)`` matrix by ``(bk, bn)`` tile (module doc)."""
    bk, bn, p = blk.bk, blk.bn, blk.slots
    kt, nt, nnz = -(-k // bk), -(-n // bn), idx.shape[0]
    idx = idx.astype(jnp.int32)
    row, col = idx // n, idx % n
    tile = (row // bk) * nt + col // bn
    order = jnp.argsort(tile, stable=True)
    counts = jnp.bincount(tile, length=kt * nt)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(nnz, dtype=jnp.int32) - starts[tile[order]].astype(jnp.int32)
    rank = jnp.zeros_like(idx).at[order].set(rank_sorted)
    total = kt * nt * p
    spilled = rank >= p
    slot = jnp.where(spilled, total, tile * p + rank)
    local = (row % bk) * bn + col % bn
    local_flat = jnp.full((total,), -1, jnp.int32).at[slot].set(local, mode="drop")
    (spill,) = jnp.nonzero(spilled, size=min(nnz, SPILL), fill_value=nnz)
    n_spill = jnp.sum(spilled, dtype=jnp.int32)
    return TileLayout(local_flat.reshape(kt, nt, blk.chunks, blk.chunk), slot, spill.astype(jnp.int32), n_spill)


def _layout_values(values: jax.Array, layout: TileLayout) -> jax.Array:
    flat = jnp.zeros((layout.local.size,), F32).at[layout.slot].set(values.astype(F32), mode="drop")
    return flat.reshape(layout.local.shape)


# --- tile math, shared by both structures -------------------------------------------------------


def _dot(x: jax.Array, y: jax.Array, dims, upcast: bool) -> jax.Array:
    """``dot_general`` with float32 accumulation; ``upcast`` (interpret mode on CPU, whose runtime has
    no bf16×bf16→f32 dot) multiplies float32 copies instead — identical results, since products of
    two bf16 values are exact in float32."""
    if upcast:
        x, y = x.astype(F32), y.astype(F32)
    return jax.lax.dot_general(x, y, (dims, ((), ())), preferred_element_type=F32)


def _bf16_parts(v: jax.Array, parts: int) -> list[jax.Array]:
    """``v`` (float32) as ``parts`` bfloat16 values ``hi, mid, lo`` with ``Σ = v`` to 8·parts bits (3: exact)."""
    out = []
    for _ in range(parts):
        hi = v.astype(BF16)
        out.append(hi)
        v = v - hi.astype(F32)
    return out


def _onehot_rows(loc: jax.Array, rows: int, shift: int) -> jax.Array:
    """``Rᵀ (rows, C)`` bf16: 1 where ``loc >> shift`` (the row in the tile; −1 padding matches none) is the row."""
    hit = jax.lax.broadcasted_iota(jnp.int32, (rows, loc.shape[1]), 0) == (loc >> shift)
    return jnp.where(hit, 1.0, 0.0).astype(BF16)


def _col_match(loc: jax.Array, cols: int) -> jax.Array:
    """Boolean ``(cols, C)``: the column of each slot (``loc & (cols − 1)``; ``cols`` is a power of two)."""
    return jax.lax.broadcasted_iota(jnp.int32, (cols, loc.shape[1]), 0) == (loc & (cols - 1))


def _s_tile(loc_at, val_at, blk: Blocks, parts: int, upcast: bool) -> jax.Array:
    """The sparse tile ``S_t (bk, bn)`` float32: ``Σ_c Rᵀ_c (values ⊙ C_c)ᵀ`` over the chunks ``loc_at(c)``."""
    bk, bn = blk.bk, blk.bn
    shift = bn.bit_length() - 1

    def chunk(c, s):
        loc, vals = loc_at(c), val_at(c)
        r_t, match = _onehot_rows(loc, bk, shift), _col_match(loc, bn)
        for part in _bf16_parts(vals, parts):
            c_t = jnp.where(match, part.astype(F32), 0.0).astype(BF16)
            s = s + _dot(r_t, c_t, NT, upcast)
        return s

    return jax.lax.fori_loop(0, blk.chunks, chunk, jnp.zeros((bk, bn), F32))


def _rank_sum(blk: Blocks, term, shape) -> jax.Array:
    """``Σ`` of ``term(rank_slice)`` over the padded rank, ``rc`` columns at a time."""
    n = blk.rp // blk.rc
    if n == 1:
        return term(slice(None))
    return jax.lax.fori_loop(
        0, n, lambda c, acc: acc + term(pl.ds(pl.multiple_of(c * blk.rc, blk.rc), blk.rc)), jnp.zeros(shape, F32)
    )


def _tile_slice(target: Target, t, size: int):
    """Reduction tile ``t`` of an axis: the block itself on TPU (the grid picked it), a slice on GPU."""
    return slice(None) if target.tpu else pl.ds(pl.multiple_of(t * size, size), size)


def _tile_lead(target: Target, t) -> tuple:
    """Leading index of a per-tile layout ref: none on TPU (squeezed by the grid), ``t`` on GPU."""
    return () if target.tpu else (t,)


def _reduce(target: Target, n: int, init, step, finish, scratch) -> None:
    """``finish(init() + Σ_t step(t))`` over ``n`` reduction steps: a ``fori_loop`` (GPU) or the last grid
    axis with the sum kept in the VMEM scratch accumulator (TPU)."""
    if not target.tpu:
        finish(jax.lax.fori_loop(0, n, lambda t, acc: acc + step(t), init()))
        return
    (acc_ref,) = scratch
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _():
        acc_ref[...] = init()

    acc_ref[...] += step(t)

    @pl.when(t == n - 1)
    def _():
        finish(acc_ref[...])


def _chunk_rows(ref, lead: tuple):
    return lambda c: ref[(*lead, pl.ds(c, 1), slice(None))]


def _w_kernel(lhs_ref, lr_ref, f_ref, loc_ref, val_ref, o_ref, *scratch, target, blk, n_red, scale, parts, mode):
    """``acc = lhs @ W`` (forward: ``x``, reduction over k-tiles) or ``lhs @ Wᵀ`` (dX: ``dY``, over n-tiles).

    ``f_ref``: the factor fixed by the output tile — ``B[:, n-tile]`` (forward) or ``A[k-tile]`` (dX).
    ``lr_ref``: ``'factored'``: the low-rank product of this m-tile, ``x A`` / ``dY Bᵀ`` (bm, rp), which
    starts the accumulator at ``s·(x A) B`` / ``s·(dY Bᵀ) Aᵀ``; ``'tile'``: the factor walked by the
    reduction (``A`` k-tiles / ``B`` n-tiles), added into every W tile.
    """
    upcast, cd, transposed = target.interpret, lhs_ref.dtype, mode.transposed
    (rows, cols), lr_dims = o_ref.shape, (NT if transposed else NN)

    def init():
        if mode.lowrank == "tile":
            return jnp.zeros((rows, cols), F32)
        f_at = (lambda rs: f_ref[:, rs]) if transposed else (lambda rs: f_ref[rs, :])
        return scale * _rank_sum(blk, lambda rs: _dot(lr_ref[:, rs], f_at(rs), lr_dims, upcast), (rows, cols))

    def step(t):
        red, lead = _tile_slice(target, t, blk.bn if transposed else blk.bk), _tile_lead(target, t)
        w = _s_tile(_chunk_rows(loc_ref, lead), _chunk_rows(val_ref, lead), blk, parts, upcast)
        if mode.lowrank == "tile":  # + s·A_t B_t
            if transposed:  # A's k-tile fixed (bk, rp), B's n-tiles walked
                term = lambda rs: _dot(f_ref[:, rs], lr_ref[rs, red], NN, upcast)  # noqa: E731
            else:  # A's k-tiles walked, B's n-tile fixed (rp, bn)
                term = lambda rs: _dot(lr_ref[red, rs], f_ref[rs, :], NN, upcast)  # noqa: E731
            w = w + scale * _rank_sum(blk, term, w.shape)
        return _dot(lhs_ref[:, red], w.astype(cd), lr_dims, upcast)

    def finish(acc):
        o_ref[...] = acc.astype(o_ref.dtype)

    _reduce(target, n_red, init, step, finish, scratch)


def _dv_kernel(x_ref, dy_ref, loc_ref, o_ref, *scratch, target, blk, n_red, parts):
    upcast = target.interpret
    bk, bn = blk.bk, blk.bn
    shift = bn.bit_length() - 1

    def step(t):
        ms = _tile_slice(target, t, blk.bm)
        return _dot(dy_ref[ms, :], x_ref[ms, :], TN, upcast)  # Gᵀ (bn, bk) of this m-tile

    def finish(g_t):
        g_parts = _bf16_parts(g_t, parts)

        def chunk(c, carry):
            loc = loc_ref[pl.ds(c, 1), :]
            r_t = _onehot_rows(loc, bk, shift)
            gr = sum(_dot(g, r_t, NN, upcast) for g in g_parts)  # (bn, C): G rows of the slots
            o_ref[pl.ds(c, 1), :] = jnp.sum(jnp.where(_col_match(loc, bn), gr, 0.0), axis=0, keepdims=True)
            return carry

        jax.lax.fori_loop(0, blk.chunks, chunk, 0)

    _reduce(target, n_red, lambda: jnp.zeros((bn, bk), F32), step, finish, scratch)


# --- pallas_call plumbing -----------------------------------------------------------------------


class Red(NamedTuple):
    """A block dimension walked by the reduction: ``tile`` elements per step (None: a per-tile index axis,
    squeezed on TPU) out of ``whole`` (what the GPU structure's block spans, its loop slicing it)."""

    tile: int | None
    whole: int


def _spec(target: Target, dims: tuple, index) -> pl.BlockSpec:
    """BlockSpec of ``dims`` (ints, None = squeezed, :class:`Red`) with ``index(i, j, t)`` (``t = 0`` on GPU)."""
    if target.tpu:
        block = tuple(d.tile if isinstance(d, Red) else d for d in dims)
        return pl.BlockSpec(block, index)
    block = tuple(d.whole if isinstance(d, Red) else d for d in dims)
    return pl.BlockSpec(block, lambda i, j: index(i, j, 0))


def _call(kernel, name, target: Target, blk: Blocks, out_shape, outer, n_red, in_specs, out_spec, args, acc_shape, cfg):
    """``pallas_call`` ``name`` of ``kernel`` on grid ``outer`` (+ the reduction axis on TPU), on ``target``'s backend.

    Under ``cfg.poison`` a NaN-filled output buffer is aliased into the kernel (so an unwritten block shows).
    """
    n_in = len(args)
    aliases = {}
    if cfg.poison:
        args = (*args, jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        in_specs = [*in_specs, out_spec]
        aliases = {n_in: 0}

    def body(*refs):
        kernel(*refs[:n_in], *refs[len(args) :])

    tpu = target.tpu
    return pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=(*outer, n_red) if tpu else outer,
        in_specs=in_specs,
        out_specs=out_spec,
        scratch_shapes=[pltpu.VMEM(acc_shape, F32)] if tpu else [],
        input_output_aliases=aliases,
        compiler_params=compiler_params(
            target, semantics=("parallel", "parallel", "arbitrary"), num_warps=blk.num_warps, num_stages=2
        ),
        interpret=target.interpret,
        name=name,
    )(*args)


def _pad2(x: jax.Array, rows: int, cols: int) -> jax.Array:
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


class _Padded(NamedTuple):
    mp: int
    kp: int
    np_: int
    kt: int
    nt: int


def _padded(m: int, k: int, n: int, blk: Blocks) -> _Padded:
    kp, np_ = round_up(k, blk.bk), round_up(n, blk.bn)
    return _Padded(round_up(m, blk.bm), kp, np_, kp // blk.bk, np_ // blk.bn)


def _parts(dtype) -> int:
    """bf16 parts of the float32 values in a W tile: 3 (exact) for float32 compute, 1 for bf16 (W is cast to it)."""
    return 3 if jnp.dtype(dtype) == F32 else 1


def _dv_parts(dtype) -> int:
    """bf16 parts of the float32 ``Gᵀ`` gathered into dvalues: 3 (exact) for float32 inputs, 2 (16 bits,
    beyond the precision of bf16 products' sums) for bf16."""
    return 3 if jnp.dtype(dtype) == F32 else 2


class _Mode(NamedTuple):
    lowrank: str  # 'factored' | 'tile'
    transposed: bool  # False: y = x W (forward); True: dX = dY Wᵀ


def _w_product(target, blk, lhs2, a, b, values, layout, scale, cfg, lr, transposed: bool) -> jax.Array:
    """``lhs2 @ W`` (``transposed``: ``@ Wᵀ``) by :func:`_w_kernel`; ``lr``: the ``(M, r)`` low-rank product."""
    m, (k, _), n, cd = lhs2.shape[0], a.shape, b.shape[1], lhs2.dtype
    pd = _padded(m, k, n, blk)
    bm, bk, bn, rp = blk.bm, blk.bk, blk.bn, blk.rp
    mode = _Mode(cfg.lowrank, transposed)
    a_p, b_p = _pad2(a.astype(cd), pd.kp, rp), _pad2(b.astype(cd), rp, pd.np_)
    if transposed:  # output (bm, bk) tiles, reduction over n-tiles; A's k-tile fixed, B walked
        red, n_red, n_out, out_cols, name = Red(bn, pd.np_), pd.nt, pd.kt, pd.kp, "sl_matmul_dx"
        fixed, walked = (a_p, _spec(target, (bk, rp), lambda i, j, t: (j, 0))), (b_p, (rp, red), lambda i, j, t: (0, t))
        tiles, tile_index = (None, Red(None, pd.nt), blk.chunks, blk.chunk), lambda i, j, t: (j, t, 0, 0)
    else:  # output (bm, bn) tiles, reduction over k-tiles; B's n-tile fixed, A walked
        red, n_red, n_out, out_cols, name = Red(bk, pd.kp), pd.kt, pd.nt, pd.np_, "sl_matmul_fwd"
        fixed, walked = (b_p, _spec(target, (rp, bn), lambda i, j, t: (0, j))), (a_p, (red, rp), lambda i, j, t: (t, 0))
        tiles, tile_index = (Red(None, pd.kt), None, blk.chunks, blk.chunk), lambda i, j, t: (t, j, 0, 0)
    if cfg.lowrank == "factored":
        lr_arg, lr_spec = _pad2(lr.astype(cd), pd.mp, rp), _spec(target, (bm, rp), lambda i, j, t: (i, 0))
    else:
        lr_arg, lr_spec = walked[0], _spec(target, walked[1], walked[2])
    out_tile = bk if transposed else bn
    out = _call(
        partial(_w_kernel, target=target, blk=blk, n_red=n_red, scale=scale, parts=_parts(cd), mode=mode),
        name,
        target,
        blk,
        jax.ShapeDtypeStruct((pd.mp, out_cols), cd),
        (pd.mp // bm, n_out),
        n_red,
        [
            _spec(target, (bm, red), lambda i, j, t: (i, t)),
            lr_spec,
            fixed[1],
            _spec(target, tiles, tile_index),
            _spec(target, tiles, tile_index),
        ],
        _spec(target, (bm, out_tile), lambda i, j, t: (i, j)),
        (_pad2(lhs2, pd.mp, red.whole), lr_arg, fixed[0], layout.local, _layout_values(values, layout)),
        (bm, out_tile),
        cfg,
    )
    return out[:m, : (k if transposed else n)]


def forward_kernel(target, blk, x2, a, b, values, layout, scale, cfg, xa=None) -> jax.Array:
    """``y (M, N) = x2 (M, K) @ (A B s + S)`` by the forward kernel (no spill correction); ``xa``: ``x2 A``."""
    xa = _mm(x2, a) if xa is None and cfg.lowrank == "factored" else xa
    return _w_product(target, blk, x2, a, b, values, layout, scale, cfg, xa, transposed=False)


def dx_kernel(target, blk, dy2, a, b, values, layout, scale, cfg, dy_bt=None) -> jax.Array:
    """``dX (M, K) = dY (M, N) @ (A B s + S)ᵀ`` by the dX kernel; ``dy_bt``: ``dY Bᵀ`` if already computed."""
    dy_bt = _mm(dy2, b.T) if dy_bt is None and cfg.lowrank == "factored" else dy_bt
    return _w_product(target, blk, dy2, a, b, values, layout, scale, cfg, dy_bt, transposed=True)


def dvalues_kernel(target, blk, x2, dy2, layout, cfg) -> jax.Array:
    """``dvalues (nnz,) = (x2ᵀ dY).flat[idx]`` by the sampled dense-dense kernel (float32; spilled entries 0)."""
    (m, k), n = x2.shape, dy2.shape[1]
    pd = _padded(m, k, n, blk)
    tiles = (None, None, blk.chunks, blk.chunk)
    out = _call(
        partial(_dv_kernel, target=target, blk=blk, n_red=pd.mp // blk.bm, parts=_dv_parts(x2.dtype)),
        "sl_matmul_dvalues",
        target,
        blk,
        jax.ShapeDtypeStruct(layout.local.shape, F32),
        (pd.kt, pd.nt),
        pd.mp // blk.bm,
        [
            _spec(target, (Red(blk.bm, pd.mp), blk.bk), lambda i, j, t: (t, i)),
            _spec(target, (Red(blk.bm, pd.mp), blk.bn), lambda i, j, t: (t, j)),
            _spec(target, tiles, lambda i, j, t: (i, j, 0, 0)),
        ],
        _spec(target, tiles, lambda i, j, t: (i, j, 0, 0)),
        (_pad2(x2, pd.mp, pd.kp), _pad2(dy2, pd.mp, pd.np_), layout.local),
        (blk.bn, blk.bk),
        cfg,
    )
    return jnp.take(out.reshape(-1), layout.slot, mode="fill", fill_value=0.0)


# --- spilled entries (XLA) and the differentiable entry point -----------------------------------


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    """XLA matmul in ``x``'s dtype with float32 accumulation (the factor products outside the kernels).

    On CPU the operands are upcast first: XLA:CPU has no bf16 × bf16 → f32 dot for every layout its
    simplifier produces ("Unsupported element type for DotThunk"); the products are exact either way.
    """
    native = lambda x, y: jnp.matmul(x, y, preferred_element_type=F32)  # noqa: E731
    upcast = lambda x, y: jnp.matmul(x.astype(F32), y.astype(F32))  # noqa: E731
    return jax.lax.platform_dependent(x, y.astype(x.dtype), cpu=upcast, default=native)


class _Spilled(NamedTuple):
    rows: jax.Array
    cols: jax.Array
    vals: jax.Array


def _spilled(layout: TileLayout, idx, values, n: int) -> _Spilled:
    flat = jnp.take(idx, layout.spill, mode="fill", fill_value=0)
    vals = jnp.take(values.astype(F32), layout.spill, mode="fill", fill_value=0.0)
    return _Spilled(flat // n, flat % n, vals)


def _correct(layout: TileLayout, out: jax.Array, add) -> jax.Array:
    """``out`` with the spilled entries' contribution ``add(out_f32)`` (under ``lax.cond``), NaN past :data:`SPILL`."""
    fixed = jax.lax.cond(layout.n_spill > 0, lambda o: add(o.astype(F32)).astype(o.dtype), lambda o: o, out)
    if layout.spill.shape[0] >= layout.slot.shape[0]:  # every entry fits the correction
        return fixed
    return jnp.where(layout.n_spill > layout.spill.shape[0], jnp.nan, fixed).astype(out.dtype)


def _blocks_for(target: Target, m: int, a, b, idx, dtype, cfg: KernelConfig) -> Blocks:
    (k, r), n = a.shape, b.shape[1]
    return choose_blocks(target, m, k, n, idx.shape[0], r, jnp.dtype(dtype).itemsize, cfg)


def _forward_on(target, cfg, scale, x2, xa, a, b, values, idx):
    blk = _blocks_for(target, x2.shape[0], a, b, idx, x2.dtype, cfg)
    layout = tile_layout(idx, a.shape[0], b.shape[1], blk)
    y = forward_kernel(target, blk, x2, a, b, values, layout, scale, cfg, xa=xa)
    sp = _spilled(layout, idx, values, b.shape[1])
    return _correct(layout, y, lambda y: y.at[:, sp.cols].add(x2[:, sp.rows].astype(F32) * sp.vals))


def _backward_on(target, cfg, scale, x2, dy2, dy_bt, a, b, values, idx):
    blk = _blocks_for(target, x2.shape[0], a, b, idx, x2.dtype, cfg)
    layout = tile_layout(idx, a.shape[0], b.shape[1], blk)
    dx = dx_kernel(target, blk, dy2, a, b, values, layout, scale, cfg, dy_bt=dy_bt)
    dv = dvalues_kernel(target, blk, x2, dy2, layout, cfg)
    sp = _spilled(layout, idx, values, b.shape[1])
    dx = _correct(layout, dx, lambda d: d.at[:, sp.rows].add(dy2[:, sp.cols].astype(F32) * sp.vals))
    g_spilled = lambda: jnp.sum(x2[:, sp.rows].astype(F32) * dy2[:, sp.cols].astype(F32), axis=0)  # noqa: E731
    dv = _correct(layout, dv, lambda d: d.at[layout.spill].set(g_spilled(), mode="drop"))
    return dx, dv


def _primal(x, a, b, values, idx, scale: float, cfg: KernelConfig):
    k, n = a.shape[0], b.shape[1]
    x2 = x.reshape(-1, k)
    xa = _mm(x2, a) if cfg.lowrank == "factored" else jnp.zeros((x2.shape[0], 0), F32)
    y2 = per_platform(
        lambda target: partial(_forward_on, target, cfg, scale),
        x2,
        xa,
        a,
        b,
        values,
        idx,
        interpret=cfg.interpret,
        interpret_as=cfg.interpret_as,
    )
    return y2.reshape(*x.shape[:-1], n)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def sl_matmul_pallas(x, a, b, values, idx, scale: float, cfg: KernelConfig):
    """``y = x @ (A B s + S)`` by the Pallas kernels, forward and backward, for the platform it is lowered on."""
    return _primal(x, a, b, values, idx, scale, cfg)


def _vjp_fwd(x, a, b, values, idx, scale, cfg):
    return _primal(x, a, b, values, idx, scale, cfg), (x, a, b, values, idx)


def _vjp_bwd(scale, cfg, res, dy):
    x, a, b, values, idx = res
    k, n = a.shape[0], b.shape[1]
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    dy_bt = _mm(dy2, b.T)  # (M, r): dY Bᵀ, shared by dA and the factored dX
    dx, dv = per_platform(
        lambda target: partial(_backward_on, target, cfg, scale),
        x2,
        dy2,
        dy_bt,
        a,
        b,
        values,
        idx,
        interpret=cfg.interpret,
        interpret_as=cfg.interpret_as,
    )
    # float32 operands, as the paper's backward forms G Bᵀ and Aᵀ G from a float32 G
    da = jnp.matmul(x2.T.astype(F32), dy_bt) * scale
    db = jnp.matmul(_mm(x2, a).T, dy2.astype(F32)) * scale
    return dx.reshape(x.shape), da.astype(a.dtype), db.astype(b.dtype), dv.astype(values.dtype), None


sl_matmul_pallas.defvjp(_vjp_fwd, _vjp_bwd)
