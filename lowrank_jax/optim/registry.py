"""The optimizers of the training loop by name (``optim.name``), each built from a run's config.

A builder is ``builder(cfg, schedule, abstract_params) -> GradientTransformation`` and already
includes the learning rate (``schedule``); the training loop adds clipping and the frozen-leaf
partition around it (:func:`lowrank_jax.train.optimizer.make_optimizer`). Methods add themselves
with :func:`register_optimizer`; the config schema checks ``optim.name`` against
:func:`optimizer_names`. This module reads the config only through its attributes, so the config
package can import the names from here without an import cycle.

Each builder passes its config section field by field as keyword arguments (``rank=g.rank``, …), so a setting
can be followed from the YAML field to the transform's argument: the ``galore`` section goes to
:func:`~lowrank_jax.optim.galore.galore` / :func:`~lowrank_jax.optim.galore.galore_adamw` (GoLore is
``galore.projector=random galore.random_from=N galore.moments=reproject_first``), the ``apollo`` and ``apollo_mini``
sections to :func:`~lowrank_jax.optim.apollo` / :func:`~lowrank_jax.optim.apollo_mini`; Fira is GaLore plus a
residual, so ``fira_adamw`` takes its projector settings from the ``galore`` section and only its own from ``fira``.
A new option is one schema field, one keyword here and the transform's keyword (tests/optim/test_registry.py checks
that every field arrives).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import optax

from lowrank_jax.optim.adam_8bit import scale_by_adam_8bit
from lowrank_jax.optim.apollo import apollo, apollo_mini
from lowrank_jax.optim.fira import fira
from lowrank_jax.optim.galore import galore, galore_adamw

if TYPE_CHECKING:  # annotations only: the config package imports optimizer_names from here
    from lowrank_jax.config import Config

OptimizerBuilder = Callable[["Config", optax.Schedule, Any], optax.GradientTransformation]
_OPTIMIZERS: dict[str, OptimizerBuilder] = {}


def register_optimizer(name: str) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Register ``builder(cfg, schedule, abstract_params) -> GradientTransformation`` as ``name``."""

    def wrap(builder: OptimizerBuilder) -> OptimizerBuilder:
        _OPTIMIZERS[name] = builder
        return builder

    return wrap


def optimizer_names() -> list[str]:
    return sorted(_OPTIMIZERS)


def build_optimizer(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    """The transformation registered as ``cfg.optim.name`` (learning rate included, no clipping)."""
    name = cfg.optim.name
    if name not in _OPTIMIZERS:
        raise ValueError(f"optim.name: unknown optimizer {name!r} (known: {', '.join(optimizer_names())})")
    return _OPTIMIZERS[name](cfg, schedule, params)


def matrix_mask(params: Any, *, stacked_blocks: bool = False) -> Any:
    """True for matrices (weight decay applies to matrices, not to norm scales or vectors).

    With ``stacked_blocks`` the leaves under ``blocks`` carry a leading ``layers`` axis
    (``model.scan_layers``), which does not count: a stacked norm scale ``(layers, d)`` is a vector.
    """

    return jax.tree_util.tree_map_with_path(functools.partial(is_matrix, stacked_blocks=stacked_blocks), params)


def is_matrix(path: Any, x: Any, *, stacked_blocks: bool) -> bool:
    """Whether the leaf at ``path`` is a matrix, not counting the stacked ``layers`` axis of ``blocks``."""
    stacked = stacked_blocks and bool(path) and getattr(path[0], "key", None) == "blocks"
    return x.ndim - int(stacked) >= 2


def decay_mask(cfg: Config) -> Callable[[Any], Any]:
    """The weight-decay mask for ``cfg``'s params layout (:func:`matrix_mask`)."""
    return functools.partial(matrix_mask, stacked_blocks=cfg.model.scan_layers)


def method_mask(params: Any) -> Any:
    """True for the attention and MLP kernels (``blocks/.../kernel``), the leaves the papers' methods wrap.

    Embeddings, norms and ``lm_head`` stay dense with plain Adam (GaLore / SLTrain / ReLoRA recipe).
    """

    def is_method_leaf(path, _):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        return bool(keys) and keys[0] == "blocks" and keys[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(is_method_leaf, params)


def _galore_kwargs(cfg: Config) -> dict[str, Any]:
    """The ``galore`` section as :func:`~lowrank_jax.optim.galore.galore` keywords, on the method's kernels."""
    g = cfg.galore
    return {
        "rank": g.rank,
        "update_proj_gap": g.update_proj_gap,
        "scale": g.scale,
        "proj_type": g.proj_type,
        "refresh": g.refresh,
        "svd": g.svd,
        "moments": g.moments,
        "canonical_signs": g.canonical_signs,
        "oversample": g.oversample,
        "projector": g.projector,
        "random_from": g.random_from,
        "mask": method_mask,
    }


def _decayed(cfg: Config, schedule: optax.Schedule, scaling: optax.GradientTransformation):
    """``scaling``, then decoupled weight decay on matrices, then the learning rate."""
    return optax.chain(
        scaling,
        optax.add_decayed_weights(cfg.optim.weight_decay, mask=decay_mask(cfg)),
        optax.scale_by_learning_rate(schedule),
    )


@register_optimizer("adamw")
def _adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    o = cfg.optim
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask(cfg))


@register_optimizer("adamw8bit")
def _adamw8bit(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    o = cfg.optim
    return _decayed(cfg, schedule, scale_by_adam_8bit(o.b1, o.b2, o.eps))


@register_optimizer("galore_adamw")
def _galore_adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    o = cfg.optim
    return galore_adamw(
        schedule,
        weight_decay=o.weight_decay,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay_mask=decay_mask(cfg),
        **_galore_kwargs(cfg),
    )


@register_optimizer("galore_adamw8bit")
def _galore_adamw8bit(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    o = cfg.optim
    inner = scale_by_adam_8bit(o.b1, o.b2, o.eps, eps_placement="hf")
    return _decayed(cfg, schedule, galore(inner=inner, **_galore_kwargs(cfg)))


def _apollo_shared_kwargs(a: Any, o: Any) -> dict[str, Any]:
    """The keywords APOLLO and APOLLO-Mini take alike: the shared fields of their config sections and Adam's."""
    return dict(
        update_proj_gap=a.update_proj_gap,
        proj_type=a.proj_type,
        norm_growth_limit=a.norm_growth_limit,
        eight_bit=a.eight_bit,
        seed=a.seed,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        mask=method_mask,
    )


@register_optimizer("apollo_adamw")
def _apollo_adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    a = cfg.apollo
    scaling = apollo(
        a.rank,
        scale=a.scale,
        scale_type=a.scale_type,
        scale_front=a.scale_front,
        **_apollo_shared_kwargs(a, cfg.optim),
    )
    return _decayed(cfg, schedule, scaling)


@register_optimizer("apollo_mini_adamw")
def _apollo_mini_adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    a = cfg.apollo_mini
    scaling = apollo_mini(a.rank, scale=a.scale, scale_front=a.scale_front, **_apollo_shared_kwargs(a, cfg.optim))
    return _decayed(cfg, schedule, scaling)


@register_optimizer("fira_adamw")
def _fira_adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    f, o = cfg.fira, cfg.optim
    scaling = fira(
        norm_growth_limit=f.norm_growth_limit,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        eight_bit=f.eight_bit,
        **_galore_kwargs(cfg),
    )
    return _decayed(cfg, schedule, scaling)
