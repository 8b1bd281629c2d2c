"""Public entry point: ``sl_matmul(x, a, b, values, idx, scale, implementation=...)``.

``y = x @ (A B · s + S)`` for ``x (..., in)``, ``A (in, r)``, ``B (r, out)``, sparse ``S`` given by
``values (nnz,)`` at distinct flat row-major indices ``idx (nnz,)`` (int32) into ``(in, out)``;
SLTrain (Han et al., NeurIPS 2024, arXiv 2406.02214). Differentiable in ``x, a, b, values``
(``idx`` is integer and gets no gradient). Output dtype = ``x.dtype``; W is assembled in float32
and cast to ``x.dtype`` for the matmul, accumulated in float32.

``implementation``:

* ``'xla'`` — materialise W, matmul; the paper's backward with W recomputed
  (:mod:`pallas_kernels.sl_matmul.xla`).
* ``'pallas'`` — the fused kernels (:mod:`pallas_kernels.sl_matmul.kernel`, tile programs in
  :mod:`pallas_kernels.sl_matmul.tiles`): W tiles built on chip in both passes, dvalues by a sampled
  dense-dense kernel; Triton on GPUs, Mosaic on TPUs, chosen when the computation is lowered
  (:mod:`pallas_kernels.platforms`); interpreted on CPU.
* ``'auto'`` (the default; ``None`` is the same) — ``'pallas'`` on TPU backends whenever the kernels
  take the operands (:func:`unsupported`: ``x`` must be bfloat16 or float32); on GPUs W materialised in
  ``x``'s dtype and one cuBLAS GEMM (:func:`~pallas_kernels.sl_matmul.xla.sl_matmul_bf16w`, the official
  code's path), which the compiled kernels' SASS predicts faster (:data:`GPU_AUTO`) until a device
  measurement says otherwise; ``'xla'`` on CPU. Each decision is recorded and an accelerator's XLA
  path is announced once on stderr (:mod:`pallas_kernels.selection`).
* ``'mosaic_gpu'`` — only when named: the sparse products on Pallas Mosaic GPU kernels for Hopper
  (:mod:`pallas_kernels.sl_matmul.mosaic_gpu`; bfloat16 ``x``), the low-rank products in XLA and dvalues on
  the Triton kernel. ``interpret`` is decided when the call is traced: ``None`` interprets when the default
  backend is the CPU; ``False`` on a CPU machine gives the kernels themselves, to lower for ``cuda``.
"""

from __future__ import annotations

import math
from numbers import Real

import jax
import jax.numpy as jnp

from pallas_kernels import selection
from pallas_kernels.selection import IMPLEMENTATIONS, check_implementation, choose, signature
from pallas_kernels.sl_matmul import mosaic_gpu
from pallas_kernels.sl_matmul.kernel import KernelConfig, sl_matmul_pallas
from pallas_kernels.sl_matmul.xla import sl_matmul_bf16w, sl_matmul_xla

__all__ = ["IMPLEMENTATIONS", "check_operands", "sl_matmul", "unsupported"]
KERNEL_DTYPES = (jnp.bfloat16, jnp.float32)
GPU_AUTO = (
    "W materialised in x's dtype + one GEMM (sl_matmul_bf16w): the fused kernels are issue-bound in their"
    " sm_90a SASS (experiments/results/sass), slower than that path until a device measurement says otherwise"
)
GPU_BACKENDS = ("gpu", "cuda", "rocm")


def check_operands(x, a, b, values, idx, scale) -> None:
    """Shape / dtype validation; every error names the offending argument."""
    if a.ndim != 2:
        raise ValueError(f"a: must be (in, rank), got shape {a.shape}")
    if b.ndim != 2 or b.shape[0] != a.shape[1]:
        raise ValueError(f"b: must be (rank={a.shape[1]}, out), got shape {b.shape}")
    if x.ndim < 1 or x.shape[-1] != a.shape[0]:
        raise ValueError(f"x: last dimension must be in={a.shape[0]}, got shape {x.shape}")
    if idx.ndim != 1 or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"idx: must be a 1-d integer array of flat indices, got {idx.dtype}{list(idx.shape)}")
    if values.shape != idx.shape:
        raise ValueError(f"values: shape {values.shape} must equal idx's {idx.shape}")
    if a.shape[0] * b.shape[1] >= 2**31:
        raise ValueError(f"a: in*out = {a.shape[0] * b.shape[1]} does not fit int32 flat indices")
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise ValueError(f"scale: must be a finite real number, got {scale!r}")


def unsupported(x: jax.Array) -> str | None:
    """Why the Pallas kernels cannot take these operands (None: they can). The same on every platform."""
    if jnp.dtype(x.dtype) not in KERNEL_DTYPES:
        return f"x is {jnp.dtype(x.dtype).name}; the kernels compute in bfloat16 or float32"
    return None


def sl_matmul(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    values: jax.Array,
    idx: jax.Array,
    scale: float,
    *,
    implementation: str | None = "auto",
    block_m: int | None = None,
    block_k: int | None = None,
    block_n: int | None = None,
    slots: int | None = None,
    lowrank: str = "factored",
    interpret: bool | None = None,
    interpret_as: str = "gpu",
) -> jax.Array:
    """``y = x @ (A B · scale + S)``; see the module docstring. Block sizes (None: per backend and shape),
    lowrank and interpret_as: pallas only (:class:`~pallas_kernels.sl_matmul.kernel.KernelConfig`); slots
    and interpret: pallas and mosaic_gpu."""
    check_operands(x, a, b, values, idx, scale)
    cfg = KernelConfig(
        block_m=block_m,
        block_k=block_k,
        block_n=block_n,
        slots=slots,
        lowrank=lowrank,
        interpret=bool(interpret),
        interpret_as=interpret_as,
    )
    backend = selection.current_backend()
    prefer = dict.fromkeys(GPU_BACKENDS, GPU_AUTO)
    why_not = unsupported(x)
    explicit = {"mosaic_gpu": mosaic_gpu.unsupported(x.dtype)}
    sig = signature(x=x, a=a, b=b, values=values)
    impl = choose("sl_matmul", implementation, sig, why_not, backend, prefer, explicit=explicit)
    if impl == "mosaic_gpu":
        interpret = backend == "cpu" if interpret is None else interpret
        return mosaic_gpu.sl_matmul_mosaic_gpu(x, a, b, values, idx, float(scale), interpret, slots)
    if impl == "xla" and backend in GPU_BACKENDS and check_implementation(implementation) == "auto" and not why_not:
        return sl_matmul_bf16w(x, a, b, values, idx, float(scale))
    if impl == "xla":
        return sl_matmul_xla(x, a, b, values, idx, float(scale))
    return sl_matmul_pallas(x, a, b, values, idx, float(scale), cfg)
