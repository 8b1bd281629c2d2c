"""Optax GradientTransformations of the memory-efficient methods: GaLore, GoLore, APOLLO, APOLLO-Mini, Fira, 8-bit
AdamW, ReLoRA.

Named as in optax: ``scale_by_<method>(…)`` composes (no learning rate), ``<method>(learning_rate, …,
weight_decay=…, mask=…)`` is a complete optimizer like ``optax.adamw`` (:mod:`~lowrank_jax.optim.complete`), and
:func:`~lowrank_jax.optim.masks.path_mask` selects the projected matrices by parameter name on any pytree.

One home each: :mod:`~lowrank_jax.optim.projection` (the projection core that GaLore, GoLore, APOLLO and Fira
share: plans, projectors, refresh schedule, project / project back), :mod:`~lowrank_jax.optim.galore` (package:
moments, transform, golore), :mod:`~lowrank_jax.optim.apollo` (APOLLO,
APOLLO-Mini), :mod:`~lowrank_jax.optim.fira`, :mod:`~lowrank_jax.optim.adam_hf` (GaLore's official inner Adam),
:mod:`~lowrank_jax.optim.adam_8bit`, :mod:`~lowrank_jax.optim.relora`; shared argument checks in
:mod:`~lowrank_jax.optim.checks`, the optax-state walk in :mod:`~lowrank_jax.optim.tree`, and what APOLLO and
Fira share beyond the projection (the Adam-ratio scaling factor, the norm-growth limiter) in ``_norm_scaling``.
noise_step is its own package, :mod:`lowrank_jax.noise_step`.
"""

from lowrank_jax.optim.adam_8bit import (
    QuantizedArray,
    ScaleByAdam8bitState,
    adamw_8bit,
    dequantize,
    get_moments,
    quantize,
    scale_by_adam_8bit,
    set_moments,
)
from lowrank_jax.optim.adam_hf import ScaleByAdamHFState, scale_by_adam_hf
from lowrank_jax.optim.apollo import ApolloState, apollo, apollo_mini, scale_by_apollo, scale_by_apollo_mini
from lowrank_jax.optim.fira import FiraState, fira, scale_by_fira
from lowrank_jax.optim.galore import (
    GaLoreDims,
    GaLoreState,
    galore,
    golore,
    register_moments,
    scale_by_galore,
    scale_by_golore,
)
from lowrank_jax.optim.ldadam import LDAdamState, ldadam, scale_by_ldadam
from lowrank_jax.optim.masks import DEFAULT_TARGETS, default_mask, path_mask
from lowrank_jax.optim.q_galore import QGaLoreState, q_galore, scale_by_q_galore
from lowrank_jax.optim.relora import (
    find_lora_layers,
    frozen_partition,
    jagged_cosine_schedule,
    merge_and_reinit,
    relora_restart,
    reset_optimizer_state,
    warm_start_to_lora,
)
from lowrank_jax.optim.swan import SwanState, scale_by_swan, swan

# Lets galore(moments='reproject' | 'reset') rotate / zero the 8-bit moments.
register_moments(ScaleByAdam8bitState, get_moments, set_moments)

__all__ = [
    "DEFAULT_TARGETS",
    "ApolloState",
    "FiraState",
    "adamw_8bit",
    "apollo",
    "apollo_mini",
    "default_mask",
    "fira",
    "GaLoreDims",
    "GaLoreState",
    "ScaleByAdamHFState",
    "galore",
    "golore",
    "path_mask",
    "scale_by_apollo",
    "scale_by_apollo_mini",
    "scale_by_fira",
    "scale_by_galore",
    "scale_by_golore",
    "register_moments",
    "scale_by_adam_hf",
    "QuantizedArray",
    "ScaleByAdam8bitState",
    "dequantize",
    "get_moments",
    "quantize",
    "scale_by_adam_8bit",
    "set_moments",
    "find_lora_layers",
    "frozen_partition",
    "jagged_cosine_schedule",
    "merge_and_reinit",
    "relora_restart",
    "reset_optimizer_state",
    "warm_start_to_lora",
    "LDAdamState",
    "QGaLoreState",
    "SwanState",
    "ldadam",
    "q_galore",
    "scale_by_ldadam",
    "scale_by_q_galore",
    "scale_by_swan",
    "swan",
]
