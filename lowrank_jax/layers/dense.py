"""The dense factory: how a model builds its attention and MLP linears.

Models never know which training method is used. They ask :func:`make_dense` for a linear map
``in_features -> out_features`` with logical axis names, and the config's ``model.dense`` kind
decides what is built: ``dense`` here; ``lowrank``, ``lora``, ``sl`` and ``bitlinear`` register
themselves with :func:`register_dense` from their own modules.

Every kind also registers its *effective weight* with :func:`register_effective_weight`: the dense
``(..., in, out)`` kernel ``W`` its layer computes ``x @ W`` with, from the layer's param dict. It is
the one definition of ``W`` that ReLoRA's merge and the perturbation analysis
(:func:`lowrank_jax.analysis.densify`) use.

Kernels follow Flax orientation ``(in, out)``: ``y = x @ kernel``. PyTorch weights are ``(out, in)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPES = tuple(_DTYPES)  # the values of model.dtype and model.param_dtype


@dataclass(frozen=True)
class EffectiveWeightRule:
    """How one layer param dict (identified by its exact key set) maps to its effective ``(..., in, out)`` kernel."""

    keys: frozenset[str]
    weight: Callable[[Mapping[str, jax.Array], Any], jax.Array]  # (layer params, ModelConfig) -> W


_EFFECTIVE: dict[str, list[EffectiveWeightRule]] = {}


def register_effective_weight(
    kind: str, keys: Sequence[str], weight: Callable[[Mapping[str, jax.Array], Any], jax.Array]
) -> None:
    """Register an effective weight of dense kind ``kind`` (the value of ``model.dense``).

    ``keys``: the keys of one layer's param dict (e.g. ``("kernel", "lora_a", "lora_b")``); a kind may
    register several key sets (LoRA with and without a trainable scale), a key set registered again
    replaces the earlier rule. ``weight(layer, model_cfg)`` returns the effective kernel in Flax
    orientation ``(..., in, out)`` (leading dims are stacked layers) such that the layer computes ``x @ W``.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind: must be a non-empty string, got {kind!r}")
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"keys: must be a non-empty sequence of strings, got {keys!r}")
    if not callable(weight):
        raise ValueError(f"weight: must be callable, got {weight!r}")
    rule = EffectiveWeightRule(frozenset(keys), weight)
    _EFFECTIVE[kind] = [r for r in _EFFECTIVE.get(kind, []) if r.keys != rule.keys] + [rule]


def effective_weight_kinds() -> list[str]:
    return sorted(_EFFECTIVE)


def effective_weight_rules(kind: str) -> list[EffectiveWeightRule]:
    """The rules registered for ``kind`` (empty if none)."""
    return list(_EFFECTIVE.get(kind, []))


def dtype_of(name: str) -> jnp.dtype:
    return _DTYPES[name]


def dtypes(config: Any) -> dict[str, jnp.dtype]:
    """``{"dtype", "param_dtype"}`` keywords of a layer from a ModelConfig (compute and storage dtypes)."""
    return {"dtype": dtype_of(config.dtype), "param_dtype": dtype_of(config.param_dtype)}


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
    return Dense(in_features, out_features, axes=axes, rngs=rngs, init_std=config.init_std, **dtypes(config))


register_effective_weight("dense", ("kernel",), lambda layer, cfg: layer["kernel"])
