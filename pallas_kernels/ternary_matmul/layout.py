"""How the ternary kernel sees its operands: 2-bit weights, four per byte, planar; padding to blocks.

A ternary kernel ``W`` (K, N) with entries in {−1, 0, 1} (Flax orientation, ``y = x @ W``) is
stored as ``packed`` (Kq, N) uint8 with ``Kq = ceil(K / 4)``. Each weight is coded ``w + 1`` in
{0, 1, 2} (2 bits; code 3 is never written) and byte ``packed[r, n]`` holds the four weights of
rows ``r, r + Kq, r + 2·Kq, r + 3·Kq`` in bit pairs ``0–1, 2–3, 4–5, 6–7``:

    packed[r, n] = Σ_j (W[j·Kq + r, n] + 1) << 2j        (rows ≥ K are padding, coded 1 = weight 0)

The planar layout makes bit plane ``j`` of a block of packed rows multiply a *contiguous* slice of
the activations, ``x[:, j·Kq + r0 : j·Kq + r1]``, so a kernel unpacks with shifts and masks only and
never gathers strided columns. 2 bits/weight: 8× smaller than bfloat16, 16× smaller than float32.

:func:`pad_operands` lays the operands of one call out for the kernel
(:mod:`pallas_kernels.ternary_matmul.tiles`): activation planes padded to the block multiples, the
per-row scale as a column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.platforms import round_up
from pallas_kernels.ternary_matmul.blocks import TernaryBlocks


def packed_rows(k: int) -> int:
    """``Kq = ceil(K / 4)``: packed rows of a kernel with ``K`` input rows."""
    if k < 1:
        raise ValueError(f"k: must be a positive number of input rows, got {k}")
    return -(-k // 4)


def pack_ternary(w_KxN: jax.Array) -> jax.Array:
    """Pack a ternary ``(K, N)`` matrix (any real or integer dtype, values in {−1, 0, 1}) into ``(Kq, N)`` uint8.

    Values are not checked inside jit (call :func:`check_ternary` eagerly where needed); any value
    outside {−1, 0, 1} would be clipped into it.
    """
    if w_KxN.ndim != 2:
        raise ValueError(f"w_KxN: expected a 2-D (K, N) kernel, got shape {w_KxN.shape}")
    k, n = w_KxN.shape
    kq = packed_rows(k)
    codes = (jnp.clip(w_KxN, -1, 1).astype(jnp.int32) + 1).astype(jnp.uint8)
    codes = jnp.pad(codes, ((0, 4 * kq - k), (0, 0)), constant_values=1)  # padding rows hold weight 0
    planes = codes.reshape(4, kq, n)
    out = planes[0] | (planes[1] << 2) | (planes[2] << 4) | (planes[3] << 6)
    return out.astype(jnp.uint8)


def unpack_ternary(packed_KqxN: jax.Array, k: int) -> jax.Array:
    """Inverse of :func:`pack_ternary`: ``(K, N)`` int8 in {−1, 0, 1}."""
    if packed_KqxN.ndim != 2:
        raise ValueError(f"packed_KqxN: expected a 2-D (Kq, N) array, got shape {packed_KqxN.shape}")
    if packed_KqxN.dtype != jnp.uint8:
        raise ValueError(f"packed_KqxN: expected uint8, got {packed_KqxN.dtype}")
    kq, n = packed_KqxN.shape
    if packed_rows(k) != kq:
        raise ValueError(f"k: {k} input rows need {packed_rows(k)} packed rows, the array has {kq}")
    p = packed_KqxN.astype(jnp.int32)
    planes = jnp.stack([((p >> (2 * j)) & 3) - 1 for j in range(4)])  # (4, Kq, N)
    return planes.reshape(4 * kq, n)[:k].astype(jnp.int8)


def check_ternary(w: jax.Array, name: str = "w") -> None:
    """Eager check that ``w`` holds only −1, 0 and 1 (raises ValueError naming ``name``)."""
    bad = jnp.sum((w != -1) & (w != 0) & (w != 1))
    if int(bad):
        raise ValueError(f"{name}: {int(bad)} entries are not in {{-1, 0, 1}}")


def pad_operands(
    x_MxK: jax.Array, packed: jax.Array, rowscale_M: jax.Array, k: int, blk: TernaryBlocks
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pad to block multiples in the kernel's layout: ``(x (Mp, 4·Kqp), packed (Kqp, Np), rowscale (Mp, 1))``.

    Activation plane ``j`` (columns ``j·Kq … j·Kq + Kq`` after zero-padding ``K`` to ``4·Kq``) is
    moved to columns ``j·Kqp …``; padded packed bytes are 0x55 (four zero weights) and padded
    activations are 0, so padded outputs are exactly 0. Nothing is copied along an axis that needs no padding.
    """
    m = x_MxK.shape[0]
    kq, n = packed.shape
    mp, np_, kqp = round_up(m, blk.bm), round_up(n, blk.bn), round_up(kq, blk.bkq)
    xp = jnp.pad(x_MxK, ((0, 0), (0, 4 * kq - k))).reshape(m, 4, kq)
    xp = jnp.pad(xp, ((0, mp - m), (0, 0), (0, kqp - kq))).reshape(mp, 4 * kqp)
    wp = packed if (kqp, np_) == (kq, n) else jnp.pad(packed, ((0, kqp - kq), (0, np_ - n)), constant_values=0x55)
    sp = jnp.pad(rowscale_M.astype(jnp.float32), (0, mp - m)).reshape(mp, 1)
    return xp, wp, sp
