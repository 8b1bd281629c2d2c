"""The Pallas implementation of the SLTrain matmul: the kernels for the platform being lowered, differentiable.

``sl_matmul_pallas(x, a, b, values, idx, scale, cfg)`` computes ``y = x · (A B s + S)`` (SLTrain:
Han et al., NeurIPS 2024, arXiv 2406.02214) with the kernels of :mod:`pallas_kernels.sl_matmul.tiles`
— Triton on GPUs, Mosaic on TPUs, the interpreter on CPU, picked when the computation is lowered
(:func:`pallas_kernels.platforms.per_platform`). Per call it chooses blocks
(:mod:`pallas_kernels.sl_matmul.blocks`), builds the support's tile layout
(:mod:`pallas_kernels.sl_matmul.layout`) and adds the spilled entries exactly by a small XLA
gather/scatter (``M × SPILL`` temporaries, under ``lax.cond`` so it costs nothing when there is none).

``jax.custom_vjp``: the forward saves only the inputs; the backward runs the dX and dvalues kernels
(W rebuilt on chip, G sampled on chip) and forms dA = s · Xᵀ (dY Bᵀ) and dB = s · (X A)ᵀ dY in XLA
from ``(M, r)`` intermediates only.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.platforms import TARGETS, Target, is_pow2, per_platform
from pallas_kernels.sl_matmul.blocks import Blocks, choose_blocks
from pallas_kernels.sl_matmul.layout import TileLayout, spilled, tile_layout
from pallas_kernels.sl_matmul.tiles import F32, dvalues_kernel, dx_kernel, factor_matmul, forward_kernel


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel settings.

    ``block_m/k/n``: requested tile sizes (powers of two ≥ 16; None: chosen per target and shape by
    :func:`~pallas_kernels.sl_matmul.blocks.choose_blocks`). A request is shrunk to the padded
    problem and, on TPU, rounded up to Mosaic's tiling (lane dims to 128): every target can take any
    request. ``slots``: per-tile capacity P (None: the probabilistic bound). ``lowrank``:
    ``'factored'`` or ``'tile'`` (:mod:`pallas_kernels.sl_matmul.tiles`). ``interpret``: run in the
    Pallas interpreter on every platform; ``interpret_as``: the structure the interpreter runs
    (``'gpu'`` or ``'tpu'``; also what CPU runs). ``poison``: fill every kernel output with NaN
    (aliased input) before the kernel writes it — for tests.
    """

    block_m: int | None = None
    block_k: int | None = None
    block_n: int | None = None
    slots: int | None = None
    lowrank: str = "factored"
    interpret: bool = False
    interpret_as: str = "gpu"
    poison: bool = False

    def __post_init__(self):
        if self.lowrank not in ("factored", "tile"):
            raise ValueError(f"lowrank: must be 'factored' or 'tile', got {self.lowrank!r}")
        for name in ("block_m", "block_k", "block_n"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 16 or not is_pow2(v)):
                raise ValueError(f"{name}: must be a power of two >= 16 or None, got {v!r}")
        s = self.slots
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ValueError(f"slots: must be a positive integer or None, got {s!r}")
        if self.interpret_as not in TARGETS:
            raise ValueError(f"interpret_as: must be one of {TARGETS}, got {self.interpret_as!r}")


def correct_spills(layout: TileLayout, out: jax.Array, add) -> jax.Array:
    """``out`` with the spilled entries' contribution ``add(out_f32)`` (under ``lax.cond``); NaN when more
    entries spilled than :data:`~pallas_kernels.sl_matmul.layout.SPILL`."""
    fixed = jax.lax.cond(layout.n_spill > 0, lambda o: add(o.astype(F32)).astype(o.dtype), lambda o: o, out)
    if layout.spill.shape[0] >= layout.slot.shape[0]:  # every entry fits the correction
        return fixed
    return jnp.where(layout.n_spill > layout.spill.shape[0], jnp.nan, fixed).astype(out.dtype)


def spill_corrected_y(layout: TileLayout, sp, y: jax.Array, x2: jax.Array) -> jax.Array:
    """The forward ``y`` plus the spilled entries' ``x[:, row] · value`` in their columns."""
    return correct_spills(layout, y, lambda y: y.at[:, sp.cols].add(x2[:, sp.rows].astype(F32) * sp.vals))


def spill_corrected_dx(layout: TileLayout, sp, dx: jax.Array, dy2: jax.Array) -> jax.Array:
    """``dX`` plus the spilled entries' ``dY[:, col] · value`` in their rows."""
    return correct_spills(layout, dx, lambda d: d.at[:, sp.rows].add(dy2[:, sp.cols].astype(F32) * sp.vals))


def _blocks_for(target: Target, m: int, a, b, idx, dtype, cfg: KernelConfig) -> Blocks:
    (k, r), n = a.shape, b.shape[1]
    return choose_blocks(target, m, k, n, idx.shape[0], r, jnp.dtype(dtype).itemsize, cfg)


