"""2-bit packing of ternary matrices: four weights per byte, planar along the input dimension.

A ternary kernel ``W`` (K, N) with entries in {−1, 0, 1} (Flax orientation, ``y = x @ W``) is
stored as ``packed`` (Kq, N) uint8 with ``Kq = ceil(K / 4)``. Each weight is coded ``w + 1`` in
{0, 1, 2} (2 bits; code 3 is never written) and byte ``packed[r, n]`` holds the four weights of
rows ``r, r + Kq, r + 2·Kq, r + 3·Kq`` in bit pairs ``0–1, 2–3, 4–5, 6–7``:

    packed[r, n] = Σ_j (W[j·Kq + r, n] + 1) << 2j        (rows ≥ K are padding, coded 1 = weight 0)

The planar layout makes bit plane ``j`` of a block of packed rows multiply a *contiguous* slice of
the activations, ``x[:, j·Kq + r0 : j·Kq + r1]``, so a kernel unpacks with shifts and masks only and
never gathers strided columns. 2 bits/weight: 8× smaller than bfloat16, 16× smaller than float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
