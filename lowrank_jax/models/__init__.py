"""Models and the helpers that inspect them without allocating."""

from lowrank_jax.models.llama import Llama
from lowrank_jax.models.params import (
    FACTOR_LABELS,
    FROZEN_LABELS,
    abstract_params,
    build_model,
    count_bytes,
    count_params,
    count_trainable,
    formula_param_count,
    logical_axes,
    param_labels,
    param_report,
    split_model,
)

__all__ = [
    "FACTOR_LABELS",
    "FROZEN_LABELS",
    "count_trainable",
    "Llama",
    "abstract_params",
    "build_model",
    "count_bytes",
    "count_params",
    "formula_param_count",
    "logical_axes",
    "param_labels",
    "param_report",
    "split_model",
]
