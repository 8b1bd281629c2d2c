"""Building models and describing their parameters (counts, bytes, logical axes, labels).

Parameters travel through training as plain nested dicts of arrays (``nnx.State.to_pure_dict``);
a model is rebuilt inside a jitted function with ``nnx.merge(graphdef, params)``. Metadata that
the pure dict drops (logical axis names, the Variable type used by optimizers to select leaves)
is kept in parallel pytrees built here from an abstract model.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from lowrank_jax.config import ModelConfig
from lowrank_jax.models.llama import Llama


def build_model(cfg: ModelConfig, key: jax.Array | int = 0) -> Llama:
    rngs = nnx.Rngs(params=key)
    return Llama(cfg, rngs)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """``(graphdef, params)`` with params a pure nested dict of arrays."""
    graphdef, state = nnx.split(model)
    return graphdef, state.to_pure_dict()


def _abstract_state(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: build_model(cfg, 0)))


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """``(graphdef, params)`` with ShapeDtypeStruct leaves; nothing is allocated."""
    graphdef, state = _abstract_state(cfg)
    return graphdef, state.to_pure_dict()


def _metadata_tree(state: nnx.State, fn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = fn(var)
    return out


def logical_axes(cfg_or_state: ModelConfig | nnx.State) -> dict[str, Any]:
    """Pure-dict pytree of logical ``PartitionSpec``s (axis names, not mesh axes), one per parameter."""
    state = _abstract_state(cfg_or_state)[1] if isinstance(cfg_or_state, ModelConfig) else cfg_or_state
    return _metadata_tree(state, lambda v: PartitionSpec(*(v.get_metadata().get("axes") or ())))


def param_labels(cfg_or_state: ModelConfig | nnx.State) -> dict[str, Any]:
    """Pure-dict pytree of each parameter's Variable class name (e.g. ``"Param"``), for optax.partition."""
    state = _abstract_state(cfg_or_state)[1] if isinstance(cfg_or_state, ModelConfig) else cfg_or_state
    return _metadata_tree(state, lambda v: type(v).__name__)


# Variable classes that are constants of the model: no gradient, no optimizer state (ReLoRA's frozen W,
# SLTrain's int32 sparse support).
FROZEN_LABELS = ("FrozenWeight", "SLSupport")
# Variable classes of the methods' trainable leaves inside the blocks: LoRA / low-rank factors and ReLoRA's scale,
# SLTrain's factors and sparse values (the ``factors`` learning-rate group of lowrank_jax.train.optimizer).
FACTOR_LABELS = ("LoRAFactor", "LoRAScale", "SLFactor", "SparseValues")


def count_trainable(params: Any, labels: Any) -> int:
    """Number of parameters outside :data:`FROZEN_LABELS` (``labels`` from :func:`param_labels`)."""
    leaves, labs = jax.tree.leaves(params), jax.tree.leaves(labels)
    return sum(math.prod(x.shape) for x, lab in zip(leaves, labs, strict=True) if lab not in FROZEN_LABELS)


def count_params(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def count_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def formula_param_count(cfg: ModelConfig) -> int:
    """Closed-form dense LLaMA count: ``(1 or 2)·V·d + L·(2·d·H·hd + 2·d·K·hd + 3df + 2d) + d``.

    ``H`` query heads and ``K`` key/value heads of size ``hd``; the embedding is counted once when the
    head is tied to it. With ``H·hd = K·hd = d`` and an untied head this is ``2Vd + L(4d² + 3df + 2d) + d``.
    """
    V, d, f, L = cfg.vocab_size, cfg.hidden, cfg.ffn, cfg.layers
    q_dim, kv_dim = cfg.heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    embeddings = (1 if cfg.tie_embeddings else 2) * V * d
    return embeddings + L * (2 * d * q_dim + 2 * d * kv_dim + 3 * d * f + 2 * d) + d


def param_report(cfg: ModelConfig) -> dict[str, int]:
    """Parameter count and bytes of ``cfg`` computed with ``nnx.eval_shape`` (no allocation)."""
    _, params = abstract_params(cfg)
    return {"params": count_params(params), "param_bytes": count_bytes(params)}
