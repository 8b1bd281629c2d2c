"""Optax GradientTransformations of the memory-efficient methods: GaLore (and GoLore), APOLLO, Fira, 8-bit Adam,
ReLoRA.

One home each: :mod:`~lowrank_jax.optim.projection` (the projection core that GaLore, GoLore, APOLLO and Fira
share: plans, projectors, refresh schedule, project / project back), :mod:`~lowrank_jax.optim.galore` (package:
moments, transform; GoLore is its ``projector='random'``), :mod:`~lowrank_jax.optim.apollo` (APOLLO,
APOLLO-Mini), :mod:`~lowrank_jax.optim.fira`, :mod:`~lowrank_jax.optim.adam_hf` (GaLore's official inner Adam),
:mod:`~lowrank_jax.optim.adam_8bit`, :mod:`~lowrank_jax.optim.relora`; shared argument checks in
:mod:`~lowrank_jax.optim.checks`, the optax-state walk in :mod:`~lowrank_jax.optim.tree`, and what APOLLO and
Fira share beyond the projection (the Adam-ratio scaling factor, the norm-growth limiter) in ``_norm_scaling``.
noise_step is its own package, :mod:`lowrank_jax.noise_step`.
"""

from lowrank_jax.optim.adam_8bit import (
    QuantizedArray,
    ScaleByAdam8bitState,
    dequantize,
    get_moments,
    quantize,
    scale_by_adam_8bit,
    set_moments,
)
from lowrank_jax.optim.adam_hf import ScaleByAdamHFState, scale_by_adam_hf
from lowrank_jax.optim.apollo import ApolloState, apollo, apollo_mini
from lowrank_jax.optim.fira import FiraState, fira
from lowrank_jax.optim.galore import (
    GaLoreDims,
    GaLoreState,
    galore,
    galore_adamw,
    register_moments,
)
from lowrank_jax.optim.relora import (
    find_lora_layers,
    frozen_partition,
    jagged_cosine_schedule,
    merge_and_reinit,
    relora_restart,
    reset_optimizer_state,
    warm_start_to_lora,
)

# Lets galore(moments='reproject' | 'reset') rotate / zero the 8-bit moments.
register_moments(ScaleByAdam8bitState, get_moments, set_moments)

__all__ = [
    "ApolloState",
    "FiraState",
    "apollo",
    "apollo_mini",
    "fira",
    "GaLoreDims",
    "GaLoreState",
    "ScaleByAdamHFState",
    "galore",
    "galore_adamw",
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
]
