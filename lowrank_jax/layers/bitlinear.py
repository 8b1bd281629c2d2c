"""BitLinear: the 1.58-bit linear of BitNet b1.58, trained through a straight-through estimator.

Ma, Wang, Ma, Wang, Wang, Huang, Dong, Wang, Xue, Wei, "The Era of 1-bit LLMs: All Large Language
Models are in 1.58 Bits", arXiv 2402.17764 (2024). The layer keeps a latent float kernel ``W``
(in, out) and, on every forward pass, recomputes

    γ   = mean|W| + ε                                   (per-tensor absmean, ε = 1e-5)
    W̃   = RoundClip(W / γ, −1, 1) ∈ {−1, 0, 1}
    η_t = max(max_j |x_tj|, ε) / 127                     (per token t: absmax over features)
    x̃_t = Clip(round(x_t / η_t), −128, 127)              (int8 values)
    y_t = (x̃_t W̃) · γ · η_t                              (integer matmul, output rescaled)

Training uses the straight-through estimator ``w + stop_gradient(q(w) − w)`` on both quantisers:
the backward pass sees the dequantised operands ``x̂ = x̃·η`` and ``Ŵ = W̃·γ`` as if quantisation
were the identity, i.e. ``∂L/∂x = ∂L/∂y Ŵᵀ`` and ``∂L/∂W = x̂ᵀ ∂L/∂y`` (scales carry no gradient).
The forward value is computed as ``(x̃ W̃)·(γ η)`` with both integer operands exactly representable,
so with a float32 accumulator the matmul is exact for ``in·128 < 2²⁴``.

``packed=True`` is the inference path: the layer stores only ``W̃`` packed 4 per byte
(:class:`PackedTernary`, uint8 ``(ceil(in/4), out)``) and ``γ`` (:class:`TernaryScale`) and calls
the packed ternary kernel (:mod:`pallas_kernels.ternary_matmul`) on int8 activations.
:func:`pack_bitlinear` converts a trained layer. The official BitLinear also normalises its input
(SubLN) before quantising; here the model's own pre-norms play that role and the layer itself is
norm-free, so it drops into any model built by the dense factory (LLaMA, MLP).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.layers.dense import Axes, dtypes, register_dense
from pallas_kernels.ternary_matmul import pack_ternary, ternary_matmul

EPS = 1e-5


class PackedTernary(nnx.Variable):
    """Ternary weights packed 2 bits each (uint8); never trained."""


class TernaryScale(nnx.Variable):
    """The per-tensor scale γ of a packed ternary kernel; never trained."""


def weight_quant(w: jax.Array, eps: float = EPS) -> tuple[jax.Array, jax.Array]:
    """Absmean ternarisation ``(W̃, γ)``: ``γ = mean|W| + ε``, ``W̃ = RoundClip(W/γ, −1, 1)`` (float32)."""
    w = w.astype(jnp.float32)
    gamma = jnp.mean(jnp.abs(w)) + eps
    return jnp.clip(jnp.round(w / gamma), -1.0, 1.0), gamma


def activation_quant(x: jax.Array, eps: float = EPS) -> tuple[jax.Array, jax.Array]:
    """Per-token absmax int8 quantisation ``(x̃, η)`` with ``x ≈ x̃·η``, ``η = max(max|x|, ε)/127`` over the last axis.

    ``x̃ = Clip(round(x · 127 / max|x|), −128, 127)`` as float32 holding integers; ``η`` has shape ``x.shape[:-1]``.
    """
    x = x.astype(jnp.float32)
    eta = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), eps) / 127.0
    return jnp.clip(jnp.round(x / eta[..., None]), -128.0, 127.0), eta


def ste(x: jax.Array, q: jax.Array) -> jax.Array:
    """Straight-through estimator: the value of ``q``, the gradient of the identity in ``x``."""
    return x + jax.lax.stop_gradient(q - x)


def bitlinear(x: jax.Array, w: jax.Array, *, dtype: Any = jnp.float32, eps: float = EPS) -> jax.Array:
    """The BitLinear forward ``y = (x̃ W̃)·γ·η`` with straight-through gradients (module docstring)."""
    w_t, gamma = weight_quant(w, eps)
    x_q, eta = activation_quant(x, eps)
    gamma, eta = jax.lax.stop_gradient(gamma), jax.lax.stop_gradient(eta)
    # Value x̃ (resp. W̃); gradient of x/η (resp. W/γ): after the rescale by γη this is exactly the
    # STE on the dequantised operands, x + sg(x̂ − x) and W + sg(Ŵ − W).
    x_int = ste(x.astype(jnp.float32) / eta[..., None], x_q)
    w_int = ste(w.astype(jnp.float32) / gamma, w_t)
    y = jnp.matmul(x_int.astype(dtype), w_int.astype(dtype), preferred_element_type=jnp.float32)
    return (y * (gamma * eta)[..., None]).astype(dtype)


class BitLinear(nnx.Module):
    """BitNet b1.58 linear ``(in, out)``: latent float ``kernel`` (an ``nnx.Param`` with ``axes``).

    With ``packed=True`` the layer holds ``packed_kernel`` (:class:`PackedTernary`, axes
    ``axes``) and ``scale`` (:class:`TernaryScale`) instead, and runs the packed ternary kernel on
    int8 activations (``implementation`` as in :func:`pallas_kernels.ternary_matmul.ternary_matmul`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Axes,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        eps: float = EPS,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        packed: bool = False,
        implementation: str | None = "auto",
    ):
        if len(axes) != 2:
            raise ValueError(f"axes: a BitLinear kernel needs two logical axis names, got {axes!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        if not eps > 0:
            raise ValueError(f"eps: must be positive, got {eps!r}")
        self.in_features, self.out_features = in_features, out_features
        self.eps, self.dtype, self.packed, self.implementation = float(eps), dtype, bool(packed), implementation
        w = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32) * init_std
        if packed:
            w_t, gamma = weight_quant(w, eps)
            self.packed_kernel = PackedTernary(pack_ternary(w_t), axes=tuple(axes))
            self.scale = TernaryScale(gamma, axes=())
        else:
            self.kernel = nnx.Param(w.astype(param_dtype), axes=tuple(axes))

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.packed:
            return bitlinear(x, self.kernel[...], dtype=self.dtype, eps=self.eps)
        x_q, eta = activation_quant(x, self.eps)
        y = ternary_matmul(
            x_q.astype(jnp.int8),
            self.packed_kernel[...],
            self.scale[...],
            k=self.in_features,
            x_scale=eta,
            out_dtype=jnp.float32,
            implementation=self.implementation,
        )
        return y.astype(self.dtype)


def pack_bitlinear(layer: BitLinear, implementation: str | None = "auto") -> BitLinear:
    """A packed (inference) copy of a trained :class:`BitLinear`: same outputs, 2 bits per weight."""
    if layer.packed:
        raise ValueError("layer: already packed")
    axes = layer.kernel.get_metadata()["axes"]
    out = BitLinear(
        layer.in_features,
        layer.out_features,
        axes=axes,
        rngs=nnx.Rngs(0),
        eps=layer.eps,
        dtype=layer.dtype,
        packed=True,
        implementation=implementation,
    )
    w_t, gamma = weight_quant(layer.kernel[...], layer.eps)
    out.packed_kernel = PackedTernary(pack_ternary(w_t), axes=axes)
    out.scale = TernaryScale(gamma, axes=())
    return out


@register_dense("bitlinear")
def _build_bitlinear(in_features: int, out_features: int, *, axes: Axes, rngs: nnx.Rngs, config: Any) -> BitLinear:
    return BitLinear(in_features, out_features, axes=axes, rngs=rngs, init_std=config.init_std, **dtypes(config))
