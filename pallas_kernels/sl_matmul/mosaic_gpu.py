"""The SLTrain matmul's sparse products as Pallas **Mosaic GPU** kernels (Hopper, sm_90a): warpgroup MMAs.

``implementation='mosaic_gpu'`` of :func:`~pallas_kernels.sl_matmul.api.sl_matmul` (SLTrain: Han et al.,
NeurIPS 2024, arXiv 2406.02214), for bfloat16 activations. The Triton kernels
(:mod:`pallas_kernels.sl_matmul.tiles`) stay what ``'pallas'`` runs on GPUs; this port exists because JAX's
Pallas Triton backend is deprecated and Mosaic GPU is the backend JAX develops for Hopper.

Two kernels share one tile program: the forward ``x S`` (output tile ``(bm, 64)``, reduction over
k-tiles) and dX's ``dY Sᵀ`` (output tile ``(bm, 64)`` of dX, reduction over n-tiles), ``bm`` ∈ {64, 128}
(the MMA's M extent). Per reduction step the pipeline (``plgpu.emit_pipeline``, two stages) copies by
TMA the activation tile and the weight tile's ``P`` slots (:mod:`pallas_kernels.sl_matmul.layout`,
chunks of :data:`C` = 64): each slot's row, column and value. The warpgroup builds the sparse tile
``S_t (64, 64)`` as ``Σ_c Rᵀ_c V_c`` from the one-hot rows ``Rᵀ_c (64, C)`` and the value-weighted one-hot
columns ``V_c (C, 64)``, both built in registers and stored to shared memory, into a float32
accumulator, and multiplies by the tile, in bfloat16 in shared memory: ``acc += x_t S_t``. For dX it
builds ``S_tᵀ`` the same way with rows and columns swapped (the values on the A side) and accumulates
``dY_t S_tᵀ``. Each entry of the tile receives one product, so it is exactly the values rounded to
bfloat16, as in the Triton kernels for bfloat16 activations. The slots' rows and columns travel as two
arrays because Mosaic GPU's layout inference cannot give one loaded value the two register layouts
(indexed along rows and along columns) that the two one-hots need.

The low-rank part ``s·(x A) B`` (forward) and ``s·(dY Bᵀ) Aᵀ`` (dX) is added by XLA from the ``(M, r)``
products, and dvalues, a sampled dense-dense product, runs the Triton kernel
(:func:`~pallas_kernels.sl_matmul.tiles.dvalues_kernel`). Entries beyond their tile's ``P`` slots are
corrected exactly by XLA, as for the Triton kernels.

On CPU the kernels run in Mosaic GPU's interpreter (``interpret=True``, decided when the call is traced:
its host callbacks cannot sit in a ``platform_dependent`` branch); ``jax.export(..., platforms=['cuda'])``
with ``interpret=False`` runs the Mosaic GPU lowering, whose verifier checks the MMA shapes, layouts and
the shared-memory total. The lowering needs jax ≥ 0.11 (:data:`LOWERS_FROM`; the GPU images carry it):
jax 0.10's layout inference finds no register layout for the one-hot operands, and a call that would
lower there is refused with that reason. Like the ternary port it compiles to PTX inside the CUDA
plugin, so it has no offline SASS report.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.platforms import mosaic_gpu_interpret_params, per_platform, round_up
from pallas_kernels.sl_matmul.blocks import Blocks, slot_bound
from pallas_kernels.sl_matmul.kernel import (
    KernelConfig,
    dvalues_on,
    factor_grads,
    spill_corrected_dx,
    spill_corrected_y,
)
from pallas_kernels.sl_matmul.layout import layout_values, pad2, padded, spilled, tile_layout
from pallas_kernels.sl_matmul.tiles import F32, factor_matmul

BT = 64  # the weight tile (BT, BT): the sparse tile's MMA extents
C = 64  # slots per chunk: the one-hot MMA's contraction
STAGES = 2  # TMA pipeline depth
BF16 = jnp.bfloat16
LOWERS_FROM = (0, 11)  # jax 0.10's Mosaic GPU layout inference finds no layout for the one-hot operands


def mosaic_gpu_blocks(m: int, k: int, n: int, nnz: int, slots: int | None = None) -> Blocks:
    """Tiles for an ``(m, k) @ (k, n)`` problem with ``nnz`` support entries: ``bm`` = 64 up to 64 rows, else
    128; weight tiles 64 × 64 with ``slots`` (None: the probabilistic bound) rounded up to chunks of 64."""
    slots = round_up(slot_bound(nnz, k, n, BT, BT, slots), C)
    return Blocks(bm=64 if m <= 64 else 128, bk=BT, bn=BT, slots=slots, chunk=C, rp=0, rc=0)


def lowers() -> bool:
    """Whether this jax lowers the kernels for a GPU (the interpreter runs them on every version)."""
    return tuple(int(p) for p in jax.__version__.split(".")[:2]) >= LOWERS_FROM


def unsupported(x_dtype: jnp.dtype) -> str | None:
    """Why the Mosaic GPU kernels cannot take activations of ``x_dtype`` (None: they can)."""
    if jnp.dtype(x_dtype) != BF16:
        return f"{jnp.dtype(x_dtype).name} activations: the warpgroup MMAs here take bfloat16 (use 'pallas' or 'xla')"
    return None


def _sparse_product(lhs, rows, cols, vals, *, bm: int, kt: int, nt: int, transposed: bool, interpret: bool):
    """``lhs @ S`` (``transposed``: ``lhs @ Sᵀ``) in float32 for ``S`` of ``(kt, nt)`` weight tiles: ``lhs (Mp,
    R)`` bfloat16 padded to the tiles (``R`` = 64·kt, or 64·nt transposed); the slots' ``rows``, ``cols``
    (int32, −1 in padding) and ``vals`` (bfloat16, 0 in padding) as ``(kt·nt·P/C, C)``, tile-major."""
    mp = lhs.shape[0]
    q = rows.shape[0] // (kt * nt)  # chunks per tile
    n_out, n_red = (kt, nt) if transposed else (nt, kt)
    lhs_swizzle = plgpu.find_swizzle(BT * 16, "lhs")  # bf16 rows of 64 elements
    rhs_swizzle = plgpu.find_swizzle(BT * 16, "rhs")
    lhs_tf = (plgpu.TilingTransform((8, lhs_swizzle // 2)), plgpu.SwizzleTransform(lhs_swizzle))
    rhs_tf = (plgpu.TilingTransform((8, rhs_swizzle // 2)), plgpu.SwizzleTransform(rhs_swizzle))
    layout = plgpu.Layout.WGMMA
    # register layouts guide Mosaic GPU's layout inference; the interpreter has none (jax 0.10 cannot run the cast)
    cast = (lambda v, _: v) if interpret else plgpu.layout_cast

    def tile_of(o, t):  # the weight tile of output tile o at reduction step t, in units of q chunk rows
        return o * nt + t if transposed else t * nt + o

    def sl_matmul_sparse(lhs_gmem, a_gmem, b_gmem, vals_gmem, o_gmem, o_smem, s_smem, a_smem, b_smem):
        mi, oi = jax.lax.axis_index("m"), jax.lax.axis_index("o")

        def accumulate(acc_ref):
            def step(_, lhs_smem, a_idx_smem, b_idx_smem, vals_smem):
                def build(s_ref):  # S_t, or S_tᵀ when transposed: Σ_c A_c B_c, the values on one side
                    for c in range(q):
                        a_idx = cast(a_idx_smem.at[c][...], layout.reduce(0))  # indexed by slot (columns)
                        b_idx = cast(b_idx_smem.at[c][...], layout.reduce(1))  # indexed by slot (rows)
                        val = cast(vals_smem.at[c][...], layout.reduce(0 if transposed else 1))
                        i_a = cast(jax.lax.broadcasted_iota(jnp.int32, (BT, C), 0), layout)
                        i_b = cast(jax.lax.broadcasted_iota(jnp.int32, (C, BT), 1), layout)
                        a_hit = i_a == jnp.broadcast_to(a_idx[None, :], (BT, C))
                        b_hit = i_b == jnp.broadcast_to(b_idx[:, None], (C, BT))
                        if transposed:
                            a_smem[...] = jnp.where(a_hit, jnp.broadcast_to(val[None, :], (BT, C)), 0.0).astype(BF16)
                            b_smem[...] = b_hit.astype(BF16)
                        else:
                            a_smem[...] = a_hit.astype(BF16)
                            b_smem[...] = jnp.where(b_hit, jnp.broadcast_to(val[:, None], (C, BT)), 0.0).astype(BF16)
                        plgpu.commit_smem()
                        plgpu.wgmma(s_ref, a_smem, b_smem)
                        plgpu.wgmma_wait(0)  # a_smem and b_smem are rewritten by the next chunk
                    return s_ref[...]

                s_smem[...] = pl.run_scoped(build, plgpu.ACC((BT, BT), F32)).astype(BF16)
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, lhs_smem, s_smem)
                plgpu.wgmma_wait(0)  # s_smem is rewritten by the next step

            slots = lambda t: (tile_of(oi, t), 0)
            specs = [plgpu.BlockSpec((bm, BT), lambda t: (mi, t), transforms=lhs_tf)]
            specs += [plgpu.BlockSpec((q, C), slots) for _ in range(3)]
            pipeline = plgpu.emit_pipeline(step, grid=(n_red,), in_specs=specs, max_concurrent_steps=STAGES)
            pipeline(lhs_gmem, a_gmem, b_gmem, vals_gmem)
            return acc_ref[...]

        o_smem[...] = pl.run_scoped(accumulate, plgpu.ACC((bm, BT), F32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * bm, bm), pl.ds(oi * BT, BT)])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        sl_matmul_sparse,
        out_type=jax.ShapeDtypeStruct((mp, n_out * BT), F32),
        grid=(mp // bm, n_out),
        grid_names=("m", "o"),
        scratch_types=[
            plgpu.SMEM((bm, BT), F32),
            plgpu.SMEM((BT, BT), BF16, transforms=rhs_tf),
            plgpu.SMEM((BT, C), BF16, transforms=lhs_tf),
            plgpu.SMEM((C, BT), BF16, transforms=rhs_tf),
        ],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=mosaic_gpu_interpret_params() if interpret else None,
    )(lhs, *((cols, rows) if transposed else (rows, cols)), vals)


def _sparse(lhs, values, idx, k: int, n: int, slots: int | None, *, transposed: bool, interpret: bool):
    """``lhs @ S`` (``transposed``: ``lhs @ Sᵀ``) in float32, cropped to ``lhs``'s rows and the product's columns,
    with the support's tile layout and its spilled entries (for the XLA correction)."""
    m = lhs.shape[0]
    blk = mosaic_gpu_blocks(m, k, n, idx.shape[0], slots)
    pd = padded(m, k, n, blk)
    layout = tile_layout(idx, k, n, blk)
    local = layout.local.reshape(-1, C)
    rows, cols = local >> (BT.bit_length() - 1), local & (BT - 1)
    vals = layout_values(values, layout).reshape(-1, C).astype(BF16)
    lhs_p = pad2(lhs, pd.mp, pd.np_ if transposed else pd.kp)
    kw = dict(bm=blk.bm, kt=pd.kt, nt=pd.nt, transposed=transposed, interpret=interpret)
    out = _sparse_product(lhs_p, rows, cols, vals, **kw)[:m, : k if transposed else n]
    return out, layout, spilled(layout, idx, values, n)


