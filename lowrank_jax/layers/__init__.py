"""Flax NNX linears selected through the dense factory (see :mod:`lowrank_jax.layers.dense`)."""

from lowrank_jax.layers.dense import Dense, dense_kinds, make_dense, register_dense

__all__ = ["Dense", "dense_kinds", "make_dense", "register_dense"]
