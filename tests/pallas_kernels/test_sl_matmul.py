"""SLTrain matmul kernels: Pallas (interpret mode) and the XLA custom VJP against the plain-XLA reference."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.platforms import GPU, GPU_SMEM_BUDGET, LANE, TPU, TPU_VMEM_BUDGET, Target, is_pow2, sublane
from pallas_kernels.sl_matmul.api import sl_matmul
from pallas_kernels.sl_matmul.blocks import Blocks, choose_blocks, smem_bytes, vmem_bytes
from pallas_kernels.sl_matmul.kernel import KernelConfig, sl_matmul_pallas
from pallas_kernels.sl_matmul.layout import SPILL, tile_layout
from pallas_kernels.sl_matmul.reference import materialize_w, sl_matmul_reference
from pallas_kernels.sl_matmul.tiles import dvalues_kernel, dx_kernel, forward_kernel
from pallas_kernels.sl_matmul.xla import materialize_w_lowp, sl_matmul_bf16w, sl_matmul_xla

# Small blocks so that every test shape spans several tiles in each dimension; both kernel structures
# (Triton's in-program loop, Mosaic TPU's reduction grid axis) run in the interpreter.
CFG = KernelConfig(block_m=16, block_k=16, block_n=16, interpret=True, poison=True)
STRUCTURES = ("gpu", "tpu")


def _cfg(lowrank: str, structure: str, **kw) -> KernelConfig:
    return dataclasses.replace(CFG, lowrank=lowrank, interpret_as=structure, **kw)


# An output's error may be TOL of its largest reference entry plus ROUNDING of its largest sum of |products|
# (the same computation on absolute values): an entry that cancels to near zero, such as the one sparse
# value's gradient on a small matrix, keeps the rounding error of the sum it came from. ROUNDING is one
# bfloat16 unit roundoff (2**-8), and 16 of float32's (2**-24) for the accumulation order.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
ROUNDING = {jnp.float32: 1e-6, jnp.bfloat16: 4e-3}


def _operands(rng, m, k, n, r, density, dtype, batch=()):
    nnz = max(1, round(density * k * n))
    x = jnp.asarray(rng.standard_normal((*batch, m, k)), dtype)
    a = jnp.asarray(rng.standard_normal((k, r)) / math.sqrt(k), jnp.float32)
    b = jnp.asarray(rng.standard_normal((r, n)), jnp.float32)
    idx = jnp.asarray(rng.choice(k * n, nnz, replace=False), jnp.int32)
    values = jnp.asarray(rng.uniform(-1, 1, nnz), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((*batch, m, n)), dtype)
    return x, a, b, values, idx, dy


def _fwd_vjp(fn, x, a, b, values, idx, dy, scale):
    y, vjp = jax.vjp(lambda *p: fn(*p, idx, scale), x, a, b, values)
    return (y, *vjp(dy))


def _magnitudes(x, a, b, values, idx, dy, scale):
    """Forward and gradients on the operands' absolute values: for each output entry, the sum of the absolute
    products the reference adds up (every output is a sum of products; ``scale`` > 0)."""
    x, a, b, values, dy = (jnp.abs(o.astype(jnp.float32)) for o in (x, a, b, values, dy))
    return _fwd_vjp(sl_matmul_reference, x, a, b, values, idx, dy, scale)


def _check(got, ops, scale, dtype):
    """``got`` against the reference on ``ops``."""
    _assert_close(got, _fwd_vjp(sl_matmul_reference, *ops, scale), _magnitudes(*ops, scale), dtype)


def _assert_close(got, want, magnitudes, dtype, names=("y", "dx", "da", "db", "dvalues")):
    for name, g, w, mag in zip(names, got, want, magnitudes, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, name
        assert np.all(np.isfinite(g)), f"{name}: non-finite entries (poisoned output not overwritten?)"
        err, largest, sums = np.max(np.abs(g - w)), np.max(np.abs(w)), float(np.max(mag))
        allowed = TOL[dtype] * largest + ROUNDING[dtype] * sums
        assert err <= allowed, f"{name}: error {err:.2e} > {allowed:.2e} (largest {largest:.2e}, sum|.| {sums:.2e})"


def _random_shapes(seed: int, count: int, hi: int):
    rng = np.random.default_rng(seed)
    shapes = []
    for i in range(count):
        m, k, n = (int(v) for v in rng.integers(3, hi, size=3))
        r = int(rng.integers(1, min(k, n) + 1))
        density = float(rng.choice([0.01, 0.03, 0.1, 0.3]))
        dtype = (jnp.float32, jnp.bfloat16)[i % 2]
        lowrank = ("factored", "tile")[(i // 2) % 2]
        structure = STRUCTURES[(i // 4) % 2]
        shapes.append((m, k, n, r, density, dtype, lowrank, structure))
    return shapes


# 32 random shapes (both dtypes, low-rank modes and kernel structures), most not multiples of the blocks.
SHAPES = _random_shapes(0, 32, 60)
PARAMS = "m,k,n,r,density,dtype,lowrank,structure"


@pytest.mark.parametrize(PARAMS, SHAPES)
def test_pallas_forward_and_vjp_match_reference(rng, m, k, n, r, density, dtype, lowrank, structure):
    x, a, b, values, idx, dy = _operands(rng, m, k, n, r, density, dtype)
    scale = float(rng.uniform(0.1, 4.0))
    cfg = _cfg(lowrank, structure)
    both = jax.jit(  # one compilation per shape: kernel, reference and magnitudes side by side
        lambda *ops: (
            _fwd_vjp(lambda *p: sl_matmul_pallas(*p, cfg), *ops, scale),
            _fwd_vjp(sl_matmul_reference, *ops, scale),
            _magnitudes(*ops, scale),
        )
    )
    _assert_close(*both(x, a, b, values, idx, dy), dtype)


@pytest.mark.slow
@pytest.mark.parametrize(PARAMS, _random_shapes(1, 40, 300))
def test_pallas_larger_sweep(rng, m, k, n, r, density, dtype, lowrank, structure):
    x, a, b, values, idx, dy = _operands(rng, m, k, n, r, density, dtype)
    cfg = KernelConfig(32, 32, 64, lowrank=lowrank, interpret=True, interpret_as=structure, poison=True)
    run = jax.jit(lambda *ops: _fwd_vjp(lambda *p: sl_matmul_pallas(*p, cfg), *ops, 0.5))
    ref = jax.jit(lambda *ops: (_fwd_vjp(sl_matmul_reference, *ops, 0.5), _magnitudes(*ops, 0.5)))
    _assert_close(run(x, a, b, values, idx, dy), *ref(x, a, b, values, idx, dy), dtype)


def test_pallas_leading_batch_dims_and_api(rng):
    x, a, b, values, idx, dy = _operands(rng, 9, 40, 24, 4, 0.05, jnp.float32, batch=(2,))
    got = _fwd_vjp(
        lambda *p: sl_matmul(*p, implementation="pallas", block_m=16, block_k=32, block_n=16, interpret=True),
        x,
        a,
        b,
        values,
        idx,
        dy,
        1.5,
    )
    _check(got, (x, a, b, values, idx, dy), 1.5, jnp.float32)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_spilled_entries_are_corrected_exactly(rng, structure):
    x, a, b, values, idx, dy = _operands(rng, 20, 40, 40, 3, 0.2, jnp.float32)
    cfg = _cfg("factored", structure, slots=16)
    layout = tile_layout(idx, 40, 40, choose_blocks(Target(structure, True), 20, 40, 40, 320, 3, 4, cfg))
    assert 0 < int(layout.n_spill) <= SPILL  # 320 entries in 9 tiles of 16 slots
    got = jax.jit(lambda *o: _fwd_vjp(lambda *p: sl_matmul_pallas(*p, cfg), *o, 0.8))(x, a, b, values, idx, dy)
    _check(got, (x, a, b, values, idx, dy), 0.8, jnp.float32)


def test_more_spills_than_the_correction_holds_poison_the_result(rng):
    x, a, b, values, idx, dy = _operands(rng, 8, 40, 40, 3, 0.5, jnp.float32)  # 800 entries, 144 slots
    got = jax.jit(lambda *o: _fwd_vjp(lambda *p: sl_matmul_pallas(*p, _cfg("factored", "gpu", slots=16)), *o, 1.0))(
        x, a, b, values, idx, dy
    )
    for name, g in zip(("y", "dx", "da", "db", "dvalues"), got, strict=True):
        if name in ("y", "dx", "dvalues"):  # never a silently wrong value
            assert np.all(np.isnan(np.asarray(g))), name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_custom_vjp_matches_reference_autodiff(rng, dtype):
    x, a, b, values, idx, dy = _operands(rng, 13, 37, 29, 5, 0.1, dtype, batch=(3,))
    got = jax.jit(lambda *o: _fwd_vjp(sl_matmul_xla, *o, 2.0))(x, a, b, values, idx, dy)
    _check(got, (x, a, b, values, idx, dy), 2.0, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bf16w_path_matches_the_float32_reference(dtype):
    """W materialised in x's dtype (the GPU 'auto' path): forward and every gradient within the dtype's
    tolerance of the float32 reference on float32 operands; W is built and multiplied in ``dtype``."""
    rng = np.random.default_rng(3)
    x, a, b, values, idx, dy = _operands(rng, 13, 37, 29, 5, 0.1, dtype, batch=(3,))
    got = jax.jit(lambda *o: _fwd_vjp(sl_matmul_bf16w, *o, 2.0))(x, a, b, values, idx, dy)
    f32 = [o.astype(jnp.float32) if o.dtype == dtype else o for o in (x, a, b, values, idx, dy)]
    with jax.default_matmul_precision("float32"):
        want = jax.jit(lambda *o: _fwd_vjp(sl_matmul_reference, *o, 2.0))(*f32)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    _assert_close(got, want, _magnitudes(*f32, 2.0), dtype)
    w = materialize_w_lowp(a, b, values, idx, 2.0, dtype)
    assert w.dtype == dtype
    jaxpr = str(jax.make_jaxpr(lambda *o: materialize_w_lowp(*o, 2.0, dtype))(a, b, values, idx))
    assert dtype == jnp.float32 or "f32[37,29]" not in jaxpr  # no float32 copy of a bf16 W


def test_reference_matches_float64_numpy(rng):
    x, a, b, values, idx, dy = _operands(rng, 11, 23, 19, 4, 0.2, jnp.float32)
    w = np.asarray(a, np.float64) @ np.asarray(b, np.float64) * 0.3
    rows, cols = np.divmod(np.asarray(idx), 19)
    w[rows, cols] += np.asarray(values, np.float64)
    np.testing.assert_allclose(np.asarray(materialize_w(a, b, values, idx, 0.3), np.float64), w, rtol=1e-5, atol=1e-6)
    y = np.asarray(sl_matmul_reference(x, a, b, values, idx, 0.3), np.float64)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ w, rtol=1e-5, atol=1e-5)


def _numpy_ranks(idx: np.ndarray, k: int, n: int, bk: int, bn: int) -> dict[int, tuple[int, int]]:
    """Each entry's (tile, rank) by the definition: its row-major tile, then its place in row-major order
    within the tile."""
    nt = -(-n // bn)
    out, seen = {}, {}
    for v in sorted(int(i) for i in idx):
        r, c = divmod(v, n)
        t = (r // bk) * nt + c // bn
        out[v] = (t, seen.get(t, 0))
        seen[t] = seen.get(t, 0) + 1
    return out


@pytest.mark.parametrize("order", ["ascending", "shuffled"])
def test_tile_layout_places_every_entry_once(rng, order):
    k, n, bk, bn = 45, 70, 16, 32
    idx = np.sort(rng.choice(k * n, 400, replace=False)).astype(np.int32)
    if order == "shuffled":
        idx = rng.permutation(idx)
    lay = tile_layout(jnp.asarray(idx), k, n, Blocks(16, bk, bn, 128, 32, 16, 16))
    local, slot = np.asarray(lay.local), np.asarray(lay.slot)
    kt, nt = -(-k // bk), -(-n // bn)
    assert local.shape == (kt, nt, 4, 32) and int(lay.n_spill) == 0
    want = _numpy_ranks(idx, k, n, bk, bn)
    np.testing.assert_array_equal(slot, [want[int(v)][0] * 128 + want[int(v)][1] for v in idx])
    t, s = np.divmod(slot, 128)
    ti, tj = np.divmod(t, nt)
    lr, lc = np.divmod(local.reshape(kt, nt, 128)[ti, tj, s], bn)
    np.testing.assert_array_equal(ti * bk + lr, idx // n)
    np.testing.assert_array_equal(tj * bn + lc, idx % n)
    assert np.sum(local >= 0) == 400  # everything else is padding


@pytest.mark.parametrize("order", ["ascending", "shuffled"])
def test_tile_layout_spills_the_entries_past_their_tiles_slots(rng, order):
    k, n, bk, bn, p = 40, 40, 16, 16, 16
    idx = np.sort(rng.choice(k * n, 320, replace=False)).astype(np.int32)
    if order == "shuffled":
        idx = rng.permutation(idx)
    lay = tile_layout(jnp.asarray(idx), k, n, Blocks(16, bk, bn, p, 16, 16, 16))
    want = _numpy_ranks(idx, k, n, bk, bn)
    spilled = np.array([want[int(v)][1] >= p for v in idx])
    assert spilled.any()
    np.testing.assert_array_equal(np.asarray(lay.slot) == 9 * p, spilled)
    assert int(lay.n_spill) == spilled.sum()
    np.testing.assert_array_equal(np.asarray(lay.spill)[: spilled.sum()], np.nonzero(spilled)[0])
    kept = ~spilled
    np.testing.assert_array_equal(
        np.asarray(lay.slot)[kept], [want[int(v)][0] * p + want[int(v)][1] for v in idx[kept]]
    )


def test_an_ascending_support_is_laid_out_without_a_sort():
    """The stored support is ascending: the only sort in the layout sits in the ``cond`` branch that an
    ascending support never takes; the branch taken is the identity order."""
    blk = Blocks(16, 16, 16, 32, 16, 16, 16)
    idx = jnp.arange(0, 1600, 7, dtype=jnp.int32)
    jaxpr = jax.make_jaxpr(lambda i: tile_layout(i, 40, 40, blk))(idx)
    assert str(jaxpr).count(" sort[") == 1  # the one in the cond
    (cond,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    sorts = [" sort[" in str(br) for br in cond.params["branches"]]
    assert sorts == [True, False]  # branch 1 (ascending) sorts nothing


def test_choose_blocks_slot_bound():
    for target in (GPU, TPU):
        blk = choose_blocks(target, 4096, 2048, 5461, round(0.03 * 2048 * 5461), 512, 2, KernelConfig())
        mu = 0.03 * blk.bk * blk.bn
        assert blk.slots >= mu + 7 * math.sqrt(mu) and blk.slots % blk.chunk == 0
    tiny = choose_blocks(GPU, 5, 7, 9, 3, 2, 4, KernelConfig())  # whole matrix in one tile: P >= nnz, no spill possible
    assert tiny.slots >= 3 and (tiny.bm, tiny.bk, tiny.bn) == (16, 16, 16)


@pytest.mark.parametrize("lowrank", ["factored", "tile"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_kernels_write_every_output_block(rng, lowrank, structure):
    """Direct kernel calls with NaN-poisoned outputs: every block is overwritten; float64 reference."""
    cfg, target = _cfg(lowrank, structure), Target(structure, interpret=True)
    x, a, b, values, idx, dy = _operands(rng, 33, 40, 50, 6, 0.1, jnp.float32)
    blk = choose_blocks(target, 33, 40, 50, idx.shape[0], 6, 4, cfg)
    lay = tile_layout(idx, 40, 50, blk)
    w = np.asarray(a, np.float64) @ np.asarray(b, np.float64) * 0.9
    rows, cols = np.divmod(np.asarray(idx), 50)
    w[rows, cols] += np.asarray(values, np.float64)
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    y = forward_kernel(target, blk, x, a, b, values, lay, 0.9, cfg)
    dx = dx_kernel(target, blk, dy, a, b, values, lay, 0.9, cfg)
    dv = dvalues_kernel(target, blk, x, dy, lay, cfg)
    np.testing.assert_allclose(np.asarray(y), x64 @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), dy64 @ w.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dv), (x64.T @ dy64).reshape(-1)[np.asarray(idx)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "bad,arg",
    [
        (dict(a=np.ones((3,), np.float32)), "a"),
        (dict(b=np.ones((4, 5), np.float32)), "b"),
        (dict(x=np.ones((2, 9), np.float32)), "x"),
        (dict(idx=np.ones((6,), np.float32)), "idx"),
        (dict(values=np.ones((5,), np.float32)), "values"),
        (dict(scale=float("nan")), "scale"),
        (dict(scale=True), "scale"),
    ],
)
def test_operand_errors_name_the_argument(rng, bad, arg):
    ops = dict(
        x=rng.standard_normal((2, 8)).astype(np.float32),
        a=rng.standard_normal((8, 3)).astype(np.float32),
        b=rng.standard_normal((3, 5)).astype(np.float32),
        values=rng.standard_normal(6).astype(np.float32),
        idx=np.arange(6, dtype=np.int32),
        scale=1.0,
    )
    ops.update(bad)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        sl_matmul(**{k: (jnp.asarray(v) if k != "scale" else v) for k, v in ops.items()})


@pytest.mark.parametrize(
    "kw,arg",
    [
        (dict(block_m=24), "block_m"),
        (dict(block_k=8), "block_k"),
        (dict(block_n=True), "block_n"),
        (dict(slots=0), "slots"),
        (dict(lowrank="dense"), "lowrank"),
        (dict(interpret_as="cpu"), "interpret_as"),
    ],
)
def test_kernel_config_errors(kw, arg):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        KernelConfig(**kw)


BLOCK_CASES = [  # (m, k, n, rank, density): the 1B MLP, 7B MLP with 16k tokens, awkward and tiny shapes
    (2048, 2048, 5461, 512, 0.03),
    (2048, 5461, 2048, 512, 0.03),
    (16384, 4096, 11008, 1024, 0.05),
    (300, 1000, 333, 7, 0.1),
    (37, 45, 29, 5, 0.03),
    (1, 17, 3, 1, 0.3),
]


@pytest.mark.parametrize("m,k,n,r,density", BLOCK_CASES)
@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("request_", [KernelConfig(), KernelConfig(block_m=512, block_k=16, block_n=256)])
def test_blocks_follow_each_backends_rules(m, k, n, r, density, itemsize, request_):
    nnz = max(1, round(density * k * n))
    gpu = choose_blocks(GPU, m, k, n, nnz, r, itemsize, request_)
    assert all(is_pow2(v) and v >= 16 for v in (gpu.bm, gpu.bk, gpu.bn, gpu.chunk, gpu.rc)), gpu  # Triton shapes
    assert gpu.slots % gpu.chunk == 0 and gpu.rp % gpu.rc == 0 and gpu.rp >= r
    assert smem_bytes(gpu, itemsize) <= GPU_SMEM_BUDGET, gpu
    tpu = choose_blocks(TPU, m, k, n, nnz, r, itemsize, request_)
    assert tpu.bk % LANE == 0 and tpu.bn % LANE == 0 and tpu.chunk == LANE and tpu.rp % LANE == 0, tpu  # lane dims
    assert tpu.bm % sublane(itemsize) == 0 and tpu.rc == tpu.rp and tpu.rp >= r, tpu
    assert vmem_bytes(tpu, itemsize) <= TPU_VMEM_BUDGET, tpu
    if request_.block_m is None and m >= 2048:
        assert tpu.bm >= 512  # the sparse rebuild is amortised over large m-tiles on TPU


# --- the Mosaic GPU port, in Mosaic GPU's interpreter -----------------------------------------------


@pytest.mark.parametrize("m,k,n,r,density", [(5, 37, 100, 3, 0.1), (130, 70, 45, 6, 0.03)])
def test_mosaic_gpu_forward_and_vjp_match_reference(rng, m, k, n, r, density):
    """Row counts either side of the 64-row MMA tile, k and n that fill no 64 × 64 weight tile, through the API
    (batch dims, the recorded choice)."""
    from pallas_kernels import selection

    x, a, b, values, idx, dy = _operands(rng, m, k, n, r, density, jnp.bfloat16, batch=(2,))
    f = lambda *p: sl_matmul(*p, implementation="mosaic_gpu")
    got = jax.jit(lambda *o: _fwd_vjp(f, *o, 1.5))(x, a, b, values, idx, dy)
    _check(got, (x, a, b, values, idx, dy), 1.5, jnp.bfloat16)
    assert got[0].dtype == jnp.bfloat16 and got[0].shape == (2, m, n)
    chosen = [c for c in selection.implementation_record() if c["kernel"] == "sl_matmul"]
    assert ("mosaic_gpu", "requested") in {(c["implementation"], c["reason"]) for c in chosen}


def test_mosaic_gpu_equals_the_triton_kernels_on_one_tile(rng):
    """On one 64 × 64 weight tile both ports round each value to bfloat16 once and sum the same products:
    forward and every gradient agree bit for bit."""
    x, a, b, values, idx, dy = _operands(rng, 64, 64, 64, 4, 0.3, jnp.bfloat16)
    mosaic = lambda *p: sl_matmul(*p, implementation="mosaic_gpu")
    triton = lambda *p: sl_matmul(*p, implementation="pallas", interpret=True)
    got = jax.jit(lambda *o: _fwd_vjp(mosaic, *o, 0.7))(x, a, b, values, idx, dy)
    want = jax.jit(lambda *o: _fwd_vjp(triton, *o, 0.7))(x, a, b, values, idx, dy)
    for name, g, w in zip(("y", "dx", "da", "db", "dvalues"), got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=name)


def test_mosaic_gpu_spilled_entries_are_corrected_exactly(rng):
    x, a, b, values, idx, dy = _operands(rng, 20, 40, 40, 3, 0.2, jnp.bfloat16)  # 320 entries, one tile
    f = lambda *p: sl_matmul(*p, implementation="mosaic_gpu", slots=64)
    got = jax.jit(lambda *o: _fwd_vjp(f, *o, 0.8))(x, a, b, values, idx, dy)
    _check(got, (x, a, b, values, idx, dy), 0.8, jnp.bfloat16)


def test_mosaic_gpu_refuses_float32_activations(rng):
    x, a, b, values, idx, _ = _operands(rng, 4, 8, 8, 2, 0.2, jnp.float32)
    with pytest.raises(ValueError, match="'mosaic_gpu' cannot run sl_matmul.*bfloat16"):
        sl_matmul(x, a, b, values, idx, 1.0, implementation="mosaic_gpu")
