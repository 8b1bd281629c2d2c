"""The training loop's optimizer: the registered ``optim.name`` transformation, its schedule, clipping
and the frozen-leaf partition.

Builders live in :mod:`lowrank_jax.optim.registry`; this module adds what every run needs around
them: the learning-rate schedule (:func:`make_schedule`), no state for frozen leaves (LoRA's ``W``,
SLTrain's int32 support), per-group learning rates (:func:`lr_groups`) and global-norm clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from lowrank_jax.config import Config
from lowrank_jax.models import FACTOR_LABELS, FROZEN_LABELS, param_labels
from lowrank_jax.optim.registry import build_optimizer, is_matrix
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


# The learning-rate groups (``optim.lr_<group>``) and what each holds.
LR_GROUPS = {
    "embed": "token embedding and lm_head",
    "blocks": "the blocks' dense kernels (attention, MLP)",
    "factors": "the method's trainable block leaves (FACTOR_LABELS: LoRA / low-rank factors, SLTrain B, A, values)",
    "norms": "RMSNorm scales and other vectors",
}
_NOT_SCALED = "frozen"  # FROZEN_LABELS leaves: a zero update (int32 for SLTrain's support), left as it is


def lr_groups(cfg: Config) -> dict[str, float]:
    """``{group: peak learning rate}``: ``optim.lr_<group>``, or ``optim.lr`` where that is null."""
    own = {g: getattr(cfg.optim, f"lr_{g}") for g in LR_GROUPS}
    return {g: cfg.optim.lr if lr is None else lr for g, lr in own.items()}


def lr_group_labels(labels: Any, *, stacked_blocks: bool) -> Callable[[Any], Any]:
    """``tree -> `` the :data:`LR_GROUPS` name of each leaf of a params-shaped ``tree`` (``labels``: Variable names).

    By the top-level key first (``embed``, ``lm_head``), then the Variable class (:data:`FACTOR_LABELS`), then
    the shape: a matrix is a block kernel, anything smaller a norm (with ``stacked_blocks`` the leading
    ``layers`` axis of ``blocks`` does not count). Frozen leaves are labelled ``"frozen"``.
    """

    def group(path: Any, label: str, x: Any) -> str:
        top = getattr(path[0], "key", None)
        if label in FROZEN_LABELS:
            return _NOT_SCALED
        if top in ("embed", "lm_head"):
            return "embed"
        if label in FACTOR_LABELS:
            return "factors"
        return "blocks" if is_matrix(path, x, stacked_blocks=stacked_blocks) else "norms"

    return lambda tree: jax.tree_util.tree_map_with_path(group, labels, tree)


def lr_group_report(cfg: Config, params: Any, labels: Any) -> dict[str, dict[str, float]]:
    """``{group: {"lr": peak lr, "params": count}}`` for the groups ``params`` has (for ``results.json``)."""
    names = jax.tree.leaves(lr_group_labels(labels, stacked_blocks=cfg.model.scan_layers)(params))
    counts: dict[str, int] = {}
    for name, x in zip(names, jax.tree.leaves(params), strict=True):
        counts[name] = counts.get(name, 0) + math.prod(x.shape)
    return {g: {"lr": lr, "params": counts[g]} for g, lr in lr_groups(cfg).items() if g in counts}


def trainable_params(report: dict[str, dict[str, float]]) -> int:
    """Parameters that train in a run: the groups of ``lr_group_report`` with a learning rate above 0."""
    return sum(int(g["params"]) for g in report.values() if g["lr"] > 0)


def scale_by_lr_group(cfg: Config, labels: Any) -> optax.GradientTransformation:
    """Multiply each group's update by ``lr_<group> / lr`` (``optax.partition``; stateless).

    Every optimizer here ends in ``-lr(t)·(direction + weight decay)`` with the same schedule shape, so this is
    exactly a per-group peak learning rate (decoupled weight decay scales with it, as in PyTorch param groups).
    """
    ratios = {g: lr / cfg.optim.lr for g, lr in lr_groups(cfg).items()}
    transforms = {g: optax.scale(r) for g, r in ratios.items()} | {_NOT_SCALED: optax.identity()}
    return optax.partition(transforms, lr_group_labels(labels, stacked_blocks=cfg.model.scan_layers))


def make_optimizer(
    cfg: Config, params: Any, *, labels: Any | None = None, clip: bool = True
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` for ``cfg``; ``params`` may be abstract (ShapeDtypeStruct leaves).

    ``labels`` (Variable class names, default the whole model's) lets the per-layer update build the
    optimizer of a sub-tree; ``clip=False`` leaves global-norm clipping to the caller. With any
    ``optim.lr_<group>`` set, the update is scaled per group (:func:`scale_by_lr_group`).
    """
    schedule = make_schedule(cfg)
    tx = build_optimizer(cfg, schedule, params)
    labels = param_labels(cfg.model) if labels is None else labels
    frozen = tuple(lab for lab in FROZEN_LABELS if lab in jax.tree.leaves(labels))
    if frozen:  # LoRA's frozen weights and SLTrain's int32 support get no optimizer state
        tx = frozen_partition(tx, labels, frozen_labels=frozen)
    if any(getattr(cfg.optim, f"lr_{g}") is not None for g in LR_GROUPS):
        tx = optax.chain(tx, scale_by_lr_group(cfg, labels))
    if clip and cfg.optim.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.optim.grad_clip), tx)
    return tx, schedule
