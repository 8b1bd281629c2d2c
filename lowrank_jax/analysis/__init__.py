"""Analysis tools: perturbation sensitivity, fine-tune degradation, the linear toy, FLOPs.

The overtraining tools follow Springer et al., "Overtrained Language Models Are Harder to Fine-Tune",
ICML 2025, arXiv 2503.19206 (see each module's docstring).
"""

from lowrank_jax.analysis.checkpoints import study_checkpoints
from lowrank_jax.analysis.finetune import finetune_degradation, finetune_token_data, load_params
from lowrank_jax.analysis.linear_toy import LinearToyResult, linear_toy
from lowrank_jax.analysis.sensitivity import SensitivityTable, densify, parameter_sensitivity
from lowrank_jax.layers.dense import register_effective_weight

__all__ = [
    "LinearToyResult",
    "SensitivityTable",
    "densify",
    "finetune_degradation",
    "finetune_token_data",
    "linear_toy",
    "load_params",
    "parameter_sensitivity",
    "register_effective_weight",
    "study_checkpoints",
]
