"""Which Pallas backend a kernel is lowered with, chosen per platform when the computation is lowered.

Every kernel in this package is written once, for two *targets* that share its tile math:

* ``gpu`` — Pallas → **Triton** (``pltriton.CompilerParams``), for CUDA and ROCm. Chosen over Mosaic GPU
  (JAX's default Pallas GPU backend since 0.7) deliberately, for every kernel here: the kernels stream their
  reduction inside one program (``fori_loop`` over dynamic ``pl.ds`` slices of refs that stay in global
  memory), which is Triton's model — each iteration's loads are software-pipelined by Triton's
  ``num_stages`` and only one iteration's tiles live in shared memory. Mosaic GPU instead copies every
  BlockSpec block into shared memory by TMA (≤ 256 elements per dimension, 227 KiB in all on H100: these
  kernels' blocks there fail with "Async copies only support copying <=256 elements" and "kernel
  exceeds available shared memory") and lowers only for sm_90a (no A100, no ROCm); its register layouts
  must be inferred or annotated, which jax 0.10 cannot do for the SL kernels' one-hot operands. Triton
  runs on Ampere, Hopper and ROCm alike. Both ops also have a Mosaic GPU port for Hopper, each a
  ``plgpu.kernel`` whose ``plgpu.emit_pipeline`` brings one reduction step's tiles into shared memory at a
  time (:mod:`pallas_kernels.ternary_matmul.mosaic_gpu`, :mod:`pallas_kernels.sl_matmul.mosaic_gpu`); they
  run when named (``implementation='mosaic_gpu'``).
* ``tpu`` — Pallas → **Mosaic TPU** (``pltpu.CompilerParams(dimension_semantics=...)``). The reduction is
  the last grid axis (``"arbitrary"``) with a float32 VMEM scratch accumulator, so Pallas double-buffers
  each step's blocks HBM → VMEM and VMEM use does not grow with the problem; blocks obey the (8, 128)
  rule (or span the whole dimension).

On CPU a kernel can only run in Pallas interpret mode; it then follows one of the two structures
(``interpret_as``, default ``gpu``; the tests run both).

:func:`per_platform` stages a kernel with :func:`jax.lax.platform_dependent`: every branch is traced, only
the branch of the platform being lowered is kept, so ``jax.jit`` on a GPU compiles the Triton kernel,
``jax.export(..., platforms=['tpu'])`` on a laptop lowers the Mosaic TPU one, and on CPU the interpreter
runs. Nothing depends on ``jax.default_backend()`` at trace time.

Lowering for a TPU from a machine without one needs a chip generation (the Mosaic lowering reads the
device kind: on CPU it fails with "Unsupported TPU device kind: cpu"); :mod:`pallas_kernels.lowering`
gives it through an abstract mesh whose ``AbstractDevice`` names the chip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

TARGETS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Target:
    """Kernel structure and block rules (``name``: ``'gpu'`` or ``'tpu'``); ``interpret``: in the Pallas interpreter;
    ``ptx``: Triton lowered for CUDA, where a kernel may use inline PTX (not on ROCm, not interpreted)."""

    name: str
    interpret: bool = False
    ptx: bool = False

    def __post_init__(self):
        if self.name not in TARGETS:
            raise ValueError(f"target: must be one of {TARGETS}, got {self.name!r}")
        if self.ptx and (self.name != "gpu" or self.interpret):
            raise ValueError("target: inline PTX needs the gpu structure, compiled (not interpreted)")

    @property
    def tpu(self) -> bool:
        return self.name == "tpu"


GPU, TPU, CUDA = Target("gpu"), Target("tpu"), Target("gpu", ptx=True)


def per_platform(
    build: Callable[[Target], Callable[..., Any]], *args: Any, interpret: bool = False, interpret_as: str = "gpu"
) -> Any:
    """``build(target)(*args)`` for the platform the surrounding computation is lowered for.

    ``cuda``/``rocm``: the Triton kernel (:data:`CUDA` allows inline PTX); ``tpu``: the Mosaic TPU kernel;
    ``cpu``: the ``interpret_as`` structure in interpret mode. ``interpret=True`` interprets on every
    platform (tests, debugging).
    """
    interpreted = Target(interpret_as, interpret=True)
    if interpret:
        return build(interpreted)(*args)
    return jax.lax.platform_dependent(*args, cpu=build(interpreted), cuda=build(CUDA), rocm=build(GPU), tpu=build(TPU))


def compiler_params(target: Target, *, semantics: Sequence[str] = (), num_warps: int = 4, num_stages: int = 2) -> Any:
    """The Pallas ``compiler_params`` that select the backend of ``target`` (None in interpret mode).

    ``semantics``: Mosaic TPU grid-dimension semantics (``"parallel"`` / ``"arbitrary"``); ``num_warps`` and
    ``num_stages``: Triton's warps per program and software-pipelining depth.
    """
    if target.interpret:
        return None
    if target.tpu:
        return pltpu.CompilerParams(dimension_semantics=tuple(semantics))
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def mosaic_gpu_interpret_params() -> Any:
    """The Mosaic GPU interpreter's parameters (public from jax 0.11, private before)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # lazy: only the Mosaic GPU ports need it

    try:
        return plgpu.InterpretGPUParams()
    except AttributeError:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return InterpretGPUParams()


def pow2_at_least(n: int, lo: int = 1) -> int:
    """The smallest power of two ``>= max(n, lo)``."""
    return 1 << max(0, (max(n, lo) - 1).bit_length())


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fit_block(extent: int, lo: int, cap: int) -> int:
    """A power-of-two block in ``[lo, cap]`` for an axis of ``extent`` (``lo``, ``cap`` powers of two).

    Padding an operand is a copy of it on every call, so where ``extent`` is a multiple of ``lo`` the
    largest block that divides it is taken if it is at least ``cap / 4``; otherwise (padding is
    unavoidable, or the divisor would be a tiny tile) the largest block up to ``cap``.
    """
    whole = min(cap, pow2_at_least(extent, lo))
    if extent % lo:
        return whole
    divisor = max(b for b in (lo << i for i in range(32)) if b <= cap and extent % b == 0)
    return divisor if 4 * divisor >= cap else whole


# Mosaic TPU: the minor two dims of a block are (sublane, lane) tiles of (8·(4 / itemsize), 128).
LANE = 128


def sublane(itemsize: int) -> int:
    """Native second-minor tiling of a TPU vreg for an element of ``itemsize`` bytes (8 for 32-bit, 16, 32)."""
    return 8 * max(1, 4 // itemsize)


# Budgets for the block choosers: conservative for every supported chip.
TPU_VMEM_BUDGET = 12 * 2**20  # below the 16 MiB default scoped VMEM limit of v4 / v5e / v5p
GPU_SMEM_BUDGET = 96 * 2**10  # A100 has 164 KiB of shared memory per SM, H100 227 KiB; Triton needs headroom