def _forward(x2, a, b, values, idx, scale: float, slots: int | None, interpret: bool) -> jax.Array:
    k, n = x2.shape[1], b.shape[1]
    xs, layout, sp = _sparse(x2, values, idx, k, n, slots, transposed=False, interpret=interpret)
    y = xs + scale * factor_matmul(factor_matmul(x2, a).astype(x2.dtype), b)
    return spill_corrected_y(layout, sp, y, x2).astype(x2.dtype)


def _backward(x2, dy2, a, b, values, idx, scale: float, slots: int | None, interpret: bool):
    k, n = x2.shape[1], b.shape[1]
    dy_bt = factor_matmul(dy2, b.T)  # (M, r): dY Bᵀ, shared by dA and dX
    dxs, layout, sp = _sparse(dy2, values, idx, k, n, slots, transposed=True, interpret=interpret)
    dx = spill_corrected_dx(layout, sp, dxs + scale * factor_matmul(dy_bt.astype(dy2.dtype), a.T), dy2)
    cfg = KernelConfig(interpret=interpret)
    dv = per_platform(
        lambda target: functools.partial(dvalues_on, target, cfg), x2, dy2, a, b, values, idx, interpret=interpret
    )
    da, db = factor_grads(x2, dy2, dy_bt, a, scale)
    return dx.astype(x2.dtype), da, db, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _sl_matmul(x2, a, b, values, idx, scale: float, slots: int | None, interpret: bool):
    return _forward(x2, a, b, values, idx, scale, slots, interpret)


