"""Pallas SLTrain matmul ``y = x · (A B s + S)`` that builds W tiles on chip (W never in HBM).

SLTrain: Han, Li, Lin, Mishra, Zhu, "SLTrain: a sparse plus low-rank approach for parameter and
memory efficient pretraining", NeurIPS 2024, arXiv 2406.02214. The official code materialises W
per layer in device memory and has no kernel; this module fuses the reconstruction into the matmul.

Support layout (:func:`tile_layout`). The support stays the paper's uniform random set of flat
indices ``idx`` into the row-major ``(in, out)`` weight; the kernel consumes a *view* of it built
per call (jittable, ``O(nnz log nnz)`` for one argsort): entries are grouped by weight tile
``(k-tile, n-tile)`` of size ``(bk, bn)``, each tile padded to a static number of slots ``P``:

    local (Kt, Nt, P) int32   local flat index  row_in_tile · bn + col_in_tile,  −1 in padding
    vals  (Kt, Nt, P)         the values at those slots (0 in padding)
    slot  (nnz,)              where each original entry went (to gather dvalues back)

The per-tile count is hypergeometric with mean ``μ = nnz·bk·bn/(in·out)``; ``P`` is the next
power of two of ``min(bk·bn, nnz, μ + 7√μ + 16)`` (power of two for the GPU lowering). A tile that
overflows ``P`` (probability ~1e-12 per tile at the default bound, or forced by a small explicit
``slots``) is detected exactly and the whole call falls back to the XLA path under ``lax.cond``,
so results are always exact. The view holds ``Kt·Nt·P`` slots of 8 bytes (index + float32 value):
at δ = 0.03 with 64×64 tiles ``P = 256 ≈ 2.1 μ``, i.e. ≈ 0.5 byte per weight entry (1/8 of a
float32 W, 1/4 of a bf16 W), built per call and dropped after the kernel.

Kernels (grid over output tiles, ``fori_loop`` over the reduction, float32 accumulators). Low-rank
part, ``KernelConfig.lowrank``: ``'tile'`` builds every W tile ``A_t B_t s + S_t`` on chip as
described below; ``'factored'`` (default) starts each output tile's accumulator from the low-rank
product ``s·(x A)_m B_n`` (forward) / ``s·(dY Bᵀ)_m A_kᵀ`` (dX) with the ``(M, r)`` factor products
computed by XLA, and builds only the sparse tiles ``S_t`` in the reduction loop — fewer FLOPs
(``r/K + r/N`` instead of ``r/bm`` of the dense matmul) and W never exists, not even per tile.

* forward, grid ``(M/bm, N/bn)``, loop over k-tiles: ``W_t = A[k-tile] B[:, n-tile] · s + S_t``,
  ``acc += x[m-tile, k-tile] W_t``. ``S_t`` is built on chip by a one-hot matmul
  ``S_t = Rᵀ C`` with ``R (P, bk) = [row_p = i]`` and ``C (P, bn) = values_p·[col_p = j]``
  (exact: each output element receives at most one non-zero product).
* dX, grid ``(M/bm, K/bk)``, loop over n-tiles: the same W tiles, ``acc += dY[m, n-tile] W_tᵀ``.
* dvalues (sampled dense-dense product), grid ``(K/bk, N/bn)``, loop over m-tiles:
  ``G_t = Σ_m x[m, k-tile]ᵀ dY[m, n-tile]`` in registers / VMEM, then the P sampled entries
  ``dv_p = Σ_j (R G_t)[p, j] · [col_p = j]``. The dense gradient G is never written to HBM.
* dA = s · Xᵀ (dY Bᵀ) and dB = s · (X A)ᵀ dY in XLA: factored, intermediates ``(M, r)`` only.

Cost per W tile rebuild, relative to the tile matmul ``2·bm·bk·bn``: low-rank part ``r/bm``,
sparse part ``P/bm`` (one-hot matmul), both paid once per (m-tile, k-tile, n-tile) in the forward
and dX kernels; the dvalues kernel pays only the one-hot gather ``2·P·bk·bn``, once per weight
tile (not per m-tile). So the ``'tile'`` kernels trade FLOPs (≈ (r + P)/bm extra, e.g. ≈ 6× at r = 512,
P = 256, bm = 128) for never writing W; ``'factored'`` pays ≈ P/bm + r/K + r/N (≈ 2.3× at the
1B MLP shapes) and larger ``block_m`` amortises the sparse part. Memory: no ``(in, out)``
buffer in either pass; the inputs are zero-padded to multiples of the block sizes (a copy when
the shapes are not multiples). Tested in interpret mode on CPU; the GPU/TPU lowering is written
for it (power-of-two blocks, dynamic slices on one axis) but was not run on an accelerator here.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.sl_matmul.reference import HIGHEST, sl_matmul_reference
from pallas_kernels.sl_matmul.xla import paper_backward

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel settings. Block sizes are upper bounds (shrunk to the padded problem size).

    ``slots``: per-tile capacity P (None: the probabilistic bound above). ``lowrank``: ``'factored'``
    (default) adds the low-rank part as ``s·(x A) B`` with ``x A`` precomputed — the kernels then
    build only the sparse tiles ``S_t`` — or ``'tile'``: every W tile ``A_t B_t s + S_t`` is built on
    chip. ``poison``: fill every kernel output with NaN (aliased input) before the kernel writes it
    — for tests.
    """

    block_m: int = 128
    block_k: int = 64
    block_n: int = 64
    slots: int | None = None
    lowrank: str = "factored"
    interpret: bool = False
    poison: bool = False

    def __post_init__(self):
        if self.lowrank not in ("factored", "tile"):
            raise ValueError(f"lowrank: must be 'factored' or 'tile', got {self.lowrank!r}")
        for name in ("block_m", "block_k", "block_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{name}: must be a power of two >= 16, got {v!r}")
        s = self.slots
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ValueError(f"slots: must be a positive integer or None, got {s!r}")


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Blocks(NamedTuple):
    bm: int
    bk: int
    bn: int
    slots: int


