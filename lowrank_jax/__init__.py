"""lowrank-jax: memory-efficient LLM pretraining (GaLore, ReLoRA, SLTrain, ternary) in JAX/Flax."""

__version__ = "0.1.0"

from lowrank_jax.optim import (  # noqa: E402
    galore,
    galore_adamw,
    scale_by_adam_8bit,
    scale_by_adam_hf,
)

__all__ = ["galore", "galore_adamw", "scale_by_adam_8bit", "scale_by_adam_hf", "__version__"]