def _forward_on(target, cfg, scale, x2, xa, a, b, values, idx):
    blk = _blocks_for(target, x2.shape[0], a, b, idx, x2.dtype, cfg)
    layout = tile_layout(idx, a.shape[0], b.shape[1], blk)
    y = forward_kernel(target, blk, x2, a, b, values, layout, scale, cfg, xa=xa)
    sp = spilled(layout, idx, values, b.shape[1])
    return spill_corrected_y(layout, sp, y, x2)


def _dvalues(target, cfg, blk, layout, x2, dy2, values, idx, n):
    """dvalues by the sampled dense-dense kernel, the spilled entries' gradients added by XLA."""
    dv = dvalues_kernel(target, blk, x2, dy2, layout, cfg)
    sp = spilled(layout, idx, values, n)
    g_spilled = lambda: jnp.sum(x2[:, sp.rows].astype(F32) * dy2[:, sp.cols].astype(F32), axis=0)
    return correct_spills(layout, dv, lambda d: d.at[layout.spill].set(g_spilled(), mode="drop"))


def dvalues_on(target: Target, cfg: KernelConfig, x2, dy2, a, b, values, idx) -> jax.Array:
    """``dvalues (nnz,) = (x2ᵀ dY).flat[idx]`` float32 on ``target``, spills included (the Mosaic GPU port's)."""
    blk = _blocks_for(target, x2.shape[0], a, b, idx, x2.dtype, cfg)
    layout = tile_layout(idx, a.shape[0], b.shape[1], blk)
    return _dvalues(target, cfg, blk, layout, x2, dy2, values, idx, b.shape[1])


def _backward_on(target, cfg, scale, x2, dy2, dy_bt, a, b, values, idx):
    blk = _blocks_for(target, x2.shape[0], a, b, idx, x2.dtype, cfg)
    layout = tile_layout(idx, a.shape[0], b.shape[1], blk)
    dx = dx_kernel(target, blk, dy2, a, b, values, layout, scale, cfg, dy_bt=dy_bt)
    sp = spilled(layout, idx, values, b.shape[1])
    return spill_corrected_dx(layout, sp, dx, dy2), _dvalues(target, cfg, blk, layout, x2, dy2, values, idx, b.shape[1])


def factor_grads(x2, dy2, dy_bt, a, scale: float) -> tuple[jax.Array, jax.Array]:
    """``dA = s · Xᵀ (dY Bᵀ)`` and ``dB = s · (X A)ᵀ dY`` in float32 from the ``(M, r)`` products.

    Float32 operands, as the paper's backward forms ``G Bᵀ`` and ``Aᵀ G`` from a float32 ``G``.
    """
    da = jnp.matmul(x2.T.astype(F32), dy_bt) * scale
    db = jnp.matmul(factor_matmul(x2, a).T, dy2.astype(F32)) * scale
    return da, db


def _primal(x, a, b, values, idx, scale: float, cfg: KernelConfig):
    k, n = a.shape[0], b.shape[1]
    x2 = x.reshape(-1, k)
    xa = factor_matmul(x2, a) if cfg.lowrank == "factored" else jnp.zeros((x2.shape[0], 0), F32)
    y2 = per_platform(
        lambda target: partial(_forward_on, target, cfg, scale),
        x2,
        xa,
        a,
        b,
        values,
        idx,
        interpret=cfg.interpret,
        interpret_as=cfg.interpret_as,
    )
    return y2.reshape(*x.shape[:-1], n)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def sl_matmul_pallas(x, a, b, values, idx, scale: float, cfg: KernelConfig):
    """``y = x @ (A B s + S)`` by the Pallas kernels, forward and backward, for the platform it is lowered on."""
    return _primal(x, a, b, values, idx, scale, cfg)


def _vjp_fwd(x, a, b, values, idx, scale, cfg):
    return _primal(x, a, b, values, idx, scale, cfg), (x, a, b, values, idx)


def _vjp_bwd(scale, cfg, res, dy):
    x, a, b, values, idx = res
    k, n = a.shape[0], b.shape[1]
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    dy_bt = factor_matmul(dy2, b.T)  # (M, r): dY Bᵀ, shared by dA and the factored dX
    dx, dv = per_platform(
        lambda target: partial(_backward_on, target, cfg, scale),
        x2,
        dy2,
        dy_bt,
        a,
        b,
        values,
        idx,
        interpret=cfg.interpret,
        interpret_as=cfg.interpret_as,
    )
    da, db = factor_grads(x2, dy2, dy_bt, a, scale)
    return dx.reshape(x.shape), da.astype(a.dtype), db.astype(b.dtype), dv.astype(values.dtype), None


sl_matmul_pallas.defvjp(_vjp_fwd, _vjp_bwd)
