"""The training loop's optimizer: the registered ``optim.name`` transformation, its schedule, clipping
and the frozen-leaf partition.

Builders live in :mod:`lowrank_jax.optim.registry`; this module adds what every run needs around
them: the learning-rate schedule (:func:`make_schedule`), no state for frozen leaves (LoRA's ``W``,
SLTrain's int32 support) and global-norm clipping.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from lowrank_jax.config import Config
from lowrank_jax.models import FROZEN_LABELS, param_labels
from lowrank_jax.optim.registry import build_optimizer
from lowrank_jax.optim.relora import frozen_partition
from lowrank_jax.train.relora import jagged_schedule


def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_ratio·steps``, then cosine decay to ``min_lr_ratio·lr``.

    The papers' recipe (GaLore, SLTrain, ReLoRA): warmup 10% of steps, decay to 10% of peak. With
    ReLoRA restarts or a warm start (and ``relora.jagged``) the same curve is cut into ReLoRA's
    jagged schedule (:func:`lowrank_jax.train.relora.jagged_schedule`).
    """
    if cfg.relora.jagged_schedule:
        return jagged_schedule(cfg)
    o = cfg.optim
    warmup = int(o.warmup_ratio * cfg.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=o.lr * o.min_lr_ratio,
    )


def make_optimizer(
    cfg: Config, params: Any, *, labels: Any | None = None, clip: bool = True
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` for ``cfg``; ``params`` may be abstract (ShapeDtypeStruct leaves).

    ``labels`` (Variable class names, default the whole model's) lets the per-layer update build the
    optimizer of a sub-tree; ``clip=False`` leaves global-norm clipping to the caller.
    """
    schedule = make_schedule(cfg)
    tx = build_optimizer(cfg, schedule, params)
    labels = param_labels(cfg.model) if labels is None else labels
    frozen = tuple(lab for lab in FROZEN_LABELS if lab in jax.tree.leaves(labels))
    if frozen:  # LoRA's frozen weights and SLTrain's int32 support get no optimizer state
        tx = frozen_partition(tx, labels, frozen_labels=frozen)
    if clip and cfg.optim.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.optim.grad_clip), tx)
    return tx, schedule
