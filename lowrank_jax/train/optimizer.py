"""Optimizers of the training loop, chosen by ``optim.name``, and the learning-rate schedule.

Every builder returns an optax GradientTransformation that already includes the learning rate;
:func:`make_optimizer` prepends global-norm clipping. Methods add themselves with
:func:`register_optimizer` (GaLore, 8-bit Adam, ReLoRA, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

from lowrank_jax.config import Config
from lowrank_jax.models import FROZEN_LABELS, param_labels

OptimizerBuilder = Callable[[Config, optax.Schedule, Any], optax.GradientTransformation]
_OPTIMIZERS: dict[str, OptimizerBuilder] = {}


def register_optimizer(name: str) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Register ``builder(cfg, schedule, abstract_params) -> GradientTransformation`` as ``name``."""

    def wrap(builder: OptimizerBuilder) -> OptimizerBuilder:
        _OPTIMIZERS[name] = builder
        return builder

    return wrap


def optimizer_names() -> list[str]:
    return sorted(_OPTIMIZERS)


def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_ratio·steps``, then cosine decay to ``min_lr_ratio·lr``.

    The papers' recipe (GaLore, SLTrain, ReLoRA): warmup 10% of steps, decay to 10% of peak. With
    ReLoRA restarts or a warm start (and ``relora.jagged``) the same curve is cut into ReLoRA's
    jagged schedule, restarting at ``warm_start`` (if any) and every ``relora.every`` steps after.
    """
    o = cfg.optim
    warmup = int(o.warmup_ratio * cfg.steps)
    r = cfg.relora
    if r.jagged and (r.every or r.warm_start):
        from lowrank_jax.optim.relora import jagged_cosine_schedule  # noqa: PLC0415

        every = r.every or cfg.steps  # a warm start without restarts: one re-warm, at the switch
        first = r.warm_start or r.every
        return jagged_cosine_schedule(
            o.lr, warmup, every, r.restart_warmup, cfg.steps, o.min_lr_ratio, first_restart=first
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=o.lr * o.min_lr_ratio,
    )


def matrix_mask(params: Any, *, stacked_blocks: bool = False) -> Any:
    """True for matrices (weight decay applies to matrices, not to norm scales or vectors).

    With ``stacked_blocks`` the leaves under ``blocks`` carry a leading ``layers`` axis
    (``model.scan_layers``), which does not count: a stacked norm scale ``(layers, d)`` is a vector.
    """

    def is_matrix(path: Any, x: Any) -> bool:
        stacked = stacked_blocks and bool(path) and getattr(path[0], "key", None) == "blocks"
        return x.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def decay_mask(cfg: Config) -> Callable[[Any], Any]:
    """The weight-decay mask for ``cfg``'s params layout (:func:`matrix_mask`)."""
    return functools.partial(matrix_mask, stacked_blocks=cfg.model.scan_layers)


@register_optimizer("adamw")
def _adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    o = cfg.optim
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask(cfg))


def method_mask(params: Any) -> Any:
    """True for the attention and MLP kernels (``blocks/.../kernel``), the leaves the papers' methods wrap.

    Embeddings, norms and ``lm_head`` stay dense with plain Adam (GaLore / SLTrain / ReLoRA recipe).
    """

    def is_method_leaf(path, _):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        return bool(keys) and keys[0] == "blocks" and keys[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(is_method_leaf, params)


def _galore_kwargs(cfg: Config) -> dict[str, Any]:
    g = cfg.galore
    return dict(
        update_proj_gap=g.update_proj_gap,
        scale=g.scale,
        proj_type=g.proj_type,
        refresh=g.refresh,
        svd=g.svd,
        moments=g.moments,
        canonical_signs=g.canonical_signs,
        mask=method_mask,
    )


@register_optimizer("galore_adamw")
def _galore_adamw(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    from lowrank_jax.optim.galore import galore_adamw  # noqa: PLC0415

    o = cfg.optim
    return galore_adamw(
        schedule,
        cfg.galore.rank,
        weight_decay=o.weight_decay,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay_mask=decay_mask(cfg),
        **_galore_kwargs(cfg),
    )


@register_optimizer("galore_adamw8bit")
def _galore_adamw8bit(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    from lowrank_jax.optim.adam_8bit import scale_by_adam_8bit  # noqa: PLC0415
    from lowrank_jax.optim.galore import galore  # noqa: PLC0415

    o = cfg.optim
    inner = scale_by_adam_8bit(o.b1, o.b2, o.eps, eps_placement="hf")
    return optax.chain(
        galore(cfg.galore.rank, inner=inner, **_galore_kwargs(cfg)),
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask(cfg)),
        optax.scale_by_learning_rate(schedule),
    )


@register_optimizer("adamw8bit")
def _adamw8bit(cfg: Config, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    from lowrank_jax.optim.adam_8bit import scale_by_adam_8bit  # noqa: PLC0415

    o = cfg.optim
    return optax.chain(
        scale_by_adam_8bit(o.b1, o.b2, o.eps),
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask(cfg)),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(
    cfg: Config, params: Any, *, labels: Any | None = None, clip: bool = True
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` for ``cfg``; ``params`` may be abstract (ShapeDtypeStruct leaves).

    ``labels`` (Variable class names, default the whole model's) lets the per-layer update build the
    optimizer of a sub-tree; ``clip=False`` leaves global-norm clipping to the caller.
    """
    name = cfg.optim.name
    if name not in _OPTIMIZERS:
        raise ValueError(f"optim.name: unknown optimizer {name!r} (known: {', '.join(optimizer_names())})")
    schedule = make_schedule(cfg)
    tx = _OPTIMIZERS[name](cfg, schedule, params)
    labels = param_labels(cfg.model) if labels is None else labels
    frozen = tuple(lab for lab in FROZEN_LABELS if lab in jax.tree.leaves(labels))
    if frozen:  # LoRA's frozen weights and SLTrain's int32 support get no optimizer state
        from lowrank_jax.optim.relora import frozen_partition  # noqa: PLC0415

        tx = frozen_partition(tx, labels, frozen_labels=frozen)
    if clip and cfg.optim.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.optim.grad_clip), tx)
    return tx, schedule
