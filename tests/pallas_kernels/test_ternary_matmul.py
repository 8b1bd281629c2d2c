"""Packed ternary matmul: packing round-trips; Pallas (interpret mode) and XLA equal a float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.platforms import GPU, GPU_SMEM_BUDGET, LANE, TPU, TPU_VMEM_BUDGET, Target, is_pow2
from pallas_kernels.ternary_matmul import (
    choose_blocks,
    pack_ternary,
    packed_rows,
    ternary_matmul,
    ternary_matmul_reference,
    unpack_ternary,
)
from pallas_kernels.ternary_matmul.blocks import TernaryBlocks, choose_splits, smem_bytes, vmem_bytes, wave_efficiency
from pallas_kernels.ternary_matmul.layout import pad_operands
from pallas_kernels.ternary_matmul.tiles import ternary_matmul_pallas_padded


def _ternary(rng, k, n, p_zero=None):
    p_zero = rng.uniform(0.1, 0.7) if p_zero is None else p_zero
    w = rng.choice([-1, 1], size=(k, n))
    return np.where(rng.random((k, n)) < p_zero, 0, w).astype(np.int8)


def _np_pack(w):
    """Independent NumPy packer of the documented planar layout (bit pair j ↔ row j·Kq + r)."""
    k, n = w.shape
    kq = -(-k // 4)
    codes = np.ones((4 * kq, n), np.uint8)
    codes[:k] = (w.astype(np.int16) + 1).astype(np.uint8)
    out = np.zeros((kq, n), np.uint8)
    for j in range(4):
        out |= codes[j * kq : (j + 1) * kq] << (2 * j)
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 33, 130])
def test_pack_round_trip_and_layout(rng, k):
    n = int(rng.integers(1, 20))
    w = _ternary(rng, k, n)
    packed = pack_ternary(jnp.asarray(w))
    assert packed.dtype == jnp.uint8 and packed.shape == (packed_rows(k), n)
    np.testing.assert_array_equal(np.asarray(packed), _np_pack(w))
    np.testing.assert_array_equal(np.asarray(unpack_ternary(packed, k)), w)
    # float and int32 inputs pack the same way
    np.testing.assert_array_equal(np.asarray(pack_ternary(jnp.asarray(w, jnp.float32))), _np_pack(w))
    assert not np.any((np.asarray(packed) >> 6) == 3)  # code 3 is never written


def test_pack_errors():
    with pytest.raises(ValueError, match="w_KxN"):
        pack_ternary(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="packed_KqxN"):
        unpack_ternary(jnp.ones((2, 3), jnp.int32), 8)
    with pytest.raises(ValueError, match="k:"):
        unpack_ternary(jnp.ones((2, 3), jnp.uint8), 9)
    with pytest.raises(ValueError, match="k:"):
        packed_rows(0)


def _reference64(x, w, scale, x_scale=None):
    y = np.asarray(x, np.float64) @ w.astype(np.float64) * scale
    return y if x_scale is None else y * np.asarray(x_scale, np.float64)[:, None]


def _random_case(rng):
    m = int(rng.choice([1, 2, 3, int(rng.integers(4, 70))]))
    k = int(rng.integers(1, 400))
    n = int(rng.integers(1, 150))
    blocks = (int(rng.choice([16, 32])), int(rng.choice([16, 32, 64])), int(rng.choice([16, 32])))
    dtype = rng.choice(["bfloat16", "int8", "float32"])
    structure = str(rng.choice(["gpu", "tpu"]))  # Triton's in-program loop or Mosaic TPU's reduction grid axis
    return m, k, n, blocks, str(dtype), structure


CASES = 32


@pytest.mark.parametrize("case", range(CASES))
def test_pallas_kernel_matches_reference_on_random_shapes(rng, case):
    m, k, n, blocks, dtype, structure = _random_case(rng)
    w = _ternary(rng, k, n)
    packed = pack_ternary(jnp.asarray(w))
    scale = float(rng.uniform(0.01, 2.0))
    x_scale = None
    if dtype == "int8":
        x = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
        x_scale = jnp.asarray(rng.uniform(1e-3, 0.1, m), jnp.float32)
    else:
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rowscale = scale * (x_scale if x_scale is not None else jnp.ones((m,), jnp.float32))
    target = Target(structure, interpret=True)
    blk = choose_blocks(target, m, packed.shape[0], n, x.dtype.itemsize, blocks)
    if structure == "gpu":  # split-K whenever the packed-row steps divide (GEMV and GEMM alike)
        n_red = -(-packed.shape[0] // blk.bkq)
        blk = blk._replace(splits=max(s for s in (1, 2, 3) if n_red % s == 0))
    xp, wp, sp = pad_operands(x, packed, rowscale, k, blk)
    shape = (xp.shape[0], wp.shape[1]) if blk.splits == 1 else (blk.splits, xp.shape[0], wp.shape[1])
    poison = jnp.full(shape, jnp.nan, jnp.float32)
    out = ternary_matmul_pallas_padded(
        xp,
        wp,
        sp,
        bm=blk.bm,
        bn=blk.bn,
        bkq=blk.bkq,
        out_dtype=jnp.float32,
        target=target,
        out_init=poison,
        splits=blk.splits,
    )
    assert not np.isnan(np.asarray(out)).any()  # every tile of every split written
    out = np.asarray(out) if blk.splits == 1 else np.asarray(out).sum(axis=0)
    msg = f"m={m} k={k} n={n} blocks={blk} dtype={dtype} structure={structure}"
    assert not np.isnan(out).any(), msg  # every tile written
    np.testing.assert_array_equal(out[m:], 0.0, err_msg=msg)
    np.testing.assert_array_equal(out[:, n:], 0.0, err_msg=msg)
    expected = _reference64(x.astype(jnp.float32), w, scale, x_scale)
    tol = 1e-5 * (np.abs(np.asarray(x, np.float64)) @ np.abs(w) * scale + 1)
    if x_scale is not None:
        tol = tol * np.asarray(x_scale, np.float64)[:, None]
    assert np.all(np.abs(out[:m, :n] - expected) <= tol), msg
    # the XLA reference path agrees too
    ref = ternary_matmul(x, packed, scale, k=k, x_scale=x_scale, implementation="xla")
    assert np.all(np.abs(np.asarray(ref, np.float64) - expected) <= tol), msg


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_api_batch_dims_and_vjp(rng, impl):
    k, n = int(rng.integers(5, 90)), int(rng.integers(3, 70))
    w = _ternary(rng, k, n)
    packed = pack_ternary(jnp.asarray(w))
    scale = float(rng.uniform(0.1, 1.0))
    x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.float32)
    dy = rng.standard_normal((2, 3, n))

    def f(x):
        y = ternary_matmul(x, packed, scale, k=k, implementation=impl, blocks=(16, 16, 16))
        return jnp.sum(y * jnp.asarray(dy, jnp.float32)), y

    (_, y), dx = jax.value_and_grad(f, has_aux=True)(x)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(np.asarray(y), x64 @ w * scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), dy @ w.T * scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dy_dtype,gemms", [(jnp.bfloat16, 1), (jnp.float32, 3)])
def test_the_backward_is_bf16_gemms_exact_to_float32(rng, dy_dtype, gemms):
    """``dx = rowscale ⊙ (dy @ Wᵀ)``: bfloat16 GEMMs (one for a bfloat16 dy, three for float32) whose only error
    is float32 summation: within ``n · 2⁻²⁴ · (|dy| @ |W|ᵀ)`` of float64 per entry, where rounding a float32 dy
    to bfloat16 once would be off by up to 2⁻⁹ of it."""
    from pallas_kernels.ternary_matmul.xla import x_grad

    m, k, n = int(rng.integers(1, 9)), int(rng.integers(200, 700)), int(rng.integers(300, 1100))
    w = _ternary(rng, k, n)
    rowscale = rng.uniform(0.1, 2.0, m).astype(np.float32)
    dy = jnp.asarray(rng.standard_normal((m, n)) * 10.0 ** rng.uniform(-3, 3, (m, 1)), dy_dtype)
    packed = pack_ternary(jnp.asarray(w))
    f = lambda dy: x_grad(dy, packed, jnp.asarray(rowscale), k, jnp.float32)
    dots = [e for e in jax.make_jaxpr(f)(dy).jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == gemms and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    dy64 = np.asarray(dy.astype(jnp.float32), np.float64)
    expected = rowscale[:, None] * (dy64 @ w.T)
    bound = n * 2.0**-24 * rowscale[:, None] * (np.abs(dy64) @ np.abs(w).T)
    err = np.abs(np.asarray(f(dy), np.float64) - expected)
    assert np.all(err <= bound), f"max error / bound {np.max(err / np.maximum(bound, 1e-300)):.3g}"


def test_int8_activations_and_auto_implementation(rng):
    k, n, m = 77, 45, 4
    w = _ternary(rng, k, n)
    packed = pack_ternary(jnp.asarray(w))
    xi = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    xs = jnp.asarray(rng.uniform(1e-3, 1e-1, m), jnp.float32)
    y = ternary_matmul(xi, packed, 0.37, k=k, x_scale=xs)  # auto: XLA on CPU
    np.testing.assert_allclose(np.asarray(y), _reference64(xi, w, 0.37, xs), rtol=1e-6, atol=1e-6)
    yr = ternary_matmul_reference(xi, packed, 0.37, k, xs)
    np.testing.assert_allclose(np.asarray(yr), np.asarray(y), rtol=1e-6, atol=1e-6)
    bf = ternary_matmul(xi.astype(jnp.bfloat16), packed, 0.5, k=k, out_dtype=jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "m,k,n", [(1, 4096, 11008), (256, 4096, 11008), (2048, 4096, 4096), (3, 5, 7), (300, 1001, 999)]
)
@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_blocks_follow_each_backends_rules(m, k, n, itemsize):
    kq = packed_rows(k)
    gpu = choose_blocks(GPU, m, kq, n, itemsize)
    assert all(is_pow2(b) and b >= 16 for b in gpu[:3]), gpu  # Triton's power-of-two tensors, dots >= 16
    assert smem_bytes(gpu, itemsize) <= GPU_SMEM_BUDGET, gpu
    tpu = choose_blocks(TPU, m, kq, n, itemsize)
    assert tpu.bn % LANE == 0 and tpu.bkq % LANE == 0, tpu  # lane dims (uint8 weights tile (32, 128))
    assert tpu.bm == m or tpu.bm % 32 == 0, tpu  # the whole row extent, or a multiple of every sublane tiling
    assert vmem_bytes(tpu, itemsize) <= TPU_VMEM_BUDGET, tpu
    if (m, k, n) == (1, 4096, 11008):  # the 7B GEMV: weights not padded (no per-call copy), enough GPU programs
        assert 11008 % gpu.bn == 0 and 11008 % tpu.bn == 0 and kq % gpu.bkq == 0 and kq % tpu.bkq == 0
        assert 11008 // gpu.bn >= 132  # an H100 has 132 SMs
        assert gpu.splits > 1 and wave_efficiency(11008 // gpu.bn * gpu.splits) >= 0.9  # split-K fills them
    if m >= 128:
        assert gpu.bm == 128 and gpu.num_warps == 8 and gpu.splits == 1  # one decode per 128-row tile
    # requests are legalised, never rejected: any target takes any request
    assert choose_blocks(TPU, m, kq, n, itemsize, (16, 16, 16))[1:3] == (LANE, LANE)
    assert choose_blocks(GPU, m, kq, n, itemsize, (3, 20, 16))[:3] == (16, 32, 16)
    assert choose_blocks(Target("tpu", True), m, kq, n, itemsize, (16, 16, 16)) == TernaryBlocks(16, 16, 16)


def test_choose_splits_fills_the_sms():
    assert wave_efficiency(132) == 1.0 and wave_efficiency(172) == pytest.approx(172 / 264)
    assert choose_splits(172, 8) == 8  # 1376 programs: 94.8 % of 11 waves; 1 split: 65 %
    assert choose_splits(264, 8) == 1  # already two full waves
    assert choose_splits(172, 3) in (1, 3) and 3 % choose_splits(172, 3) == 0  # only divisors of the steps


def test_split_k_through_the_api_matches_the_reference():
    rng = np.random.default_rng(5)
    w = _ternary(rng, 200, 40)
    packed = pack_ternary(jnp.asarray(w))
    x = jnp.asarray(rng.standard_normal((3, 200)), jnp.float32)
    want = _reference64(x, w, 0.5, None)
    for blocks in [(16, 16, 16, 4), (16, 16, 16, 2), (16, 32, 16)]:
        y = ternary_matmul(x, packed, 0.5, k=200, implementation="pallas", interpret=True, blocks=blocks)
        np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="splits: 3 must divide the 4"):
        ternary_matmul(x, packed, 0.5, k=200, implementation="pallas", interpret=True, blocks=(16, 16, 16, 3))


def test_api_errors():
    packed = pack_ternary(jnp.ones((8, 4)))
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="implementation"):
        ternary_matmul(x, packed, 1.0, k=8, implementation="cuda")
    with pytest.raises(ValueError, match="k:"):
        ternary_matmul(x, packed, 1.0, k=12)
    with pytest.raises(ValueError, match="x:"):
        ternary_matmul(jnp.ones((2, 7)), pack_ternary(jnp.ones((7, 4))), 1.0, k=8)
    with pytest.raises(ValueError, match="x_scale"):
        ternary_matmul(x.astype(jnp.int8), packed, 1.0, k=8)
    with pytest.raises(ValueError, match="x_scale"):
        ternary_matmul(x, packed, 1.0, k=8, x_scale=jnp.ones((3,)))
    with pytest.raises(ValueError, match="x:"):
        ternary_matmul(x.astype(jnp.int32), packed, 1.0, k=8)
    with pytest.raises(ValueError, match="packed_KqxN"):
        ternary_matmul(x, packed.astype(jnp.int32), 1.0, k=8)
    with pytest.raises(ValueError, match="blocks"):
        ternary_matmul(x, packed, 1.0, k=8, blocks=(16, 0, 16))
    with pytest.raises(ValueError, match="shapes"):
        ternary_matmul_pallas_padded(
            jnp.ones((16, 64)),
            jnp.ones((16, 16), jnp.uint8),
            jnp.ones((16, 1)),
            bm=16,
            bn=16,
            bkq=32,
            out_dtype=jnp.float32,
            target=Target("gpu", interpret=True),
        )


@pytest.mark.parametrize("case", range(6))
def test_mosaic_gpu_kernel_matches_reference_on_random_shapes(rng, case):
    """The Mosaic GPU kernel, run by Mosaic GPU's interpreter (shared memory, TMA and warpgroup MMAs simulated):
    bfloat16 or int8 activations, row counts either side of its 64-row tile, k and n that fill no tile."""
    m = int(rng.choice([1, 5, 64, 65, 130]))
    k, n = int(rng.integers(3, 600)), int(rng.integers(2, 150))
    w = _ternary(rng, k, n)
    packed = pack_ternary(jnp.asarray(w))
    scale = float(rng.uniform(0.1, 2.0))
    if case % 2:
        x = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
        x_scale = jnp.asarray(rng.uniform(1e-3, 1e-1, m), jnp.float32)
    else:
        x, x_scale = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16), None
    out = ternary_matmul(x, packed, scale, k=k, x_scale=x_scale, implementation="mosaic_gpu")
    expected = _reference64(x.astype(jnp.float32), w, scale, x_scale)
    tol = 1e-5 * (np.abs(np.asarray(x.astype(jnp.float32), np.float64)) @ np.abs(w) * scale + 1)
    if x_scale is not None:
        tol = tol * np.asarray(x_scale, np.float64)[:, None]
    msg = f"m={m} k={k} n={n} dtype={x.dtype}"
    assert out.shape == (m, n) and out.dtype == jnp.float32, msg
    assert np.all(np.abs(np.asarray(out, np.float64) - expected) <= tol), msg


def test_mosaic_gpu_through_the_api_batch_dims_vjp_and_record(rng):
    from pallas_kernels import selection

    k, n = int(rng.integers(5, 300)), int(rng.integers(3, 70))
    w = _ternary(rng, k, n)
    packed = pack_ternary(jnp.asarray(w))
    x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((2, 3, n)), jnp.float32)

    def f(x):
        y = ternary_matmul(x, packed, 0.5, k=k, implementation="mosaic_gpu", out_dtype=jnp.bfloat16)
        return jnp.sum(y.astype(jnp.float32) * dy), y

    (_, y), dx = jax.value_and_grad(f, has_aux=True)(x)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    assert y.shape == (2, 3, n) and y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float64), x64 @ w * 0.5, rtol=1e-2, atol=1e-2)
    dy_bf16 = np.asarray(dy.astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # y's cotangent is bfloat16
    dx64 = dy_bf16 @ w.T * 0.5
    np.testing.assert_allclose(np.asarray(dx, np.float64), dx64, rtol=1e-2, atol=1e-2)
    chosen = [c for c in selection.implementation_record() if c["kernel"] == "ternary_matmul"]
    assert {(c["implementation"], c["reason"]) for c in chosen if c["requested"] == "mosaic_gpu"} == {
        ("mosaic_gpu", "requested")
    }


def test_mosaic_gpu_errors():
    packed = pack_ternary(jnp.ones((8, 4)))
    with pytest.raises(ValueError, match="'mosaic_gpu' cannot run ternary_matmul .* tf32"):
        ternary_matmul(jnp.ones((2, 8), jnp.float32), packed, 1.0, k=8, implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="blocks: the 'mosaic_gpu' kernel"):
        ternary_matmul(jnp.ones((2, 8), jnp.bfloat16), packed, 1.0, k=8, implementation="mosaic_gpu", blocks=(16,) * 3)
    with pytest.raises(ValueError, match="mosaic_gpu"):  # named among the choices
        ternary_matmul(jnp.ones((2, 8), jnp.bfloat16), packed, 1.0, k=8, implementation="triton")
