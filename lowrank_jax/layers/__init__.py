"""Flax NNX linears selected through the dense factory (see :mod:`lowrank_jax.layers.dense`)."""

from lowrank_jax.layers.bitlinear import BitLinear, pack_bitlinear  # noqa: F401
from lowrank_jax.layers.dense import Dense, dense_kinds, make_dense, register_dense, register_effective_weight
from lowrank_jax.layers.int8 import Int8Dense, requantize  # noqa: F401  (registers the "int8" kind)
from lowrank_jax.layers.lora import FrozenWeight, LoRADense, LoRAFactor, LoRAScale, LowRankDense
from lowrank_jax.layers.sl_dense import SLDense, SLFactor, SLSupport, SparseValues  # noqa: F401

__all__ = [
    "Dense",
    "FrozenWeight",
    "LoRADense",
    "LoRAFactor",
    "LoRAScale",
    "LowRankDense",
    "dense_kinds",
    "make_dense",
    "register_dense",
    "register_effective_weight",
]
