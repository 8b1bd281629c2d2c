"""Pallas kernel of the packed ternary matmul: 2-bit weights unpacked on chip, fp32 accumulation.

Grid ``(M / bm, N / bn)``; each program owns one ``(bm, bn)`` output tile and loops over the
packed rows in chunks of ``bkq``. A chunk of packed bytes ``(bkq, bn)`` uint8 is loaded once and
split with shifts and masks into its four bit planes ``P_j = ((p >> 2j) & 3) − 1`` ∈ {−1, 0, 1};
plane ``j`` multiplies the contiguous activation slice ``x[:, j·Kq + k0 : j·Kq + k0 + bkq]`` (see
:mod:`pallas_kernels.ternary_matmul.packing` for the planar layout). Weights travel from memory at
2 bits each, 8× less traffic than bf16 — the point for memory-bound GEMV (one token) decoding.

Products are exact in the compute dtype: bf16 for bf16 inputs, and also for int8 inputs (|x| ≤ 128
fits bf16's 8-bit significand exactly) with float32 accumulation, exact while ``K·128 < 2²⁴``; float32
inputs multiply in float32. The per-row scale ``rowscale = scale · x_scale`` is applied once to the
accumulator. The reduction is a loop inside the program (not a grid axis), so programs are
independent as the GPU (Triton) lowering requires; on CPU the kernel runs with ``interpret=True``.

Shapes must already be padded to block multiples (``api.py`` does it): ``x (Mp, 4·Kqp)``,
``packed (Kqp, Np)``, ``rowscale (Mp,)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _kernel(x_ref, w_ref, s_ref, o_ref, *, kqp: int, bkq: int, compute_dtype):
    bm, bn = o_ref.shape

    def body(kb, acc):
        p = w_ref[pl.ds(kb * bkq, bkq), :].astype(jnp.int32)  # (bkq, bn)
        for j in range(4):
            plane = (((p >> (2 * j)) & 3) - 1).astype(compute_dtype)
            xj = x_ref[:, pl.ds(j * kqp + kb * bkq, bkq)].astype(compute_dtype)
            acc = acc + jnp.dot(xj, plane, preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, kqp // bkq, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = (acc * s_ref[...][:, None]).astype(o_ref.dtype)


def _aliased_kernel(kernel, x_ref, w_ref, s_ref, _init_ref, o_ref):
    kernel(x_ref, w_ref, s_ref, o_ref)


def ternary_matmul_pallas_padded(
    x_MpxK4: jax.Array,
    packed_KqpxNp: jax.Array,
    rowscale_Mp: jax.Array,
    *,
    bm: int,
    bn: int,
    bkq: int,
    out_dtype: jnp.dtype,
    interpret: bool,
    out_init: jax.Array | None = None,
) -> jax.Array:
    """The raw ``pallas_call`` on block-multiple shapes (no padding, no checks beyond divisibility).

    ``out_init``: an ``(Mp, Np)`` buffer aliased as the output (tests pass one filled with NaN to
    prove every tile is written).
    """
    mp, k4 = x_MpxK4.shape
    kqp, np_ = packed_KqpxNp.shape
    if k4 != 4 * kqp or mp % bm or np_ % bn or kqp % bkq:
        raise ValueError(
            f"shapes: x {x_MpxK4.shape}, packed {packed_KqpxNp.shape} are not padded to blocks ({bm}, {bn}, {bkq})"
        )
    compute_dtype = jnp.float32 if x_MpxK4.dtype == jnp.float32 else jnp.bfloat16
    kernel = functools.partial(_kernel, kqp=kqp, bkq=bkq, compute_dtype=compute_dtype)
    args = [x_MpxK4, packed_KqpxNp, rowscale_Mp]
    in_specs = [
        pl.BlockSpec((bm, k4), lambda i, j: (i, 0)),
        pl.BlockSpec((kqp, bn), lambda i, j: (0, j)),
        pl.BlockSpec((bm,), lambda i, j: (i,)),
    ]
    aliases = {}
    if out_init is not None:
        if out_init.shape != (mp, np_) or out_init.dtype != out_dtype:
            raise ValueError(f"out_init: expected {(mp, np_)} {out_dtype}, got {out_init.shape} {out_init.dtype}")
        kernel = functools.partial(_aliased_kernel, kernel)
        args.append(out_init)
        in_specs.append(pl.BlockSpec((bm, bn), lambda i, j: (i, j)))
        aliases = {3: 0}
    return pl.pallas_call(
        kernel,
        grid=(mp // bm, np_ // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        input_output_aliases=aliases,
        interpret=interpret,
    )(*args)
