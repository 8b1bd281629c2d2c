"""lowrank-jax: memory-efficient LLM pretraining (GaLore, ReLoRA, SLTrain, ternary) in JAX/Flax."""

__version__ = "0.1.0"
