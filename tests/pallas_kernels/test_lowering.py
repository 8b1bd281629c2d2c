"""Every Pallas kernel lowers for ``cuda`` (Triton; the ternary matmul also Mosaic GPU) and ``tpu`` (Mosaic, TPU
v5e), forward and backward, on CPU.

``jax.export`` runs the whole lowering — block-shape checks, the Triton and Mosaic TPU lowering rules,
dtype rules — without an accelerator (:func:`pallas_kernels.lowering.export_for`). Shapes: the 1B
SLTrain MLP (2048×5461 and 5461×2048, r = 512, δ = 0.03, 2048 bf16 tokens), the 7B ternary GEMV and a
256-token GEMM (4096×11008), and shapes that are multiples of no block. Each case asserts that the
module calls exactly the expected kernels, so the CPU interpreter branch was dropped and no XLA
fallback hides a kernel that did not lower. What is not proven here: Triton → PTX and Mosaic's layout
passes, which run at compile time on the device (the block choosers bound shared memory and VMEM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.lowering import PLATFORMS, abstract_mesh, custom_call_targets, export_for, kernel_calls
from pallas_kernels.sl_matmul import mosaic_gpu as sl_mosaic_gpu
from pallas_kernels.sl_matmul.api import sl_matmul
from pallas_kernels.sl_matmul.kernel import KernelConfig, sl_matmul_pallas
from pallas_kernels.ternary_matmul import packed_rows, ternary_matmul

S = jax.ShapeDtypeStruct
SL_KERNELS = ["sl_matmul_fwd", "sl_matmul_dx", "sl_matmul_dvalues"]

# name -> (tokens, in, out, rank, density, x dtype, low-rank mode)
SL_CASES = {
    "1b_gate_up": (2048, 2048, 5461, 512, 0.03, jnp.bfloat16, "factored"),
    "1b_down": (2048, 5461, 2048, 512, 0.03, jnp.bfloat16, "factored"),
    "1b_gate_up_tile": (2048, 2048, 5461, 512, 0.03, jnp.bfloat16, "tile"),
    "awkward_bf16": (37, 45, 29, 5, 0.03, jnp.bfloat16, "factored"),
    "awkward_f32_tile": (300, 1000, 333, 7, 0.1, jnp.float32, "tile"),
}


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("case", list(SL_CASES))
def test_sl_matmul_forward_and_backward_lower(case, platform):
    m, k, n, r, density, dtype, lowrank = SL_CASES[case]
    nnz = round(density * k * n)
    cfg = KernelConfig(lowrank=lowrank)

    def fwd_bwd(x, a, b, values, idx, dy):
        y, vjp = jax.vjp(lambda *p: sl_matmul_pallas(*p, idx, 0.0625, cfg), x, a, b, values)
        return y, vjp(dy)

    args = (S((m, k), dtype), S((k, r), jnp.float32), S((r, n), jnp.float32), S((nnz,), jnp.float32))
    exported = export_for(fwd_bwd, platform, *args, S((nnz,), jnp.int32), S((m, n), dtype))
    assert exported.platforms == (platform,)
    assert kernel_calls(exported) == SL_KERNELS


# name -> (x shape, in, out, x dtype, differentiate)
TERNARY_CASES = {
    "7b_gemv_bf16": ((1, 4096), 4096, 11008, jnp.bfloat16, True),
    "7b_gemv_int8": ((1, 4096), 4096, 11008, jnp.int8, False),
    "7b_gemm_256_tokens": ((2, 128, 4096), 4096, 11008, jnp.bfloat16, True),
    "awkward_f32": ((7, 77), 77, 45, jnp.float32, True),
    "awkward_int8": ((300, 1001), 1001, 999, jnp.int8, False),
}


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("case", list(TERNARY_CASES))
def test_ternary_matmul_forward_and_backward_lower(case, platform):
    shape, k, n, dtype, differentiate = TERNARY_CASES[case]

    def forward(x, packed, x_scale):
        return ternary_matmul(x, packed, 0.02, k=k, x_scale=x_scale, implementation="pallas")

    def fwd_bwd(x, packed, x_scale, dy):  # the VJP in x is XLA (unpack + matmul), lowered alongside
        y, vjp = jax.vjp(lambda x: forward(x, packed, x_scale), x)
        return y, vjp(dy)

    args = (S(shape, dtype), S((packed_rows(k), n), jnp.uint8), S(shape[:-1], jnp.float32))
    if differentiate:
        exported = export_for(fwd_bwd, platform, *args, S((*shape[:-1], n), jnp.float32))
    else:
        exported = export_for(forward, platform, *args)
    assert kernel_calls(exported) == ["ternary_matmul"]


@pytest.mark.parametrize("case", ["7b_gemv_bf16", "7b_gemv_int8", "7b_gemm_256_tokens", "awkward_int8"])
def test_ternary_matmul_mosaic_gpu_lowers_for_cuda(case):
    """The Mosaic GPU kernel (Hopper warpgroup MMAs), forward and backward: its lowering verifies the MMA shapes,
    the swizzled shared-memory layouts and the shared-memory total (232,448 bytes on sm_90a)."""
    shape, k, n, dtype, differentiate = TERNARY_CASES[case]

    def forward(x, packed, x_scale):
        return ternary_matmul(x, packed, 0.02, k=k, x_scale=x_scale, implementation="mosaic_gpu", interpret=False)

    def fwd_bwd(x, packed, x_scale, dy):
        y, vjp = jax.vjp(lambda x: forward(x, packed, x_scale), x)
        return y, vjp(dy)

    args = (S(shape, dtype), S((packed_rows(k), n), jnp.uint8), S(shape[:-1], jnp.float32))
    if differentiate:
        exported = export_for(fwd_bwd, "cuda", *args, S((*shape[:-1], n), jnp.float32))
    else:
        exported = export_for(forward, "cuda", *args)
    assert kernel_calls(exported) == ["ternary_matmul"]
    assert [t for t in custom_call_targets(exported) if t.startswith("mosaic_gpu")]


@pytest.mark.skipif(not sl_mosaic_gpu.lowers(), reason="the SL Mosaic GPU kernels lower with jax >= 0.11")
@pytest.mark.parametrize("case", ["1b_gate_up", "1b_down", "awkward_bf16"])
def test_sl_matmul_mosaic_gpu_lowers_for_cuda(case):
    """The SL Mosaic GPU port, forward and backward: the sparse products' kernel lowers (the MMA shapes, the
    register layouts of the one-hot operands, the shared-memory total are verified), dvalues on Triton."""
    m, k, n, r, density, dtype, _ = SL_CASES[case]
    nnz = round(density * k * n)

    def fwd_bwd(x, a, b, values, idx, dy):
        f = lambda *p: sl_matmul(*p, idx, 0.0625, implementation="mosaic_gpu", interpret=False)
        y, vjp = jax.vjp(f, x, a, b, values)
        return y, vjp(dy)

    args = (S((m, k), dtype), S((k, r), jnp.float32), S((r, n), jnp.float32), S((nnz,), jnp.float32))
    exported = export_for(fwd_bwd, "cuda", *args, S((nnz,), jnp.int32), S((m, n), dtype))
    assert kernel_calls(exported) == ["sl_matmul_sparse", "sl_matmul_sparse", "sl_matmul_dvalues"]
    assert [t for t in custom_call_targets(exported) if t.startswith("mosaic_gpu")]


@pytest.mark.skipif(sl_mosaic_gpu.lowers(), reason="this jax lowers the SL Mosaic GPU kernels")
def test_sl_matmul_mosaic_gpu_refuses_to_lower_where_jax_cannot():
    x, a, b = jnp.zeros((4, 8), jnp.bfloat16), jnp.zeros((8, 2)), jnp.zeros((2, 8))
    with pytest.raises(ValueError, match="lower with jax >= 0.11"):
        sl_matmul(x, a, b, jnp.zeros(3), jnp.arange(3), 1.0, implementation="mosaic_gpu", interpret=False)


def test_tpu_lowering_takes_a_chip_generation_from_the_abstract_mesh():
    """Mosaic rules that depend on the chip (here: rank-1 blocks, whose legal sizes come from the lane and
    sublane counts; a 1-d per-row scale would be one) read the device kind. On CPU that is
    ``"cpu"``; an abstract mesh of TPU devices names the generation instead."""

    def double(x):  # a kernel with a rank-1 block
        def kernel(x_ref, o_ref):
            o_ref[...] = x_ref[...] * 2.0

        spec = pl.BlockSpec((256,), lambda i: (i,))
        return pl.pallas_call(kernel, grid=(4,), in_specs=[spec], out_specs=spec, out_shape=x)(x)

    args = (S((1024,), jnp.float32),)
    with pytest.raises(ValueError, match="Unsupported TPU device kind: cpu"):
        jax.export.export(jax.jit(double), platforms=["tpu"])(*args)
    for kind in ("TPU v4", "TPU v5 lite", "TPU v6 lite", "TPU7x"):
        exported = export_for(double, "tpu", *args, mesh=abstract_mesh("tpu", device_kind=kind))
        assert custom_call_targets(exported) == ["tpu_custom_call"]
