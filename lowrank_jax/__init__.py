"""lowrank-jax: memory-efficient LLM pretraining (GaLore, GoLore, APOLLO, Fira, ReLoRA, SLTrain, ternary), JAX/Flax."""

__version__ = "0.1.0"

from lowrank_jax.optim import (
    apollo,
    apollo_mini,
    fira,
    galore,
    galore_adamw,
    scale_by_adam_8bit,
    scale_by_adam_hf,
)

__all__ = [
    "apollo",
    "apollo_mini",
    "fira",
    "galore",
    "galore_adamw",
    "scale_by_adam_8bit",
    "scale_by_adam_hf",
    "__version__",
]
