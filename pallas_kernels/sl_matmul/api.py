"""Public entry point: ``sl_matmul(x, a, b, values, idx, scale, implementation=...)``.

``y = x @ (A B · s + S)`` for ``x (..., in)``, ``A (in, r)``, ``B (r, out)``, sparse ``S`` given by
``values (nnz,)`` at distinct flat row-major indices ``idx (nnz,)`` (int32) into ``(in, out)``;
SLTrain (Han et al., NeurIPS 2024, arXiv 2406.02214). Differentiable in ``x, a, b, values``
(``idx`` is integer and gets no gradient). Output dtype = ``x.dtype``; W is assembled in float32
and cast to ``x.dtype`` for the matmul, accumulated in float32.

``implementation``:

* ``'xla'`` — materialise W, matmul; the paper's backward with W recomputed
  (:mod:`pallas_kernels.sl_matmul.xla`).
* ``'pallas'`` — the fused kernels (:mod:`pallas_kernels.sl_matmul.kernel`): W tiles built on chip in
  both passes, dvalues by a sampled dense-dense kernel. On CPU it runs in interpret mode.
* ``'auto'`` (the default; ``None`` is accepted as the same) — ``'pallas'`` on GPU and TPU backends
  when the kernels (forward and backward) compile for the call's shapes and dtypes (checked once
  per signature by an ahead-of-time compile of abstract operands, :func:`pallas_compiles`),
  ``'xla'`` elsewhere or if they do not.
"""

from __future__ import annotations

import functools
import math
from numbers import Real

import jax
import jax.numpy as jnp

from pallas_kernels.sl_matmul.kernel import KernelConfig, sl_matmul_pallas
from pallas_kernels.sl_matmul.xla import sl_matmul_xla

IMPLEMENTATIONS = ("auto", "xla", "pallas")
PALLAS_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def resolve_implementation(implementation: str | None, backend: str | None = None) -> str:
    """``'xla'`` or ``'pallas'`` for ``implementation`` on ``backend`` (default: JAX's); ``'auto'``/None: by backend."""
    if implementation is None or implementation == "auto":
        backend = backend or jax.default_backend()
        return "pallas" if backend in PALLAS_BACKENDS else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


@functools.lru_cache(maxsize=256)
def pallas_compiles(signature: tuple, scale: float, cfg: KernelConfig) -> bool:
    """Whether forward + backward of the Pallas path compile for ``signature`` (shape, dtype per operand)."""
    abstract = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in signature]

    def fwd_bwd(x, a, b, values, idx):
        y, vjp = jax.vjp(lambda x, a, b, v: sl_matmul_pallas(x, a, b, v, idx, scale, cfg), x, a, b, values)
        return y, vjp(y)

    try:
        jax.jit(fwd_bwd).lower(*abstract).compile()
    except Exception:  # noqa: BLE001 - any lowering/compile failure means: use XLA
        return False
    return True


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


def sl_matmul(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    values: jax.Array,
    idx: jax.Array,
    scale: float,
    *,
    implementation: str | None = "auto",
    block_m: int = 128,
    block_k: int = 64,
    block_n: int = 64,
    slots: int | None = None,
    lowrank: str = "factored",
    interpret: bool | None = None,
) -> jax.Array:
    """``y = x @ (A B · scale + S)``; see the module docstring. Block sizes, slots, lowrank
    (:class:`~pallas_kernels.sl_matmul.kernel.KernelConfig`) and interpret: pallas only."""
    check_operands(x, a, b, values, idx, scale)
    impl = resolve_implementation(implementation)
    if interpret is None:
        interpret = jax.default_backend() not in PALLAS_BACKENDS
    cfg = KernelConfig(
        block_m=block_m, block_k=block_k, block_n=block_n, slots=slots, lowrank=lowrank, interpret=bool(interpret)
    )
    if impl == "pallas" and implementation in (None, "auto"):
        signature = tuple((tuple(o.shape), jnp.dtype(o.dtype)) for o in (x, a, b, values, idx))
        impl = "pallas" if pallas_compiles(signature, float(scale), cfg) else "xla"
    if impl == "xla":
        return sl_matmul_xla(x, a, b, values, idx, float(scale))
    return sl_matmul_pallas(x, a, b, values, idx, float(scale), cfg)
