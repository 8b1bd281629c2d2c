"""Public entry point of the packed ternary matmul: ``implementation='auto' | 'xla' | 'pallas'``.

``ternary_matmul(x, packed, scale, k=K)`` computes ``scale · x̃ @ W`` (and ``· x_scale`` per row for
int8 activations) for a ternary kernel ``W (K, N)`` stored 4 weights per byte
(:func:`~pallas_kernels.ternary_matmul.packing.pack_ternary`). ``x`` may carry leading batch
dimensions ``(..., K)``; its dtype is bfloat16, float32 or int8 (then ``x_scale (...)`` is required).

``implementation='auto'`` (the default; ``None`` is accepted as the same) picks the Pallas kernel on
GPU and the XLA reference elsewhere (on CPU the Pallas kernel only runs interpreted, for tests: ``interpret=True``).
The VJP with respect to floating ``x`` is ``dx = (dy ⊙ rowscale) @ Wᵀ`` (XLA, from the unpacked
weights); ``packed``, ``scale`` and ``x_scale`` are treated as constants (inference weights).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ternary_matmul.kernel import ternary_matmul_pallas_padded
from pallas_kernels.ternary_matmul.packing import packed_rows, unpack_ternary
from pallas_kernels.ternary_matmul.reference import ternary_matmul_reference

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def default_blocks(m: int, kq: int, n: int) -> tuple[int, int, int]:
    """``(bm, bn, bkq)``: powers of two ≥ 16 (the GPU dot's minimum), capped at (64, 128, 64)."""
    return min(64, _pow2_at_least(m, 16)), min(128, _pow2_at_least(n, 16)), min(64, _pow2_at_least(kq, 16))


def _resolve(implementation: str | None) -> str:
    if implementation is None or implementation == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def _round_up(n: int, b: int) -> int:
    return -(-n // b) * b


def pad_operands(x_MxK, packed, rowscale_M, k, blocks=None):
    """Pad to block multiples in the kernel's layout: ``(x (Mp, 4·Kqp), packed (Kqp, Np), rowscale (Mp,), blocks)``.

    Activation plane ``j`` (columns ``j·Kq … j·Kq + Kq`` after zero-padding ``K`` to ``4·Kq``) is
    moved to columns ``j·Kqp …``; padded packed bytes are 0x55 (four zero weights) and padded
    activations are 0, so padded outputs are exactly 0.
    """
    m = x_MxK.shape[0]
    kq, n = packed.shape
    bm, bn, bkq = blocks or default_blocks(m, kq, n)
    mp, np_, kqp = _round_up(m, bm), _round_up(n, bn), _round_up(kq, bkq)
    xp = jnp.pad(x_MxK, ((0, 0), (0, 4 * kq - k))).reshape(m, 4, kq)
    xp = jnp.pad(xp, ((0, mp - m), (0, 0), (0, kqp - kq))).reshape(mp, 4 * kqp)
    wp = jnp.pad(packed, ((0, kqp - kq), (0, np_ - n)), constant_values=0x55)
    sp = jnp.pad(rowscale_M.astype(jnp.float32), (0, mp - m))
    return xp, wp, sp, (bm, bn, bkq)


def _pallas_2d(x_MxK, packed, rowscale_M, k, out_dtype, blocks, interpret):
    m, n = x_MxK.shape[0], packed.shape[1]
    xp, wp, sp, (bm, bn, bkq) = pad_operands(x_MxK, packed, rowscale_M, k, blocks)
    y = ternary_matmul_pallas_padded(xp, wp, sp, bm=bm, bn=bn, bkq=bkq, out_dtype=out_dtype, interpret=interpret)
    return y[:m, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _matmul_float(x_MxK, packed, rowscale_M, k, impl, out_dtype, blocks, interpret):
    if impl == "xla":
        return ternary_matmul_reference(x_MxK, packed, 1.0, k, rowscale_M, out_dtype)
    return _pallas_2d(x_MxK, packed, rowscale_M, k, out_dtype, blocks, interpret)


def _fwd(x_MxK, packed, rowscale_M, k, impl, out_dtype, blocks, interpret):
    y = _matmul_float(x_MxK, packed, rowscale_M, k, impl, out_dtype, blocks, interpret)
    return y, (packed, rowscale_M, jnp.zeros((0,), x_MxK.dtype))  # last: x's dtype only


def _bwd(k, impl, out_dtype, blocks, interpret, res, dy_MxN):
    packed, rowscale_M, x_like = res
    w = unpack_ternary(packed, k).astype(jnp.float32)
    g = dy_MxN.astype(jnp.float32) * rowscale_M.astype(jnp.float32)[:, None]
    dx = jnp.matmul(g, w.T, precision=jax.lax.Precision.HIGHEST).astype(x_like.dtype)
    return dx, np.zeros(packed.shape, jax.dtypes.float0), jnp.zeros_like(rowscale_M)


_matmul_float.defvjp(_fwd, _bwd)


def ternary_matmul(
    x: jax.Array,
    packed_KqxN: jax.Array,
    scale: jax.Array | float,
    *,
    k: int,
    x_scale: jax.Array | None = None,
    out_dtype: jnp.dtype = jnp.float32,
    implementation: str | None = "auto",
    blocks: tuple[int, int, int] | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``y = scale · x_scale ⊙ (x @ W)`` with ``W = unpack(packed_KqxN) (k, N)`` ternary.

    Args:
      x: ``(..., k)`` bfloat16 / float32 activations, or int8 quantised activations.
      packed_KqxN: ``(ceil(k/4), N)`` uint8 from :func:`pack_ternary`.
      scale: per-tensor weight scale (scalar).
      k: number of input rows of ``W`` (not recoverable from the packed shape when ``k % 4 != 0``).
      x_scale: ``(...)`` per-row dequantisation factor; required for int8 ``x``, optional otherwise.
      implementation: ``'xla'``, ``'pallas'`` or ``None`` (Pallas on GPU, else XLA).
      blocks: ``(bm, bn, bkq)`` Pallas tile sizes (default :func:`default_blocks`).
      interpret: run the Pallas kernel interpreted (default: when not on GPU).
    """
    impl = _resolve(implementation)
    if packed_KqxN.ndim != 2 or packed_KqxN.dtype != jnp.uint8:
        raise ValueError(f"packed_KqxN: expected a 2-D uint8 array, got {packed_KqxN.dtype} {packed_KqxN.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or packed_rows(k) != packed_KqxN.shape[0]:
        raise ValueError(f"k: {k!r} does not match packed rows {packed_KqxN.shape[0]} (need ceil(k/4))")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x: last dimension must be k={k}, got shape {x.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float32, jnp.int8):
        raise ValueError(f"x: dtype must be bfloat16, float32 or int8, got {x.dtype}")
    if x.dtype == jnp.int8 and x_scale is None:
        raise ValueError("x_scale: int8 activations need their per-row dequantisation scale")
    if x_scale is not None and x_scale.shape != x.shape[:-1]:
        raise ValueError(f"x_scale: expected shape {x.shape[:-1]}, got {x_scale.shape}")
    if blocks is not None and (len(blocks) != 3 or any(b < 1 for b in blocks)):
        raise ValueError(f"blocks: expected three positive tile sizes (bm, bn, bkq), got {blocks!r}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    lead = x.shape[:-1]
    m = int(np.prod(lead)) if lead else 1
    x2 = x.reshape(m, k)
    rowscale = jnp.broadcast_to(jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32)), (m,))
    if x_scale is not None:
        rowscale = rowscale * jax.lax.stop_gradient(x_scale.reshape(m).astype(jnp.float32))
    blocks = tuple(blocks) if blocks is not None else None
    if x.dtype == jnp.int8:  # integer input: nothing to differentiate
        if impl == "xla":
            y = ternary_matmul_reference(x2, packed_KqxN, 1.0, k, rowscale, out_dtype)
        else:
            y = _pallas_2d(x2, packed_KqxN, rowscale, k, out_dtype, blocks, interpret)
    else:
        y = _matmul_float(x2, packed_KqxN, rowscale, k, impl, out_dtype, blocks, interpret)
    return y.reshape(*lead, packed_KqxN.shape[1])
