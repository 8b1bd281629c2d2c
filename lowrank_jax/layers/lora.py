"""LoRA / ReLoRA linears and the plain low-rank linear, built through the dense factory.

ReLoRA (Lialin, Muckatira, Shivagunde, Rumshisky, "ReLoRA: High-Rank Training Through Low-Rank
Updates", ICLR 2024, arXiv 2307.05695; official code Guitaricet/relora) trains a network whose
attention and MLP linears are

    y = x W + (x A) B · s          W (in, out) frozen,  A (in, r),  B (r, out),  s = alpha / r

and every ``restart_every`` steps merges the low-rank update into the frozen weight
(``W ← W + A B s``), re-initialises ``A`` (Kaiming-uniform) and zeroes ``B``
(:func:`lowrank_jax.optim.relora.merge_and_reinit`). The sum of many rank-``r`` updates has rank
far above ``r`` while only ``A``/``B`` are trained and carry optimizer state.

Kernels follow Flax orientation ``(in, out)``: the official PyTorch ``lora_A.weight`` is ``(r, in)``
and ``lora_B.weight`` is ``(out, r)``; here ``A = lora_A.weight.T`` and ``B = lora_B.weight.T``.

Initialisation (as the official ``ReLoRaLinear``):

* ``W ~ N(0, init_std²)`` like :class:`~lowrank_jax.layers.dense.Dense` (a random or pretrained
  weight; the training loop may overwrite it with warm-started weights).
* ``A`` Kaiming-uniform as ``torch.nn.init.kaiming_uniform_(a=√5)``: ``U(−b, b)`` with
  ``b = √(6 / ((1 + a²)·fan_in)) = 1/√in`` (``fan_in = in``, the same bound as the default init
  of ``nn.Linear(in, r)`` that the official code calls on ``lora_A``).
* ``B = 0``, so the layer equals ``x W`` at initialisation. Consequently ``∂L/∂B = (x A)ᵀ ∂L/∂y · s``
  is non-zero at init while ``∂L/∂A = xᵀ ∂L/∂y Bᵀ s`` is exactly zero until ``B`` moves.
* Not replicated: when keeping the original weights the official ``ReLoRaModel`` additionally
  zero-initialises ``A``; with ``A = B = 0`` both factor gradients vanish and nothing learns until
  the first merge re-initialises ``A``.

Trainable scale (official ``trainable_scaling=True``): a scalar :class:`LoRAScale` parameter ``σ``
initialised to 1.0 replaces the fixed scale by ``s = tanh(σ)`` (``alpha`` is then unused, exactly
as in the official ``_post_lora_scale``); the merge uses ``tanh(σ)`` and resets ``σ`` to 0.

The frozen weight is a :class:`FrozenWeight` variable (not an ``nnx.Param``): it is read through
``jax.lax.stop_gradient``, so differentiating the pure-dict params yields a symbolic-zero
cotangent for it (no ``xᵀ·∂L/∂y`` matmul is ever computed), and optimizers partitioned by variable
type give it no state (:func:`lowrank_jax.optim.relora.frozen_partition`).

:class:`LowRankDense` is the papers' "low-rank" baseline ``y = (x A) B`` with no full-rank weight.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.layers.dense import Axes, dtypes, register_dense, register_effective_weight

# Attribute names of LoRADense's variables in the model's pure-dict params; the ReLoRA merge finds
# its (W, A, B[, σ]) groups by these keys.
KERNEL, LORA_A, LORA_B, LORA_SCALE = "kernel", "lora_a", "lora_b", "lora_scale"
# Attribute names of LowRankDense's factors (deliberately different: there is no W to merge into).
LOWRANK_A, LOWRANK_B = "lowrank_a", "lowrank_b"


class FrozenWeight(nnx.Variable):
    """A weight that receives no gradient and no optimizer state (ReLoRA's ``W``)."""


class LoRAFactor(nnx.Param):
    """A trainable low-rank factor (LoRA ``A`` / ``B``, low-rank ``A`` / ``B``)."""


class LoRAScale(nnx.Param):
    """The raw trainable LoRA scale ``σ``; the layer multiplies by ``tanh(σ)``."""


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """``torch.nn.init.kaiming_uniform_(a=√5)`` for an ``(..., in, r)`` factor: ``U(−1/√in, 1/√in)``.

    ``bound = gain·√(3/fan_in)`` with ``gain = √(2/(1+a²))`` and ``a = √5``, i.e. ``√(6/(6·fan_in))``;
    ``fan_in = shape[-2]`` (the input dimension in Flax orientation). Leading dims are batch
    (stacked layers) and share the bound.
    """
    if len(shape) < 2:
        raise ValueError(f"shape: a LoRA factor needs at least 2 dims, got {shape!r}")
    a = math.sqrt(5.0)
    bound = math.sqrt(6.0 / ((1.0 + a * a) * shape[-2]))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: must be a positive integer, got {rank!r}")
    return rank


def _check_axes(axes: Axes) -> tuple[str, str]:
    if len(axes) != 2:
        raise ValueError(f"axes: a LoRA/low-rank kernel needs two logical axis names, got {axes!r}")
    return axes[0], axes[1]


class LoRADense(nnx.Module):
    """``y = x W + (x A) B · s`` with ``W`` frozen; ``s = alpha/rank`` or ``tanh(σ)`` (trainable).

    Variables: ``kernel`` :class:`FrozenWeight` (in, out) with ``axes``; ``lora_a``
    :class:`LoRAFactor` (in, rank) with axes ``(axes[0], 'rank')``; ``lora_b`` :class:`LoRAFactor`
    (rank, out) with axes ``('rank', axes[1])``; with ``trainable_scale`` also ``lora_scale``
    :class:`LoRAScale` () initialised to 1.0. ``dtype`` is the compute dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float = 32.0,
        axes: Axes,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        trainable_scale: bool = False,
    ):
        rank = _check_rank(rank)
        ax_in, ax_out = _check_axes(axes)
        if not (isinstance(alpha, Real) and not isinstance(alpha, bool) and math.isfinite(alpha)):
            raise ValueError(f"alpha: must be a finite real number, got {alpha!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha = float(alpha)
        self.scaling = float(alpha) / rank  # used when not trainable_scale
        self.trainable_scale = bool(trainable_scale)
        self.dtype = dtype
        w = jax.random.normal(rngs.params(), (in_features, out_features), param_dtype) * init_std
        self.kernel = FrozenWeight(w.astype(param_dtype), axes=(ax_in, ax_out))
        self.lora_a = LoRAFactor(kaiming_uniform(rngs.params(), (in_features, rank), param_dtype), axes=(ax_in, "rank"))
        self.lora_b = LoRAFactor(jnp.zeros((rank, out_features), param_dtype), axes=("rank", ax_out))
        self.lora_scale = LoRAScale(jnp.ones((), param_dtype), axes=()) if trainable_scale else None

    def scale(self) -> jax.Array | float:
        """The factor ``s`` multiplying ``(x A) B``: ``tanh(σ)`` if trainable, else ``alpha/rank``."""
        if self.lora_scale is not None:
            return jnp.tanh(self.lora_scale[...].astype(jnp.float32))
        return self.scaling

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        w = jax.lax.stop_gradient(self.kernel[...]).astype(self.dtype)
        low = (x @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
        return x @ w + (low * self.scale()).astype(self.dtype)


def factor_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``A B`` of ``(..., in, r)`` and ``(..., r, out)`` factors in float32 at highest precision."""
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def lora_weight(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array | float) -> jax.Array:
    """The effective weight ``W + A B · s`` of a LoRA layer in float32 (stacked leading dims allowed).

    ``scale`` is ``alpha/rank`` or ``tanh(σ)`` with the stacked dims of ``kernel``'s leading axes.
    The one definition used by ReLoRA's merge and the perturbation analysis.
    """
    return kernel.astype(jnp.float32) + factor_product(a, b) * scale


def lora_scale_of(layer: Any, alpha_over_rank: float) -> jax.Array:
    """``s`` of a LoRA layer's param dict: ``tanh(σ)`` (broadcast over the matrix) if it has ``lora_scale``."""
    if LORA_SCALE in layer:
        return jnp.tanh(jnp.asarray(layer[LORA_SCALE], jnp.float32))[..., None, None]
    return jnp.asarray(alpha_over_rank, jnp.float32)


def _lora_effective(layer: Any, config: Any) -> jax.Array:
    s = lora_scale_of(layer, config.lora_alpha / config.lora_rank)
    return lora_weight(layer[KERNEL], layer[LORA_A], layer[LORA_B], s)


def lowrank_init_std(init_std: float, rank: int) -> float:
    """Per-factor std ``(init_std²/rank)^(1/4)`` so that each entry of ``A B`` has std ``init_std``.

    ``(A B)_ij = Σ_k A_ik B_kj`` with independent zero-mean factors has variance
    ``rank·σ_A²·σ_B²``; balanced factors ``σ_A = σ_B`` give ``σ = (init_std²/rank)^(1/4)``.
    """
    return (init_std * init_std / rank) ** 0.25


class LowRankDense(nnx.Module):
    """The low-rank baseline ``y = (x A) B`` (``W = A B``, no full-rank weight): ``rank·(in+out)`` params.

    ``lowrank_a`` :class:`LoRAFactor` (in, rank), axes ``(axes[0], 'rank')``; ``lowrank_b``
    :class:`LoRAFactor` (rank, out), axes ``('rank', axes[1])``. Both ``~ N(0, σ²)`` with
    ``σ = (init_std²/rank)^(1/4)`` (:func:`lowrank_init_std`), so ``A B`` has the dense init's entry
    scale ``init_std`` (as a product of Gaussians it is heavier-tailed but of the same variance), and
    both factors receive gradients from the first step (neither is zero).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        axes: Axes,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        rank = _check_rank(rank)
        ax_in, ax_out = _check_axes(axes)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dtype = dtype
        std = lowrank_init_std(init_std, rank)
        a = jax.random.normal(rngs.params(), (in_features, rank), jnp.float32) * std
        b = jax.random.normal(rngs.params(), (rank, out_features), jnp.float32) * std
        self.lowrank_a = LoRAFactor(a.astype(param_dtype), axes=(ax_in, "rank"))
        self.lowrank_b = LoRAFactor(b.astype(param_dtype), axes=("rank", ax_out))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        return (x @ self.lowrank_a[...].astype(self.dtype)) @ self.lowrank_b[...].astype(self.dtype)


@register_dense("lora")
def _build_lora(in_features: int, out_features: int, *, axes: Axes, rngs: nnx.Rngs, config: Any) -> LoRADense:
    return LoRADense(
        in_features,
        out_features,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        trainable_scale=config.lora_trainable_scale,
        axes=axes,
        rngs=rngs,
        init_std=config.init_std,
        **dtypes(config),
    )


@register_dense("lowrank")
def _build_lowrank(in_features: int, out_features: int, *, axes: Axes, rngs: nnx.Rngs, config: Any) -> LowRankDense:
    """The low-rank baseline takes its rank from ``model.lora_rank`` (the rank of both factorised kinds)."""
    return LowRankDense(
        in_features,
        out_features,
        rank=config.lora_rank,
        axes=axes,
        rngs=rngs,
        init_std=config.init_std,
        **dtypes(config),
    )


register_effective_weight("lora", (KERNEL, LORA_A, LORA_B), _lora_effective)
register_effective_weight("lora", (KERNEL, LORA_A, LORA_B, LORA_SCALE), _lora_effective)
register_effective_weight(
    "lowrank", (LOWRANK_A, LOWRANK_B), lambda layer, cfg: factor_product(layer[LOWRANK_A], layer[LOWRANK_B])
)
