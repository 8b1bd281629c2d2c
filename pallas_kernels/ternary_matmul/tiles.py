"""The packed ternary Pallas kernel: what each program computes on its tile, and the ``pallas_call``.

2-bit weights are unpacked on chip with float32 accumulation (ternary weights as in BitNet b1.58:
Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", arXiv 2402.17764).

Each program owns one ``(bm, bn)`` output tile and reduces over the packed rows in chunks of ``bkq``.
A chunk of packed bytes ``(bkq, bn)`` uint8 is loaded once and split with shifts and masks into its
four bit planes ``P_j = ((p >> 2j) & 3) − 1`` ∈ {−1, 0, 1}; plane ``j`` multiplies the activation
columns ``j·Kq + k0 … j·Kq + k0 + bkq`` (the planar layout of
:mod:`pallas_kernels.ternary_matmul.layout`). The activations are passed four times, once per plane,
so each plane's tile is a plain 2-D block. Weights travel from memory at 2 bits each, 8× less traffic
than bf16 — the point for memory-bound GEMV (one token) decoding.

Products are exact. bf16 inputs multiply bf16 weights with float32 accumulation, exact while
``K·128 < 2²⁴``; float32 inputs multiply in float32 at HIGHEST precision. int8 inputs: on GPU an int8 ×
int8 → int32 product of the activations and the *codes* ``c = w + 1`` ∈ {0, 1, 2}, minus each row's sum
of activations (``x @ W = x @ C − rowsum(x)``: integers throughout, so the decode needs no subtraction);
on TPU bf16 (|x| ≤ 128 fits bf16's 8-bit significand exactly; TPU v7 has no int8 matmul). The per-row
scale ``rowscale = scale · x_scale`` is applied once to the accumulator. Decoding a plane
(:mod:`pallas_kernels.ternary_matmul.decode`) widens the bytes to int32 for Mosaic TPU (32-bit shifts
and masks, integer-to-float casts from signed types only) and is inline PTX, four weights per
instance, in the Triton kernel for CUDA.

Two structures (:mod:`pallas_kernels.platforms`): GPU (Triton, grid ``(M/bm, N/bn)``, a ``fori_loop``
over the packed rows) and TPU (Mosaic, grid ``(M/bm, N/bn, Kq/bkq)`` with the reduction last and a
float32 VMEM accumulator). Block sizes: :func:`pallas_kernels.ternary_matmul.blocks.choose_blocks`.
Triton rather than Mosaic GPU for this kernel in particular: a decoding GEMV has one row, and Triton
takes 16-row dot tiles where Mosaic GPU's warpgroup MMA works on 64-row ones; Mosaic GPU also copies
each whole BlockSpec block into shared memory (the 4096×11008 GEMV's blocks needed 271 KB, over the
227 KB an H100 has), while Triton streams ``bkq`` packed rows per loop iteration.

Shapes must already be padded to block multiples
(:func:`~pallas_kernels.ternary_matmul.layout.pad_operands` does it): ``x (Mp, 4·Kqp)``,
``packed (Kqp, Np)``, ``rowscale (Mp, 1)`` (2-D, so its block is legal on TPU at any ``bm``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.platforms import Target, compiler_params
from pallas_kernels.ternary_matmul.decode import plane


def _kernel(*refs, target: Target, n_red: int, bkq: int, splits: int, integer: bool, aliased: bool):
    """One output tile. ``refs``: x planes ×4, packed, rowscale, [row sums of x (``integer``)],
    [the aliased ``out_init`` (``aliased``), unread], the output, [the TPU accumulator]."""
    x_refs, w_ref, s_ref = refs[:4], refs[4], refs[5]
    xsum_ref = refs[6] if integer else None
    o_ref, scratch = refs[6 + integer + aliased], refs[7 + integer + aliased :]
    if integer:  # int8 × int8 codes → int32, exact; rowsum(x) subtracted at the end
        cd, acc_dtype, precision = jnp.int8, jnp.int32, None
    else:
        cd = jnp.float32 if x_refs[0].dtype == jnp.float32 else jnp.bfloat16
        acc_dtype, precision = jnp.float32, jax.lax.Precision.HIGHEST if cd == jnp.float32 else None

    def step(kb, acc):  # each plane's product accumulates into acc (one MMA chain, no separate adds)
        ks = slice(None) if target.tpu else pl.ds(pl.multiple_of(kb * bkq, bkq), bkq)
        p = w_ref[ks, :]  # (bkq, bn) uint8
        for j, x_ref in enumerate(x_refs):
            w = plane(p, j, cd, codes=integer, ptx=target.ptx)
            acc = acc + jnp.dot(x_ref[:, ks].astype(cd), w, precision=precision, preferred_element_type=acc_dtype)
        return acc

    def finish(acc):
        if integer:  # each split subtracts the row sums of its own packed rows: its partial is exact
            acc = (acc - xsum_ref[...]).astype(jnp.float32)
        o_ref[...] = (acc * s_ref[...]).astype(o_ref.dtype)

    if not target.tpu:  # split-K: program (i, j, s) reduces packed-row steps s·n/splits … (s+1)·n/splits
        per = n_red // splits
        base = pl.program_id(2) * per if splits > 1 else 0
        acc = jax.lax.fori_loop(0, per, lambda kb, acc: step(base + kb, acc), jnp.zeros(o_ref.shape, acc_dtype))
        finish(acc)
        return
    (acc_ref,) = scratch
    kb = pl.program_id(2)

    @pl.when(kb == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] = step(kb, acc_ref[...])

    @pl.when(kb == n_red - 1)
    def _():
        finish(acc_ref[...])


def ternary_matmul_pallas_padded(
    x_MpxK4: jax.Array,
    packed_KqpxNp: jax.Array,
    rowscale_Mpx1: jax.Array,
    *,
    bm: int,
    bn: int,
    bkq: int,
    out_dtype: jnp.dtype,
    target: Target,
    out_init: jax.Array | None = None,
    num_warps: int = 4,
    splits: int = 1,
) -> jax.Array:
    """The raw ``pallas_call`` on block-multiple shapes for ``target`` (no padding, no checks beyond divisibility).

    ``splits`` (GPU only): split-K — the packed rows are divided among ``splits`` programs per output
    tile (a third grid axis), each writing a float32 partial ``(splits, Mp, Np)`` that the caller sums,
    so a one-token GEMV has ``splits`` × as many programs to spread over the SMs.
    ``out_init``: a buffer of the output's shape aliased as the output (tests pass one filled with NaN to
    prove every tile is written).
    int8 ``x`` on GPU: the kernel multiplies the activations by the int8 *codes* ``c = w + 1`` with int32
    accumulation and subtracts each row's sum (``x @ W = x @ C − rowsum(x)``, exact), so decoding needs
    no subtraction (:mod:`pallas_kernels.ternary_matmul.decode`). The sums are an extra ``(Mp, splits)``
    int32 operand, one column per split over that split's packed rows, so every split's partial is exact.
    """
    mp, k4 = x_MpxK4.shape
    kqp, np_ = packed_KqpxNp.shape
    if k4 != 4 * kqp or mp % bm or np_ % bn or kqp % bkq or rowscale_Mpx1.shape != (mp, 1):
        raise ValueError(
            f"shapes: x {x_MpxK4.shape}, packed {packed_KqpxNp.shape}, rowscale {rowscale_Mpx1.shape} are not"
            f" padded to blocks ({bm}, {bn}, {bkq})"
        )
    n_red, tpu = kqp // bkq, target.tpu
    if splits < 1 or n_red % splits or (tpu and splits > 1):
        raise ValueError(f"splits: {splits} must divide the {n_red} reduction steps (and be 1 on TPU)")
    integer = x_MpxK4.dtype == jnp.int8 and not tpu
    kernel = functools.partial(
        _kernel, target=target, n_red=n_red, bkq=bkq, splits=splits, integer=integer, aliased=out_init is not None
    )
    if tpu:
        grid = (mp // bm, np_ // bn, n_red)
        x_specs = [pl.BlockSpec((bm, bkq), lambda i, j, kb, p=p: (i, p * n_red + kb)) for p in range(4)]
        w_spec = pl.BlockSpec((bkq, bn), lambda i, j, kb: (kb, j))
        s_spec = pl.BlockSpec((bm, 1), lambda i, j, kb: (i, 0))
        o_spec = pl.BlockSpec((bm, bn), lambda i, j, kb: (i, j))
    elif splits == 1:  # plane p of the activations is block p of width Kqp; the loop slices it
        grid = (mp // bm, np_ // bn)
        x_specs = [pl.BlockSpec((bm, kqp), lambda i, j, p=p: (i, p)) for p in range(4)]
        w_spec = pl.BlockSpec((kqp, bn), lambda i, j: (0, j))
        s_spec = pl.BlockSpec((bm, 1), lambda i, j: (i, 0))
        o_spec = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
    else:  # the same blocks, a third axis over the splits and one float32 partial per split
        grid = (mp // bm, np_ // bn, splits)
        x_specs = [pl.BlockSpec((bm, kqp), lambda i, j, s, p=p: (i, p)) for p in range(4)]
        w_spec = pl.BlockSpec((kqp, bn), lambda i, j, s: (0, j))
        s_spec = pl.BlockSpec((bm, 1), lambda i, j, s: (i, 0))
        o_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    out_shape = jax.ShapeDtypeStruct((mp, np_) if splits == 1 else (splits, mp, np_), out_dtype)
    args = [x_MpxK4] * 4 + [packed_KqpxNp, rowscale_Mpx1.astype(jnp.float32)]
    in_specs = [*x_specs, w_spec, s_spec]
    if integer:  # row sums of x per split: columns j·Kqp + r of split s have r in its range of packed rows
        args.append(x_MpxK4.astype(jnp.int32).reshape(mp, 4, splits, kqp // splits).sum(axis=(1, 3)))
        in_specs.append(s_spec if splits == 1 else pl.BlockSpec((bm, 1), lambda i, j, s: (i, s)))
    aliases = {}
    if out_init is not None:
        if out_init.shape != out_shape.shape or out_init.dtype != out_dtype:
            raise ValueError(f"out_init: expected {out_shape.shape} {out_dtype}, got {out_init.shape} {out_init.dtype}")
        aliases = {len(args): 0}
        args.append(out_init)
        in_specs.append(o_spec)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=o_spec,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)] if tpu else [],
        input_output_aliases=aliases,
        compiler_params=compiler_params(
            target, semantics=("parallel", "parallel", "arbitrary"), num_warps=num_warps, num_stages=3
        ),
        interpret=target.interpret,
        name="ternary_matmul",
    )(*args)
