"""How the SLTrain kernels see their operands: the support grouped by weight tile, padding to blocks.

Support layout (:func:`tile_layout`). The support stays the paper's uniform random set of flat
indices ``idx`` into the row-major ``(in, out)`` weight (SLTrain: Han et al., NeurIPS 2024, arXiv
2406.02214); the kernels consume a *view* of it built per call (jittable): entries are grouped by
weight tile ``(k-tile, n-tile)`` of size ``(bk, bn)``, in row-major order within their tile, each
tile padded to ``P`` slots stored as ``P / C`` rows of ``C`` (a *chunk*):

    local (Kt, Nt, P/C, C) int32   row_in_tile · bn + col_in_tile,  −1 in padding
    vals  (Kt, Nt, P/C, C)         the values at those slots (0 in padding)

The support is stored ascending (:func:`lowrank_jax.layers.sl_dense.sl_support`), and an ascending
support is its own layout: the entries of one row of one tile are consecutive, so an entry's slot is
the count of its tile's entries in the rows above it (one histogram over ``(row, n-tile)`` and a
prefix sum) plus its offset in its row's run. The view is built without a sort, in ``O(nnz +
in·Nt)``; a support that is not ascending (the public API accepts any order) is sorted first, under
``lax.cond``, so only such a call pays for the sort.

The per-tile count is hypergeometric with mean ``μ = nnz·bk·bn/(in·out)``; ``P`` is
``min(bk·bn, nnz, μ + 7√μ + 16)`` rounded up to a multiple of ``C``
(:mod:`pallas_kernels.sl_matmul.blocks`). Entries beyond ``P`` in their tile (never at the default
bound in practice; forced by a small explicit ``slots``) *spill*: up to :data:`SPILL` of them are
listed (:func:`spilled`) and added exactly by an XLA correction (:mod:`pallas_kernels.sl_matmul.kernel`);
more than that poisons the result with NaN rather than return a wrong one. The view costs 8 bytes
per slot (≈ 0.5 byte per weight entry at δ = 0.03).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.platforms import round_up
from pallas_kernels.sl_matmul.blocks import Blocks

F32 = jnp.float32
SPILL = 512  # entries beyond their tile's P slots corrected exactly (more: NaN)


class TileLayout(NamedTuple):
    """The support grouped by weight tile (module docstring), with where each entry went."""

    local: jax.Array  # (Kt, Nt, P/C, C) int32, -1 = padding
    slot: jax.Array  # (nnz,) int32 flat position in (Kt*Nt*P); out of range for a spilled entry
    spill: jax.Array  # (E,) int32 positions in idx of spilled entries (nnz = none)
    n_spill: jax.Array  # int32 scalar


def tile_layout(idx: jax.Array, k: int, n: int, blk: Blocks) -> TileLayout:
    """Group the flat support ``idx`` of a row-major ``(k, n)`` matrix by ``(bk, bn)`` tile (module doc).

    No sort when ``idx`` is ascending (the stored support); any other order is sorted first.
    """
    bk, bn, p = blk.bk, blk.bn, blk.slots
    kt, nt, nnz = -(-k // bk), -(-n // bn), idx.shape[0]
    idx = idx.astype(jnp.int32)
    pos = jnp.arange(nnz, dtype=jnp.int32)
    ascending = jnp.all(idx[1:] > idx[:-1])
    order = jax.lax.cond(ascending, lambda i: pos, lambda i: jnp.argsort(i).astype(jnp.int32), idx)
    sidx = jnp.take(idx, order)
    row, col = sidx // n, sidx % n
    run = row * nt + col // bn  # (row, n-tile): consecutive in ascending order
    per_row = jnp.bincount(run, length=kt * bk * nt).reshape(kt, bk, nt)
    above = (jnp.cumsum(per_row, axis=1) - per_row).reshape(-1)  # the tile's entries in rows above
    starts = jnp.concatenate([jnp.ones((1,), bool), run[1:] != run[:-1]])
    offset = pos - jax.lax.cummax(jnp.where(starts, pos, 0))  # position in the row's run
    rank = above[run].astype(jnp.int32) + offset
    total = kt * nt * p
    tile = (row // bk) * nt + col // bn
    slot_sorted = jnp.where(rank >= p, total, tile * p + rank)
    local = (row % bk) * bn + col % bn
    local_flat = jnp.full((total,), -1, jnp.int32).at[slot_sorted].set(local, mode="drop")
    slot = jnp.zeros_like(idx).at[order].set(slot_sorted)
    spilled = slot == total
    (spill,) = jnp.nonzero(spilled, size=min(nnz, SPILL), fill_value=nnz)
    n_spill = jnp.sum(spilled, dtype=jnp.int32)
    return TileLayout(local_flat.reshape(kt, nt, blk.chunks, blk.chunk), slot, spill.astype(jnp.int32), n_spill)


def layout_values(values: jax.Array, layout: TileLayout) -> jax.Array:
    """``values`` (nnz,) placed in the layout's slots: ``(Kt, Nt, P/C, C)`` float32, 0 in padding and for spills."""
    flat = jnp.zeros((layout.local.size,), F32).at[layout.slot].set(values.astype(F32), mode="drop")
    return flat.reshape(layout.local.shape)


def pad2(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """``x`` (2-d) zero-padded at the end to ``(rows, cols)``."""
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


class Padded(NamedTuple):
    """An ``(m, k) @ (k, n)`` problem padded to block multiples ``(mp, kp, np_)``; ``kt, nt`` weight tiles."""

    mp: int
    kp: int
    np_: int
    kt: int
    nt: int


def padded(m: int, k: int, n: int, blk: Blocks) -> Padded:
    """The padded extents of an ``(m, k) @ (k, n)`` problem for ``blk``."""
    kp, np_ = round_up(k, blk.bk), round_up(n, blk.bn)
    return Padded(round_up(m, blk.bm), kp, np_, kp // blk.bk, np_ // blk.bn)


class Spilled(NamedTuple):
    """The spilled entries' rows, columns and float32 values (padding: row 0, column 0, value 0)."""

    rows: jax.Array
    cols: jax.Array
    vals: jax.Array


def spilled(layout: TileLayout, idx: jax.Array, values: jax.Array, n: int) -> Spilled:
    """The entries of ``(idx, values)`` that did not fit their tile's slots, for the XLA correction."""
    flat = jnp.take(idx, layout.spill, mode="fill", fill_value=0)
    vals = jnp.take(values.astype(F32), layout.spill, mode="fill", fill_value=0.0)
    return Spilled(flat // n, flat % n, vals)
