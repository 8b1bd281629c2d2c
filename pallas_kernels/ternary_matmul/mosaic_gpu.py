"""The packed ternary matmul as a Pallas **Mosaic GPU** kernel (Hopper, sm_90a): warpgroup MMAs from shared memory.

``implementation='mosaic_gpu'`` of :func:`~pallas_kernels.ternary_matmul.api.ternary_matmul`. The Triton kernel
(:mod:`pallas_kernels.ternary_matmul.tiles`) stays what ``'auto'`` runs on GPUs until a device measurement
compares the two; this one exists because JAX's Pallas Triton backend is deprecated and Mosaic GPU is the backend
JAX develops for Hopper.

Each program owns an output tile of ``bm`` ∈ {64, 128} rows of ``x`` (the MMA's M extent, a multiple of 64 for
one warpgroup) by ``bn`` = 64 columns. Per reduction step the pipeline (``plgpu.emit_pipeline``, two stages)
copies by TMA one ``(bkq, bn)`` tile of packed bytes and the four activation tiles ``(bm, bkq)``, one per bit
plane (the planar layout of :mod:`pallas_kernels.ternary_matmul.layout`: packed row ``r`` holds weight rows
``j·Kq + r``, ``j`` = 0…3, and :func:`~pallas_kernels.ternary_matmul.layout.pad_operands` moves activation
plane ``j`` to columns ``j·Kqp …``). The warpgroup decodes the bytes into the four planes
``((p >> 2j) & 3) − 1`` as bfloat16 in shared memory, then issues four MMAs ``acc += x_j · plane_j`` (both
operands in swizzled shared memory) into a float32 accumulator in registers, and waits for them before the next
step overwrites the planes. XLA pads the operands around the call and applies ``rowscale`` to the sliced float32
result in one fused pass. Products are exact in bfloat16 for bfloat16 and int8 inputs (int8 → bfloat16 is exact)
with float32 accumulation, as in the Triton kernel; float32 inputs are refused (a warpgroup MMA rounds float32
operands to tf32).

On CPU the kernel runs in Mosaic GPU's interpreter (``InterpretGPUParams``: shared memory, TMA and warpgroup
MMAs simulated), which is how the tests check it against the reference; ``jax.export(..., platforms=['cuda'])``
runs its Mosaic GPU lowering, whose verifier checks the MMA shapes, the swizzled layouts and the shared-memory
total (:mod:`pallas_kernels.lowering`). What a CPU machine cannot show is its machine code: Mosaic GPU compiles
to PTX inside the CUDA plugin, so it has no offline SASS report like the Triton kernels'.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.platforms import mosaic_gpu_interpret_params
from pallas_kernels.ternary_matmul.blocks import TernaryBlocks
from pallas_kernels.ternary_matmul.layout import pad_operands

BN = 64  # output columns per program (the MMA's N extent)
BKQ = 64  # packed rows per reduction step (256 input rows, 4 MMAs of k = 64)
STAGES = 2  # TMA pipeline depth


def mosaic_gpu_blocks(m: int) -> TernaryBlocks:
    """Tiles for ``m`` activation rows: ``bm`` = 64 up to 64 rows, else 128 (the MMA's M extent)."""
    return TernaryBlocks(bm=64 if m <= 64 else 128, bn=BN, bkq=BKQ)


def unsupported(x_dtype: jnp.dtype) -> str | None:
    """Why the Mosaic GPU kernel cannot take activations of ``x_dtype`` (None: it can)."""
    if jnp.dtype(x_dtype) == jnp.float32:
        return "float32 activations: a warpgroup MMA rounds them to tf32 (use 'pallas' or 'xla')"
    return None


def _product(xp: jax.Array, wp: jax.Array, *, bm: int, interpret: bool) -> jax.Array:
    """``Σ_j xp[:, j·Kqp:(j+1)·Kqp] @ plane_j(wp)`` in float32, ``(Mp, Np)``; shapes padded to the tiles."""
    mp = xp.shape[0]
    kqp, np_ = wp.shape
    steps = kqp // BKQ
    x_swizzle = plgpu.find_swizzle(BKQ * 16, "lhs")  # bf16 rows of bkq elements
    w_swizzle = plgpu.find_swizzle(BN * 16, "rhs")
    p_swizzle = plgpu.find_swizzle(BN * 8, "rhs")  # uint8 rows of bn bytes
    x_tf = (plgpu.TilingTransform((8, x_swizzle // 2)), plgpu.SwizzleTransform(x_swizzle))
    w_tf = (plgpu.TilingTransform((8, w_swizzle // 2)), plgpu.SwizzleTransform(w_swizzle))
    p_tf = (plgpu.TilingTransform((8, p_swizzle)), plgpu.SwizzleTransform(p_swizzle))

    def ternary_matmul(x_gmem, p_gmem, o_gmem, o_smem, w_smem):  # its name is the Mosaic GPU kernel's
        mi, ni = jax.lax.axis_index("m"), jax.lax.axis_index("n")

        def accumulate(acc_ref):
            def step(_, p_smem, *x_smem):
                p = p_smem[...].astype(jnp.int32)
                for j in range(4):
                    w_smem[j] = (((p >> (2 * j)) & 3) - 1).astype(jnp.bfloat16)
                plgpu.commit_smem()
                for j in range(4):
                    plgpu.wgmma(acc_ref, x_smem[j], w_smem.at[j])
                plgpu.wgmma_wait(0)

            plane = lambda j, kb: (mi, j * steps + kb)
            specs = [plgpu.BlockSpec((BKQ, BN), lambda kb: (kb, ni), transforms=p_tf)]
            specs += [plgpu.BlockSpec((bm, BKQ), functools.partial(plane, j), transforms=x_tf) for j in range(4)]
            plgpu.emit_pipeline(step, grid=(steps,), in_specs=specs, max_concurrent_steps=STAGES)(p_gmem, *[x_gmem] * 4)
            return acc_ref[...]

        o_smem[...] = pl.run_scoped(accumulate, plgpu.ACC((bm, BN), jnp.float32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * bm, bm), pl.ds(ni * BN, BN)])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        ternary_matmul,
        out_type=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
        grid=(mp // bm, np_ // BN),
        grid_names=("m", "n"),
        scratch_types=[plgpu.SMEM((bm, BN), jnp.float32), plgpu.SMEM((4, BKQ, BN), jnp.bfloat16, transforms=w_tf)],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=mosaic_gpu_interpret_params() if interpret else None,
    )(xp, wp)


def ternary_matmul_mosaic_gpu(
    x_MxK: jax.Array, packed: jax.Array, rowscale_M: jax.Array, k: int, out_dtype: jnp.dtype, interpret: bool
) -> jax.Array:
    """``rowscale ⊙ (x @ unpack(packed))`` by the Mosaic GPU kernel, for bfloat16 or int8 ``x (M, K)``.

    ``interpret``: Mosaic GPU's interpreter instead of the kernel. It is decided when the call is traced, not
    per platform when it is lowered as the Triton kernel's interpreter is (the interpreter's host callbacks
    cannot sit in a ``platform_dependent`` branch), so a CPU machine runs it with ``interpret=True`` and
    lowers the kernel for ``cuda`` with ``interpret=False``.
    """
    why = unsupported(x_MxK.dtype)
    if why:
        raise ValueError(f"implementation 'mosaic_gpu': {why}")
    m, n = x_MxK.shape[0], packed.shape[1]
    blk = mosaic_gpu_blocks(m)
    xp, wp, _ = pad_operands(x_MxK.astype(jnp.bfloat16), packed, rowscale_M, k, blk)
    y = _product(xp, wp, bm=blk.bm, interpret=interpret)
    return (y[:m, :n] * rowscale_M.astype(jnp.float32)[:, None]).astype(out_dtype)
