"""Q-GaLore's INT8 weights as a dense kind: uint8 codes with per-group scales in the train state.

Reference: Zhang, Jaiswal, Yin, Liu, Zhao, Tian, Wang, "Q-GaLore: Quantized GaLore with INT4 Projection and
Layer-Adaptive Low-Rank Gradients", arXiv:2407.08296 (official ``QGaLoreLinear`` / ``W8Linear`` in
``q_galore_torch/utils/quantization.py``, the re-quantization in ``q_galore_adamw8bit.py``).

The layer ``(in, out)`` keeps ``codes`` (uint8, :class:`Int8Codes`) and per-group ``scales`` / ``zeros``
(float32 ``(in / group, out)``, :class:`Int8Scales`): a group is ``group`` consecutive input rows of one
output column, the official grouping of a PyTorch ``(out, in)`` weight flattened row-major when ``in`` is a
multiple of the group size (LLaMA's 4096 and 11008 are multiples of the official 256); otherwise ``group`` is the
largest divisor of ``in`` below ``group_size``, so no group spans two columns. The forward
dequantises ``Ŵ = s (q − z)`` (in the compute dtype) and computes ``y = x (Ŵ + Δ)``. ``Δ`` (:class:`Int8Delta`,
an ``nnx.Param``) is where the weight gradient arrives and the optimizer's update goes; it is zero between steps:
:func:`requantize` folds it into the codes with stochastic rounding, ``q ← SR((Ŵ + Δ) / s') + z'`` with fresh
per-group ``s', z'`` (the official optimizer step: dequantize, add the update, quantize with
``_quantize_stochastic_round``), and zeroes it.

Memory: the persistent weight is 1 byte per value plus 8 bytes per group (0.03 byte at group 256). ``Δ`` need not
be stored between steps: a step that builds it as zeros inside the compiled function (:func:`zero_deltas`,
:func:`drop_deltas`; ``experiments/memory_7b.py``) carries only the codes across steps, so the saving shows in
XLA's memory analysis of the compiled step; a trainer that keeps ``Δ`` in its state stores it (and still trains
the INT8 weights correctly when it calls :func:`requantize` after every update).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.layers.dense import Axes, dtypes, register_dense, register_effective_weight
from lowrank_jax.quantization import codes_of, scales_zeros

LEVELS = 255  # 8 bits


class Int8Codes(nnx.Variable):
    """uint8 weight codes ``(in, out)``; never differentiated."""


class Int8Scales(nnx.Variable):
    """Per-group float32 scales or zero points ``(in / group, out)``; never differentiated."""


class Int8Delta(nnx.Param):
    """The zero ``(in, out)`` increment the gradient flows to; folded into the codes by :func:`requantize`."""


def _blocks(w: jax.Array, group: int) -> jax.Array:
    return w.astype(jnp.float32).reshape(w.shape[0] // group, group, w.shape[1])


def quantize_kernel(w: jax.Array, group: int, key: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """``(codes uint8 (in, out), scales, zeros (in / group, out))`` of a kernel; stochastic rounding with ``key``."""
    x = _blocks(w, group)
    scales, zeros = scales_zeros(x, LEVELS, axis=1)
    codes = codes_of(x, scales, zeros, LEVELS, key)
    return codes.reshape(w.shape).astype(jnp.uint8), scales[:, 0], zeros[:, 0]


def dequantize_kernel(codes: jax.Array, scales: jax.Array, zeros: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``s (q − z)`` as ``(in, out)`` in ``dtype``."""
    group = codes.shape[0] // scales.shape[0]
    q = codes.astype(jnp.float32).reshape(scales.shape[0], group, codes.shape[1])
    return (scales[:, None] * (q - zeros[:, None])).reshape(codes.shape).astype(dtype)


class Int8Dense(nnx.Module):
    """Bias-free INT8 linear ``y = x (Ŵ + Δ)``, ``Ŵ = s (q − z)`` (module doc); kernel init ~ N(0, init_std²)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Axes,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        group_size: int = 256,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        if len(axes) != 2:
            raise ValueError(f"axes: an Int8Dense kernel needs two logical axis names, got {axes!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size: must be a positive integer, got {group_size!r}")
        # the largest divisor of in_features up to group_size (the official 256 divides LLaMA's 4096 and 11008)
        group = max(d for d in range(1, min(group_size, in_features) + 1) if in_features % d == 0)
        self.dtype = dtype
        w = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32) * init_std
        codes, scales, zeros = quantize_kernel(w, group)
        self.codes = Int8Codes(codes, axes=tuple(axes))
        self.scales = Int8Scales(scales, axes=(None, axes[1]))
        self.zeros = Int8Scales(zeros, axes=(None, axes[1]))
        self.delta = Int8Delta(jnp.zeros((in_features, out_features), param_dtype), axes=tuple(axes))

    def weight(self) -> jax.Array:
        """The effective kernel ``Ŵ + Δ`` in the compute dtype."""
        scales, zeros = jax.lax.stop_gradient(self.scales[...]), jax.lax.stop_gradient(self.zeros[...])
        w = dequantize_kernel(self.codes[...], scales, zeros, self.dtype)  # the gradient goes to delta only
        return w + self.delta[...].astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(self.dtype) @ self.weight()


def requantize(layer: dict, key: jax.Array) -> dict:
    """A layer's ``{codes, scales, zeros, delta}`` after folding ``delta`` in with stochastic rounding (jittable;
    leading stacked-layer axes allowed)."""
    lead = layer["codes"].shape[:-2]
    flat = {k: v.reshape((-1,) + v.shape[len(lead) :]) for k, v in layer.items()}
    keys = jax.random.split(key, flat["codes"].shape[0])

    def one(codes, scales, zeros, delta, k):  # noqa: ANN001, ANN202
        w = dequantize_kernel(codes, scales, zeros) + delta.astype(jnp.float32)
        return quantize_kernel(w, codes.shape[0] // scales.shape[0], k)

    # one layer at a time: the float32 temporaries of a stacked leaf are one layer's, not all layers'
    codes, scales, zeros = jax.lax.map(
        lambda a: one(*a), (flat["codes"], flat["scales"], flat["zeros"], flat["delta"], keys)
    )
    out = {"codes": codes, "scales": scales, "zeros": zeros, "delta": jnp.zeros_like(flat["delta"])}
    return {k: v.reshape(lead + v.shape[1:]) for k, v in out.items()}


def zero_deltas(abstract: Any) -> Any:
    """Zeros for every :class:`Int8Delta` of an abstract ``nnx.State`` (build them inside the compiled step)."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)


def drop_deltas(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """``(deltas, rest)`` of a model state: the step keeps ``rest`` across steps and rebuilds the deltas as zeros."""
    return state.split(Int8Delta, ...)


@register_dense("int8")
def _build_int8(in_features: int, out_features: int, *, axes: Axes, rngs: nnx.Rngs, config: Any) -> Int8Dense:
    return Int8Dense(in_features, out_features, axes=axes, rngs=rngs, init_std=config.init_std, **dtypes(config))


def _effective(layer: dict, cfg: Any) -> jax.Array:
    """``Ŵ + Δ`` of a layer's param dict, leading stacked-layer axes kept (float32)."""
    lead = layer["codes"].shape[:-2]
    flat = [layer[k].reshape((-1,) + layer[k].shape[len(lead) :]) for k in ("codes", "scales", "zeros")]
    w = jax.vmap(dequantize_kernel)(*flat).reshape(layer["codes"].shape)
    return w + layer["delta"].astype(jnp.float32)


register_effective_weight("int8", ("codes", "scales", "zeros", "delta"), _effective)
