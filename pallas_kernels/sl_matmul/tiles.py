"""The SLTrain Pallas kernels: what each program computes on its tile, and the ``pallas_call`` around it.

SLTrain: Han, Li, Lin, Mishra, Zhu, "SLTrain: a sparse plus low-rank approach for parameter and
memory efficient pretraining", NeurIPS 2024, arXiv 2406.02214. The official code materialises W
per layer in device memory and has no kernel; these kernels fuse the reconstruction of
``W = A B s + S`` into the matmul, so W tiles are built on chip and W never reaches HBM. Operands
arrive in the tile layout of :mod:`pallas_kernels.sl_matmul.layout`, with the block sizes of
:mod:`pallas_kernels.sl_matmul.blocks`.

Kernels (float32 accumulators; ``KernelConfig.lowrank``): ``'factored'`` (default) starts each output
tile from the low-rank product ``s·(x A)_m B_n`` (forward) / ``s·(dY Bᵀ)_m A_kᵀ`` (dX), with the
``(M, r)`` products computed by XLA, and builds only the sparse tiles in the reduction; ``'tile'``
builds every ``W_t = A_t B_t s + S_t`` on chip.

* forward, output tile ``(bm, bn)``, reduction over k-tiles: ``acc += x[m, k] W_t``.
* dX, output tile ``(bm, bk)``, reduction over n-tiles: ``acc += dY[m, n] W_tᵀ``.
* dvalues (sampled dense-dense product), one program per weight tile, reduction over m-tiles:
  ``Gᵀ_t = Σ_m dY[m, n]ᵀ x[m, k]`` on chip, then the P sampled entries. G never reaches HBM.

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
is contracted in one MXU matmul.

Numerics are tested in interpret mode for both structures, and both are lowered for ``cuda`` and
``tpu`` at the 1B shapes in the CPU suite (``tests/pallas_kernels/test_lowering.py``). What only a
device can confirm (``experiments/gpu_suite.py`` checks it on a GPU): Triton's register /
shared-memory allocation at these tiles, and that Mosaic's layout passes accept the patterns used
here — single-row loads and stores at a dynamic sublane offset of 32-bit ``(P/C, C)`` refs, the
transposed-lhs matmul of dvalues, (1, C) rows broadcast over sublanes.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.platforms import Target, compiler_params
from pallas_kernels.sl_matmul.blocks import Blocks
from pallas_kernels.sl_matmul.layout import TileLayout, layout_values, pad2, padded

if TYPE_CHECKING:
    from pallas_kernels.sl_matmul.kernel import KernelConfig

F32, BF16 = jnp.float32, jnp.bfloat16
NN, NT, TN = ((1,), (0,)), ((1,), (1,)), ((0,), (0,))


def factor_matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    """XLA matmul in ``x``'s dtype with float32 accumulation (the factor products outside the kernels).

    On CPU the operands are upcast first: XLA:CPU has no bf16 × bf16 → f32 dot for every layout its
    simplifier produces ("Unsupported element type for DotThunk"); the products are exact either way.
    """
    native = lambda x, y: jnp.matmul(x, y, preferred_element_type=F32)
    upcast = lambda x, y: jnp.matmul(x.astype(F32), y.astype(F32))
    return jax.lax.platform_dependent(x, y.astype(x.dtype), cpu=upcast, default=native)


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
                term = lambda rs: _dot(f_ref[:, rs], lr_ref[rs, red], NN, upcast)
            else:  # A's k-tiles walked, B's n-tile fixed (rp, bn)
                term = lambda rs: _dot(lr_ref[red, rs], f_ref[rs, :], NN, upcast)
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
    pd = padded(m, k, n, blk)
    bm, bk, bn, rp = blk.bm, blk.bk, blk.bn, blk.rp
    mode = _Mode(cfg.lowrank, transposed)
    a_p, b_p = pad2(a.astype(cd), pd.kp, rp), pad2(b.astype(cd), rp, pd.np_)
    if transposed:  # output (bm, bk) tiles, reduction over n-tiles; A's k-tile fixed, B walked
        red, n_red, n_out, out_cols, name = Red(bn, pd.np_), pd.nt, pd.kt, pd.kp, "sl_matmul_dx"
        fixed, walked = (a_p, _spec(target, (bk, rp), lambda i, j, t: (j, 0))), (b_p, (rp, red), lambda i, j, t: (0, t))
        tiles, tile_index = (None, Red(None, pd.nt), blk.chunks, blk.chunk), lambda i, j, t: (j, t, 0, 0)
    else:  # output (bm, bn) tiles, reduction over k-tiles; B's n-tile fixed, A walked
        red, n_red, n_out, out_cols, name = Red(bk, pd.kp), pd.kt, pd.nt, pd.np_, "sl_matmul_fwd"
        fixed, walked = (b_p, _spec(target, (rp, bn), lambda i, j, t: (0, j))), (a_p, (red, rp), lambda i, j, t: (t, 0))
        tiles, tile_index = (Red(None, pd.kt), None, blk.chunks, blk.chunk), lambda i, j, t: (t, j, 0, 0)
    if cfg.lowrank == "factored":
        lr_arg, lr_spec = pad2(lr.astype(cd), pd.mp, rp), _spec(target, (bm, rp), lambda i, j, t: (i, 0))
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
        (pad2(lhs2, pd.mp, red.whole), lr_arg, fixed[0], layout.local, layout_values(values, layout)),
        (bm, out_tile),
        cfg,
    )
    return out[:m, : (k if transposed else n)]


def forward_kernel(
    target: Target, blk: Blocks, x2, a, b, values, layout: TileLayout, scale: float, cfg: KernelConfig, xa=None
) -> jax.Array:
    """``y (M, N) = x2 (M, K) @ (A B s + S)`` by the forward kernel (no spill correction); ``xa``: ``x2 A``."""
    xa = factor_matmul(x2, a) if xa is None and cfg.lowrank == "factored" else xa
    return _w_product(target, blk, x2, a, b, values, layout, scale, cfg, xa, transposed=False)


def dx_kernel(
    target: Target, blk: Blocks, dy2, a, b, values, layout: TileLayout, scale: float, cfg: KernelConfig, dy_bt=None
) -> jax.Array:
    """``dX (M, K) = dY (M, N) @ (A B s + S)ᵀ`` by the dX kernel; ``dy_bt``: ``dY Bᵀ`` if already computed."""
    dy_bt = factor_matmul(dy2, b.T) if dy_bt is None and cfg.lowrank == "factored" else dy_bt
    return _w_product(target, blk, dy2, a, b, values, layout, scale, cfg, dy_bt, transposed=True)


def dvalues_kernel(target: Target, blk: Blocks, x2, dy2, layout: TileLayout, cfg: KernelConfig) -> jax.Array:
    """``dvalues (nnz,) = (x2ᵀ dY).flat[idx]`` by the sampled dense-dense kernel (float32; spilled entries 0)."""
    (m, k), n = x2.shape, dy2.shape[1]
    pd = padded(m, k, n, blk)
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
        (pad2(x2, pd.mp, pd.kp), pad2(dy2, pd.mp, pd.np_), layout.local),
        (blk.bn, blk.bk),
        cfg,
    )
    return jnp.take(out.reshape(-1), layout.slot, mode="fill", fill_value=0.0)
