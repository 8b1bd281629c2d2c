"""The dense factory: how a model builds its attention and MLP linears.

Models never know which training method is used. They ask :func:`make_dense` for a linear map
``in_features -> out_features`` with logical axis names, and the config's ``model.dense`` kind
decides what is built: ``dense`` here; ``lowrank``, ``lora``, ``sl`` and ``bitlinear`` register
themselves with :func:`register_dense` from their own modules.

Kernels follow Flax orientation ``(in, out)``: ``y = x @ kernel``. PyTorch weights are ``(out, in)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str, ...]


class DenseBuilder(Protocol):
    def __call__(
        self, in_features: int, out_features: int, *, axes: Axes, rngs: nnx.Rngs, config: Any
    ) -> nnx.Module: ...


_KINDS: dict[str, DenseBuilder] = {}


def register_dense(kind: str) -> Callable[[DenseBuilder], DenseBuilder]:
    """Register a builder under ``kind`` (the value of ``model.dense``)."""

    def wrap(builder: DenseBuilder) -> DenseBuilder:
        _KINDS[kind] = builder
        return builder

    return wrap


def dense_kinds() -> list[str]:
    return sorted(_KINDS)


def make_dense(
    kind: str, in_features: int, out_features: int, *, axes: Axes, rngs: nnx.Rngs, config: Any
) -> nnx.Module:
    """Build the linear registered as ``kind``; ``config`` is the :class:`~lowrank_jax.config.ModelConfig`."""
    if kind not in _KINDS:
        raise ValueError(f"model.dense: unknown dense kind {kind!r} (known: {', '.join(dense_kinds())})")
    return _KINDS[kind](in_features, out_features, axes=axes, rngs=rngs, config=config)


def dtype_of(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class Dense(nnx.Module):
    """Bias-free linear ``y = x @ kernel`` with kernel ``(in, out)`` ~ N(0, init_std²).

    ``dtype`` is the compute dtype: the kernel and the input are cast to it before the matmul.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Axes,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        if len(axes) != 2:
            raise ValueError(f"axes: a Dense kernel needs two logical axis names, got {axes!r}")
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        init = jax.random.normal(rngs.params(), (in_features, out_features), param_dtype) * init_std
        self.kernel = nnx.Param(init.astype(param_dtype), axes=tuple(axes))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)


@register_dense("dense")
def _build_dense(in_features: int, out_features: int, *, axes: Axes, rngs: nnx.Rngs, config: Any) -> Dense:
    return Dense(
        in_features,
        out_features,
        axes=axes,
        rngs=rngs,
        init_std=config.init_std,
        dtype=dtype_of(config.dtype),
        param_dtype=dtype_of(config.param_dtype),
    )