def choose_blocks(m: int, k: int, n: int, nnz: int, cfg: KernelConfig) -> Blocks:
    """Block sizes for an ``(m, k) @ (k, n)`` problem and the per-tile slot count P."""
    bm = min(cfg.block_m, max(16, _pow2(m)))  # >= 16: the smallest GPU (Triton) dot operand
    bk = min(cfg.block_k, max(16, _pow2(k)))
    bn = min(cfg.block_n, max(16, _pow2(n)))
    if cfg.slots is not None:
        p = cfg.slots
    else:
        mu = nnz * bk * bn / (k * n)
        p = _pow2(min(bk * bn, nnz, math.ceil(mu + 7.0 * math.sqrt(mu) + 16)))
    return Blocks(bm, bk, bn, max(p, 1))


class TileLayout(NamedTuple):
    local: jax.Array  # (Kt, Nt, P) int32, -1 = padding
    slot: jax.Array  # (nnz,) int32 flat position in (Kt*Nt*P); out of range if the tile overflowed
    overflow: jax.Array  # bool scalar: some tile holds more than P entries


def tile_layout(idx: jax.Array, k: int, n: int, bk: int, bn: int, slots: int) -> TileLayout:
    """Group the flat support ``idx`` of a row-major ``(k, n)`` matrix by ``(bk, bn)`` tile (see module doc)."""
    kt, nt = -(-k // bk), -(-n // bn)
    idx = idx.astype(jnp.int32)
    row, col = idx // n, idx % n
    tile = (row // bk) * nt + col // bn
    order = jnp.argsort(tile, stable=True)
    counts = jnp.bincount(tile, length=kt * nt)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(idx.shape[0], dtype=jnp.int32) - starts[tile[order]].astype(jnp.int32)
    rank = jnp.zeros_like(idx).at[order].set(rank_sorted)
    total = kt * nt * slots
    slot = jnp.where(rank < slots, tile * slots + rank, total)
    local = (row % bk) * bn + col % bn
    local_flat = jnp.full((total,), -1, jnp.int32).at[slot].set(local, mode="drop")
    return TileLayout(local_flat.reshape(kt, nt, slots), slot, jnp.max(counts) > slots)


def _layout_values(values: jax.Array, layout: TileLayout) -> jax.Array:
    kt, nt, p = layout.local.shape
    flat = jnp.zeros((kt * nt * p,), F32).at[layout.slot].set(values.astype(F32), mode="drop")
    return flat.reshape(kt, nt, p)


def _mm(x: jax.Array, y: jax.Array, dims, upcast: bool) -> jax.Array:
    """``dot_general`` with float32 accumulation; ``upcast`` (interpret mode on CPU, whose runtime has
    no bf16×bf16→f32 dot) multiplies float32 copies instead — identical results, since products of
    two bf16 values are exact in float32."""
    if upcast:
        x, y = x.astype(F32), y.astype(F32)
    return jax.lax.dot_general(x, y, (dims, ((), ())), preferred_element_type=F32)


NN, NT, TN = ((1,), (0,)), ((1,), (1,)), ((0,), (0,))


def _onehots(local: jax.Array, bk: int, bn: int) -> tuple[jax.Array, jax.Array]:
    """``R (P, bk)`` float one-hot rows and the boolean column match ``(P, bn)`` of a tile's slots."""
    p = local.shape[0]
    lr, lc = local // bn, local % bn  # padding: lr = -1 matches no row
    rows = (lr[:, None] == jax.lax.broadcasted_iota(jnp.int32, (p, bk), 1)).astype(F32)
    cols = lc[:, None] == jax.lax.broadcasted_iota(jnp.int32, (p, bn), 1)
    return rows, cols


def _s_tile(local: jax.Array, vals: jax.Array, bk: int, bn: int) -> jax.Array:
    """The sparse tile ``S_t = Rᵀ (values ⊙ C)`` (float32) by a one-hot matmul."""
    rows, cols = _onehots(local, bk, bn)
    c = jnp.where(cols, vals[:, None], 0.0)
    return jax.lax.dot_general(rows, c, (TN, ((), ())), precision=HIGHEST, preferred_element_type=F32)


def _w_tile(a: jax.Array, b: jax.Array, local: jax.Array, vals: jax.Array, scale: float) -> jax.Array:
    """``A_t B_t · s + S_t`` in float32."""
    low = jnp.dot(a.astype(F32), b.astype(F32), precision=HIGHEST, preferred_element_type=F32)
    return low * scale + _s_tile(local, vals, a.shape[0], b.shape[1])


def _fwd_kernel(
    x_ref, lr_ref, b_ref, loc_ref, val_ref, *rest, n_k: int, bk: int, scale: float, upcast: bool, factored: bool
):
    """``lr_ref``: ``x A`` of this m-tile (bm, r) if ``factored``, else all of ``A`` (K, r)."""
    o_ref = rest[-1]
    b = b_ref[...]
    bn = b.shape[1]
    if factored:
        acc0 = jnp.dot(lr_ref[...], b.astype(F32), precision=HIGHEST, preferred_element_type=F32) * scale
    else:
        acc0 = jnp.zeros(o_ref.shape, F32)

    def body(t, acc):
        k0 = pl.multiple_of(t * bk, bk)
        loc, vals = loc_ref[t, 0, :], val_ref[t, 0, :]
        w = _s_tile(loc, vals, bk, bn) if factored else _w_tile(lr_ref[pl.ds(k0, bk), :], b, loc, vals, scale)
        x = x_ref[:, pl.ds(k0, bk)]
        return acc + _mm(x, w.astype(x.dtype), NN, upcast)

    acc = jax.lax.fori_loop(0, n_k, body, acc0)
    o_ref[...] = acc.astype(o_ref.dtype)


def _dx_kernel(
    dy_ref, a_ref, lr_ref, loc_ref, val_ref, *rest, n_n: int, bn: int, scale: float, upcast: bool, factored: bool
):
    """``lr_ref``: ``dY Bᵀ`` of this m-tile (bm, r) if ``factored``, else all of ``B`` (r, N)."""
    o_ref = rest[-1]
    a = a_ref[...]
    bk = a.shape[0]
    if factored:
        acc0 = jax.lax.dot_general(lr_ref[...], a.astype(F32), (NT, ((), ())), precision=HIGHEST) * scale
    else:
        acc0 = jnp.zeros(o_ref.shape, F32)

    def body(t, acc):
        n0 = pl.multiple_of(t * bn, bn)
        loc, vals = loc_ref[0, t, :], val_ref[0, t, :]
        w = _s_tile(loc, vals, bk, bn) if factored else _w_tile(a, lr_ref[:, pl.ds(n0, bn)], loc, vals, scale)
        dy = dy_ref[:, pl.ds(n0, bn)]
        return acc + _mm(dy, w.astype(dy.dtype), NT, upcast)

    acc = jax.lax.fori_loop(0, n_n, body, acc0)
    o_ref[...] = acc.astype(o_ref.dtype)


def _dv_kernel(x_ref, dy_ref, loc_ref, *rest, n_m: int, bm: int, upcast: bool):
    o_ref = rest[-1]
    bk, bn = x_ref.shape[1], dy_ref.shape[1]

    def body(t, g):
        m0 = pl.multiple_of(t * bm, bm)
        return g + _mm(x_ref[pl.ds(m0, bm), :], dy_ref[pl.ds(m0, bm), :], TN, upcast)

    g = jax.lax.fori_loop(0, n_m, body, jnp.zeros((bk, bn), F32))
    rows, cols = _onehots(loc_ref[0, 0, :], bk, bn)
    rg = jnp.dot(rows, g, precision=HIGHEST, preferred_element_type=F32)  # (P, bn): the sampled rows of G
    o_ref[0, 0, :] = jnp.sum(jnp.where(cols, rg, 0.0), axis=1).astype(o_ref.dtype)


def _call(kernel, out_shape, grid, in_specs, out_spec, args, cfg: KernelConfig):
    """``pallas_call`` with, under ``cfg.poison``, a NaN-filled output buffer aliased into the kernel."""
    aliases = {}
    if cfg.poison:
        args = (*args, jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        in_specs = [*in_specs, out_spec]
        aliases = {len(args) - 1: 0}
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        input_output_aliases=aliases,
        interpret=cfg.interpret,
    )(*args)


def _pad2(x: jax.Array, rows: int, cols: int) -> jax.Array:
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


class _Padded(NamedTuple):
    blocks: Blocks
    mp: int
    kp: int
    np_: int
    rp: int
    a: jax.Array
    b: jax.Array


def _prepare(m: int, a: jax.Array, b: jax.Array, nnz: int, cfg: KernelConfig) -> _Padded:
    (k, r), n = a.shape, b.shape[1]
    blk = choose_blocks(m, k, n, nnz, cfg)
    mp, kp, np_, rp = _round_up(m, blk.bm), _round_up(k, blk.bk), _round_up(n, blk.bn), max(16, _pow2(r))
    return _Padded(blk, mp, kp, np_, rp, _pad2(a, kp, rp), _pad2(b, rp, np_))


def forward_kernel(x2, a, b, values, layout: TileLayout, scale: float, cfg: KernelConfig) -> jax.Array:
    """``y (M, N) = x2 (M, K) @ (A B s + S)`` by the forward kernel (no overflow handling)."""
    m, n = x2.shape[0], b.shape[1]
    pp = _prepare(m, a, b, values.shape[0], cfg)
    bm, bk, bn, p = pp.blocks
    kt, nt = pp.kp // bk, pp.np_ // bn
    vals = _layout_values(values, layout)
    factored = cfg.lowrank == "factored"
    if factored:  # x A (M, r), float32 accumulation
        lr = _pad2(_mm(x2, a.astype(x2.dtype), NN, cfg.interpret), pp.mp, pp.rp)
        lr_spec = pl.BlockSpec((bm, pp.rp), lambda i, j: (i, 0))
    else:
        lr, lr_spec = pp.a, pl.BlockSpec((pp.kp, pp.rp), lambda i, j: (0, 0))
    out = _call(
        partial(_fwd_kernel, n_k=kt, bk=bk, scale=scale, upcast=cfg.interpret, factored=factored),
        jax.ShapeDtypeStruct((pp.mp, pp.np_), x2.dtype),
        (pp.mp // bm, nt),
        [
            pl.BlockSpec((bm, pp.kp), lambda i, j: (i, 0)),
            lr_spec,
            pl.BlockSpec((pp.rp, bn), lambda i, j: (0, j)),
            pl.BlockSpec((kt, 1, p), lambda i, j: (0, j, 0)),
            pl.BlockSpec((kt, 1, p), lambda i, j: (0, j, 0)),
        ],
        pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        (_pad2(x2, pp.mp, pp.kp), lr, pp.b, layout.local, vals),
        cfg,
    )
    return out[:m, :n]


def dx_kernel(dy2, a, b, values, layout: TileLayout, scale: float, cfg: KernelConfig, dy_bt=None) -> jax.Array:
    """``dX (M, K) = dY (M, N) @ (A B s + S)ᵀ`` by the dX kernel (``dy_bt``: ``dY Bᵀ`` if already computed)."""
    m, k = dy2.shape[0], a.shape[0]
    pp = _prepare(m, a, b, values.shape[0], cfg)
    bm, bk, bn, p = pp.blocks
    kt, nt = pp.kp // bk, pp.np_ // bn
    vals = _layout_values(values, layout)
    factored = cfg.lowrank == "factored"
    if factored:  # dY Bᵀ (M, r), float32 accumulation
        if dy_bt is None:
            dy_bt = _mm(dy2, b.astype(dy2.dtype), NT, cfg.interpret)
        lr, lr_spec = _pad2(dy_bt, pp.mp, pp.rp), pl.BlockSpec((bm, pp.rp), lambda i, t: (i, 0))
    else:
        lr, lr_spec = pp.b, pl.BlockSpec((pp.rp, pp.np_), lambda i, t: (0, 0))
    out = _call(
        partial(_dx_kernel, n_n=nt, bn=bn, scale=scale, upcast=cfg.interpret, factored=factored),
        jax.ShapeDtypeStruct((pp.mp, pp.kp), dy2.dtype),
        (pp.mp // bm, kt),
        [
            pl.BlockSpec((bm, pp.np_), lambda i, t: (i, 0)),
            pl.BlockSpec((bk, pp.rp), lambda i, t: (t, 0)),
            lr_spec,
            pl.BlockSpec((1, nt, p), lambda i, t: (t, 0, 0)),
            pl.BlockSpec((1, nt, p), lambda i, t: (t, 0, 0)),
        ],
        pl.BlockSpec((bm, bk), lambda i, t: (i, t)),
        (_pad2(dy2, pp.mp, pp.np_), pp.a, lr, layout.local, vals),
        cfg,
    )
    return out[:m, :k]


def dvalues_kernel(x2, dy2, a, b, layout: TileLayout, nnz: int, cfg: KernelConfig) -> jax.Array:
    """``dvalues (nnz,) = (x2ᵀ dY).flat[idx]`` by the sampled dense-dense kernel (float32)."""
    m = x2.shape[0]
    pp = _prepare(m, a, b, nnz, cfg)
    bm, bk, bn, p = pp.blocks
    kt, nt = pp.kp // bk, pp.np_ // bn
    out = _call(
        partial(_dv_kernel, n_m=pp.mp // bm, bm=bm, upcast=cfg.interpret),
        jax.ShapeDtypeStruct((kt, nt, p), F32),
        (kt, nt),
        [
            pl.BlockSpec((pp.mp, bk), lambda i, j: (0, i)),
            pl.BlockSpec((pp.mp, bn), lambda i, j: (0, j)),
            pl.BlockSpec((1, 1, p), lambda i, j: (i, j, 0)),
        ],
        pl.BlockSpec((1, 1, p), lambda i, j: (i, j, 0)),
        (_pad2(x2, pp.mp, pp.kp), _pad2(dy2, pp.mp, pp.np_), layout.local),
        cfg,
    )
    return jnp.take(out.reshape(-1), layout.slot, mode="fill", fill_value=0.0)


def _layout_for(m: int, a, b, idx, cfg: KernelConfig) -> TileLayout:
    blk = choose_blocks(m, a.shape[0], b.shape[1], idx.shape[0], cfg)
    return tile_layout(idx, a.shape[0], b.shape[1], blk.bk, blk.bn, blk.slots)


def _pallas_forward(x, a, b, values, idx, scale, cfg):
    k, n = a.shape[0], b.shape[1]
    x2 = x.reshape(-1, k)
    layout = _layout_for(x2.shape[0], a, b, idx, cfg)
    y2 = jax.lax.cond(
        layout.overflow,
        lambda: sl_matmul_reference(x2, a, b, values, idx, scale),
        lambda: forward_kernel(x2, a, b, values, layout, scale, cfg),
    )
    return y2.reshape(*x.shape[:-1], n)


def _pallas_backward(x, a, b, values, idx, scale, dy, cfg):
    k, n = a.shape[0], b.shape[1]
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    layout = _layout_for(x2.shape[0], a, b, idx, cfg)

    def kernels():
        # dA = s·Xᵀ(dY Bᵀ), dB = s·(X A)ᵀ dY: (M, r) intermediates, float32 accumulation
        t = _mm(dy2, b.astype(dy2.dtype), NT, cfg.interpret)  # (M, r)
        dx = dx_kernel(dy2, a, b, values, layout, scale, cfg, dy_bt=t)
        dv = dvalues_kernel(x2, dy2, a, b, layout, idx.shape[0], cfg)
        da = _mm(x2, t, TN, True) * scale
        xa = _mm(x2, a.astype(x2.dtype), NN, cfg.interpret)  # (M, r)
        db = _mm(xa, dy2, TN, True) * scale
        return dx, da.astype(a.dtype), db.astype(b.dtype), dv.astype(values.dtype)

    dx, da, db, dv = jax.lax.cond(layout.overflow, lambda: paper_backward(x2, a, b, values, idx, scale, dy2), kernels)
    return dx.reshape(x.shape), da, db, dv


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def sl_matmul_pallas(x, a, b, values, idx, scale: float, cfg: KernelConfig):
    """``y = x @ (A B s + S)`` by the Pallas kernels (forward and backward; see module docstring)."""
    return _pallas_forward(x, a, b, values, idx, scale, cfg)


def _vjp_fwd(x, a, b, values, idx, scale, cfg):
    return _pallas_forward(x, a, b, values, idx, scale, cfg), (x, a, b, values, idx)


def _vjp_bwd(scale, cfg, res, dy):
    return (*_pallas_backward(*res, scale, dy, cfg), None)


sl_matmul_pallas.defvjp(_vjp_fwd, _vjp_bwd)
