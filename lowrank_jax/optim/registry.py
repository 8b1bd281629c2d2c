"""The optimizers of the training loop by name (``optim.name``), each built from a run's config.

A builder is ``builder(cfg, schedule, abstract_params) -> GradientTransformation`` and already
includes the learning rate (``schedule``); the training loop adds clipping and the frozen-leaf
partition around it (:func:`lowrank_jax.train.optimizer.make_optimizer`). Methods add themselves
with :func:`register_optimizer`; the config schema checks ``optim.name`` against
:func:`optimizer_names`. This module reads the config only through its attributes, so the config
package can import the names from here without an import cycle.

Each builder passes its config section field by field as keyword arguments (``rank=g.rank``, …) to the method's
complete optimizer, so a setting can be followed from the YAML field to the transform's argument: ``galore`` →
:func:`~lowrank_jax.optim.galore.galore`, ``golore`` → :func:`~lowrank_jax.optim.galore.golore`, ``apollo`` /
``apollo_mini`` → :func:`~lowrank_jax.optim.apollo.apollo` / :func:`~lowrank_jax.optim.apollo.apollo_mini`,
``fira`` → :func:`~lowrank_jax.optim.fira.fira`; Adam's settings and weight decay come from ``optim``. A new option
is one schema field, one keyword here and the transform's keyword (tests/optim/test_registry.py checks that every
field arrives).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import optax

from lowrank_jax.optim.adam_8bit import adamw_8bit
from lowrank_jax.optim.apollo import apollo, apollo_mini
from lowrank_jax.optim.fira import fira
from lowrank_jax.optim.galore import galore, golore
from lowrank_jax.optim.ldadam import ldadam
from lowrank_jax.optim.q_galore import q_galore
from lowrank_jax.optim.swan import swan

if TYPE_CHECKING:  # annotations only: the config package imports optimizer_names from here
    from lowrank_jax.config import Config

OptimizerBuilder = Callable[["Config", optax.Schedule, Any], optax.GradientTransformation]
_OPTIMIZERS: dict[str, OptimizerBuilder] = {}
_SECTIONS: dict[str, tuple[str, ...]] = {}


def register_optimizer(name: str, sections: tuple[str, ...] = ()) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Register ``builder(cfg, schedule, abstract_params) -> GradientTransformation`` as ``name``.

    ``sections``: the method sections of the config the builder reads (besides ``optim``); the config schema
    refuses a run that changes a method section its optimizer does not read.
    """

    def wrap(builder: OptimizerBuilder) -> OptimizerBuilder:
        _OPTIMIZERS[name] = builder
        _SECTIONS[name] = tuple(sections)
        return builder

    return wrap


def optimizer_names() -> list[str]:
    return sorted(_OPTIMIZERS)


def optimizer_sections(name: str) -> tuple[str, ...]:
    """The method sections of the config that optimizer ``name`` reads (empty for AdamW)."""
    return _SECTIONS.get(name, ())


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


def _projector_kwargs(g: Any) -> dict[str, Any]:
    """The GaLore projector settings a ``galore``, ``golore`` or ``fira`` section holds, as keywords."""
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
    }


def _adam_kwargs(cfg: Config) -> dict[str, Any]:
    """Adam's and weight decay's settings from the ``optim`` section, decay on the matrices (:func:`decay_mask`)."""
    o = cfg.optim
    return dict(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, weight_decay_mask=decay_mask(cfg))


@register_optimizer("adamw")
def _adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    o = cfg.optim
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask(cfg))


@register_optimizer("adamw8bit")
def _adamw8bit(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    o = cfg.optim
    return adamw_8bit(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask(cfg))


def _galore_builder(cfg: Config, schedule: optax.Schedule, *, eight_bit: bool) -> optax.GradientTransformation:
    g = cfg.galore
    return galore(
        schedule,
        eight_bit=eight_bit,
        projector=g.projector,
        random_from=g.random_from,
        **_projector_kwargs(g),
        **_adam_kwargs(cfg),
    )


@register_optimizer("galore_adamw", ("galore",))
def _galore_adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    return _galore_builder(cfg, schedule, eight_bit=False)


@register_optimizer("galore_adamw8bit", ("galore",))
def _galore_adamw8bit(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    return _galore_builder(cfg, schedule, eight_bit=True)


@register_optimizer("golore_adamw", ("golore",))
def _golore_adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    g = cfg.golore
    return golore(schedule, random_from=g.random_from, **_projector_kwargs(g), **_adam_kwargs(cfg))


def _apollo_shared_kwargs(a: Any, cfg: Config) -> dict[str, Any]:
    """The keywords APOLLO and APOLLO-Mini take alike: the shared fields of their config sections and Adam's."""
    return dict(
        rank=a.rank,
        scale=a.scale,
        scale_front=a.scale_front,
        update_proj_gap=a.update_proj_gap,
        proj_type=a.proj_type,
        norm_growth_limit=a.norm_growth_limit,
        eight_bit=a.eight_bit,
        seed=a.seed,
        **_adam_kwargs(cfg),
    )


@register_optimizer("apollo_adamw", ("apollo",))
def _apollo_adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    return apollo(schedule, scale_type=cfg.apollo.scale_type, **_apollo_shared_kwargs(cfg.apollo, cfg))


@register_optimizer("apollo_mini_adamw", ("apollo_mini",))
def _apollo_mini_adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    return apollo_mini(schedule, **_apollo_shared_kwargs(cfg.apollo_mini, cfg))


@register_optimizer("fira_adamw", ("fira",))
def _fira_adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    f = cfg.fira
    return fira(
        schedule,
        norm_growth_limit=f.norm_growth_limit,
        eight_bit=f.eight_bit,
        **_projector_kwargs(f),
        **_adam_kwargs(cfg),
    )


@register_optimizer("swan", ("swan",))
def _swan(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    w = cfg.swan
    return swan(
        schedule,
        normalize=w.normalize,
        whiten=w.whiten,
        ns_steps=w.ns_steps,
        norm_eps=w.norm_eps,
        scale=w.scale,
        **_adam_kwargs(cfg),
    )


@register_optimizer("ldadamw", ("ldadam",))
def _ldadamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    d = cfg.ldadam
    return ldadam(
        schedule,
        rank=d.rank,
        rho=d.rho,
        proj_type=d.proj_type,
        error_feedback=d.error_feedback,
        **_adam_kwargs(cfg),
    )


@register_optimizer("q_galore_adamw8bit", ("q_galore",))
def _q_galore_adamw8bit(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    q = cfg.q_galore
    return q_galore(
        schedule,
        rank=q.rank,
        update_proj_gap=q.update_proj_gap,
        scale=q.scale,
        proj_type=q.proj_type,
        proj_quant=q.proj_quant,
        proj_bits=q.proj_bits,
        proj_group_size=q.proj_group_size,
        cos_threshold=q.cos_threshold,
        gamma_proj=q.gamma_proj,
        queue_size=q.queue_size,
        **_adam_kwargs(cfg),
    )