def _vjp_fwd(x2, a, b, values, idx, scale, slots, interpret):
    return _forward(x2, a, b, values, idx, scale, slots, interpret), (x2, a, b, values, idx)


def _vjp_bwd(scale, slots, interpret, res, dy2):
    x2, a, b, values, idx = res
    dx, da, db, dv = _backward(x2, dy2, a, b, values, idx, scale, slots, interpret)
    return dx, da.astype(a.dtype), db.astype(b.dtype), dv.astype(values.dtype), None


_sl_matmul.defvjp(_vjp_fwd, _vjp_bwd)


def sl_matmul_mosaic_gpu(x, a, b, values, idx, scale: float, interpret: bool, slots: int | None = None) -> jax.Array:
    """``y = x @ (A B s + S)`` with the sparse products on the Mosaic GPU kernels, differentiable in
    ``x, a, b, values`` (module docstring); ``x (..., in)`` bfloat16; ``slots``: per-tile capacity (None:
    the probabilistic bound; a small one forces the spill correction, for tests)."""
    why = unsupported(x.dtype)
    if why:
        raise ValueError(f"implementation 'mosaic_gpu': {why}")
    if not interpret and not lowers():
        raise ValueError(
            f"implementation 'mosaic_gpu': the SL kernels lower with jax >= {'.'.join(map(str, LOWERS_FROM))}"
            f" (this is {jax.__version__}); jax 0.10's Mosaic GPU layout inference finds no layout for them"
        )
    k, n = a.shape[0], b.shape[1]
    y2 = _sl_matmul(x.reshape(-1, k), a, b, values, idx, float(scale), slots, bool(interpret))
    return y2.reshape(*x.shape[:-1], n)
