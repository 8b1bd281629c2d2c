"""Optax GradientTransformations of the memory-efficient methods (GaLore, 8-bit Adam, ...)."""

from lowrank_jax.optim.galore import (
    GaLoreDims,
    GaLoreState,
    ScaleByAdamHFState,
    galore,
    galore_adamw,
    register_moments,
    scale_by_adam_hf,
)

# --- 8-bit Adam (lowrank_jax/optim/adam_8bit.py) goes here, e.g.:
# from lowrank_jax.optim.adam_8bit import ScaleByAdam8bitState, get_moments, scale_by_adam_8bit, set_moments
# register_moments(ScaleByAdam8bitState, get_moments, set_moments)  # lets galore(moments='reproject') rotate them

__all__ = [
    "GaLoreDims",
    "GaLoreState",
    "ScaleByAdamHFState",
    "galore",
    "galore_adamw",
    "register_moments",
    "scale_by_adam_hf",
    # "scale_by_adam_8bit",
]
