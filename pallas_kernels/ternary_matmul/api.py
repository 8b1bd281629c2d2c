"""Public entry point of the packed ternary matmul: ``implementation='auto' | 'xla' | 'pallas' | 'mosaic_gpu'``.

``ternary_matmul(x, packed, scale, k=K)`` computes ``scale · x̃ @ W`` (and ``· x_scale`` per row for
int8 activations) for a ternary kernel ``W (K, N)`` stored 4 weights per byte
(:func:`~pallas_kernels.ternary_matmul.layout.pack_ternary`). ``x`` may carry leading batch
dimensions ``(..., K)``; its dtype is bfloat16, float32 or int8 (then ``x_scale (...)`` is required).

``implementation='auto'`` (the default; ``None`` is the same) is the Pallas kernel on GPU and TPU
backends (:mod:`pallas_kernels.ternary_matmul.kernel`) — Triton on GPUs, Mosaic on TPUs, chosen when
the computation is lowered (:mod:`pallas_kernels.platforms`) — and the XLA path on CPU
(:mod:`pallas_kernels.ternary_matmul.xla`), where Pallas only interprets
(``implementation='pallas'`` there runs the interpreter, for tests). ``implementation='mosaic_gpu'`` is the
Pallas Mosaic GPU kernel for Hopper (:mod:`pallas_kernels.ternary_matmul.mosaic_gpu`; bfloat16 or int8
activations), run only when named: until a device measurement compares it with the Triton kernel, ``'auto'``
keeps Triton. Each decision is recorded
(:mod:`pallas_kernels.selection`). The VJP with respect to floating ``x`` is
``dx = rowscale ⊙ (dy @ Wᵀ)`` (XLA bfloat16 GEMMs against the exactly unpacked weights, float32
accumulation: :func:`~pallas_kernels.ternary_matmul.xla.x_grad`, for both implementations); ``packed``,
``scale`` and ``x_scale`` are treated as constants (inference weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.selection import IMPLEMENTATIONS, choose, current_backend, signature
from pallas_kernels.ternary_matmul.blocks import TernaryBlocks, choose_blocks
from pallas_kernels.ternary_matmul.kernel import ternary_matmul_pallas
from pallas_kernels.ternary_matmul.layout import packed_rows, pad_operands
from pallas_kernels.ternary_matmul.mosaic_gpu import ternary_matmul_mosaic_gpu, unsupported
from pallas_kernels.ternary_matmul.xla import ternary_matmul_xla, x_grad

# the op, and what a caller drives the kernel with: block choice and the padded layout
__all__ = ["IMPLEMENTATIONS", "TernaryBlocks", "choose_blocks", "pad_operands", "ternary_matmul"]


def _matmul(x_MxK, packed, rowscale_M, k, impl, out_dtype, blocks, interpret):
    if impl == "xla":
        return ternary_matmul_xla(x_MxK, packed, rowscale_M, k, out_dtype)
    if impl == "mosaic_gpu":
        return ternary_matmul_mosaic_gpu(x_MxK, packed, rowscale_M, k, out_dtype, interpret)
    return ternary_matmul_pallas(x_MxK, packed, rowscale_M, k, out_dtype, blocks, interpret)


_matmul_float = jax.custom_vjp(_matmul, nondiff_argnums=(3, 4, 5, 6, 7))  # floating x: the VJP below


def _fwd(x_MxK, packed, rowscale_M, k, impl, out_dtype, blocks, interpret):
    y = _matmul_float(x_MxK, packed, rowscale_M, k, impl, out_dtype, blocks, interpret)
    return y, (packed, rowscale_M, jnp.zeros((0,), x_MxK.dtype))  # last: x's dtype only


def _bwd(k, impl, out_dtype, blocks, interpret, res, dy_MxN):
    packed, rowscale_M, x_like = res
    dx = x_grad(dy_MxN, packed, rowscale_M, k, x_like.dtype)
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
      packed_KqxN: ``(ceil(k/4), N)`` uint8 from :func:`~pallas_kernels.ternary_matmul.layout.pack_ternary`.
      scale: per-tensor weight scale (scalar).
      k: number of input rows of ``W`` (not recoverable from the packed shape when ``k % 4 != 0``).
      x_scale: ``(...)`` per-row dequantisation factor; required for int8 ``x``, optional otherwise.
      implementation: ``'xla'``, ``'pallas'``, ``'mosaic_gpu'`` or ``'auto'`` / ``None`` (Pallas on GPU and
        TPU, else XLA).
      blocks: ``(bm, bn, bkq)`` requested Pallas tiles, legalised per backend (default :func:`choose_blocks`),
        optionally a fourth entry: the split-K factor on GPUs (it must divide the packed-row steps). Not for
        ``'mosaic_gpu'``, whose tiles are fixed by the warpgroup MMA.
      interpret: run the Pallas kernel interpreted on every platform (CPU always interprets). For
        ``'mosaic_gpu'`` it is decided when the call is traced: ``None`` interprets when the default backend
        is the CPU; ``False`` on a CPU machine gives the kernel itself, to lower for ``cuda``.
    """
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
    if blocks is not None and (len(blocks) not in (3, 4) or any(b < 1 for b in blocks)):
        raise ValueError(f"blocks: expected positive (bm, bn, bkq) tile sizes [+ GPU split-K], got {blocks!r}")
    # every operand the checks above accept is supported by the Pallas kernel on every platform (Mosaic GPU: not f32)
    explicit = {"mosaic_gpu": unsupported(x.dtype)}
    impl = choose("ternary_matmul", implementation, signature(x=x, packed=packed_KqxN), None, explicit=explicit)
    if impl == "mosaic_gpu" and blocks is not None:
        raise ValueError("blocks: the 'mosaic_gpu' kernel's tiles are fixed by the warpgroup MMA")
    interpret = current_backend() == "cpu" if interpret is None and impl == "mosaic_gpu" else bool(interpret)
    lead = x.shape[:-1]
    m = int(np.prod(lead)) if lead else 1
    x2 = x.reshape(m, k)
    rowscale = jnp.broadcast_to(jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32)), (m,))
    if x_scale is not None:
        rowscale = rowscale * jax.lax.stop_gradient(x_scale.reshape(m).astype(jnp.float32))
    blocks = tuple(blocks) if blocks is not None else None
    if x.dtype == jnp.int8:  # integer input: nothing to differentiate
        y = _matmul(x2, packed_KqxN, rowscale, k, impl, out_dtype, blocks, interpret)
    else:
        y = _matmul_float(x2, packed_KqxN, rowscale, k, impl, out_dtype, blocks, interpret)
    return y.reshape(*lead, packed_KqxN.shape[1])
