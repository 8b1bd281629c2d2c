"""ReLoRA's training glue: the jagged schedule of a run, restarts inside the step, the warm start.

The algorithm (merge-and-reinit, optimizer reset, the jagged cosine, carrying a full-rank state
into LoRA) is :mod:`lowrank_jax.optim.relora`; the layer is :class:`lowrank_jax.layers.lora.LoRADense`;
the ``relora`` config section and its cross-field rules are in :mod:`lowrank_jax.config`. This module
connects them to a run (Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates",
ICLR 2024, arXiv 2307.05695):

* :func:`jagged_schedule`: the run's warmup + cosine cut at the restarts (``relora.jagged``).
* :func:`maybe_restart`: inside the jitted step, right after the update taken at lr 0 (steps
  ``F + k·every``), merge, re-initialise and prune.
* :func:`warm_start_config` / :func:`switch_to_lora`: ``relora.warm_start = N`` trains steps
  ``[0, N)`` full-rank, then carries weights and optimizer state into the LoRA layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import optax

from lowrank_jax.config import Config, derive
from lowrank_jax.optim.relora import jagged_cosine_schedule, relora_restart, warm_start_to_lora
from lowrank_jax.train.state import TrainState

if TYPE_CHECKING:  # annotations only: step.py imports this module
    from lowrank_jax.train.step import Trainer


def jagged_schedule(cfg: Config) -> optax.Schedule:
    """The run's warmup + cosine, dropping to 0 and re-warming at ``F, F + every, …``."""
    o, r = cfg.optim, cfg.relora
    every = r.every or cfg.steps  # a warm start without restarts: one re-warm, at the switch
    return jagged_cosine_schedule(
        o.lr,
        int(o.warmup_ratio * cfg.steps),
        every,
        r.restart_warmup,
        cfg.steps,
        o.min_lr_ratio,
        first_restart=r.first_restart,
    )


def maybe_restart(cfg: Config, new_step: jax.Array, params: Any, opt_state: Any, raw_key: jax.Array, labels: Any):
    """ReLoRA: right after the update taken at lr 0 (steps F + k·every), merge, re-init and prune.

    ``F`` is the warm-start step (the switch to LoRA) or ``every``; at the switch ``B = 0``, so the
    merge changes nothing and only re-draws ``A`` and prunes the one lr-0 step of factor moments.
    ``labels`` are the params' Variable class names (:func:`lowrank_jax.models.param_labels`).
    """
    r, m = cfg.relora, cfg.model
    since_first = new_step - 1 - r.first_restart  # restarts at F, F + every, ...
    restart = (since_first >= 0) & (since_first % r.every == 0)

    def do(po):
        key = jax.random.fold_in(jax.random.wrap_key_data(raw_key), new_step)
        return relora_restart(
            po[0],
            po[1],
            key,
            labels=labels,
            alpha_over_rank=m.lora_alpha / m.lora_rank,
            reset_mode=r.reset,
            reset_ratio=r.reset_ratio,
        )

    return jax.lax.cond(restart, do, lambda po: po, (params, opt_state))


def warm_start_config(cfg: Config) -> Config:
    """The full-rank phase of a ReLoRA warm start: dense linears, no restarts, the same schedule.

    Only ``model.dense`` and ``relora.every`` change, so the schedule is the run's, which before
    the switch (step ``relora.warm_start``) is the plain warmup + cosine.
    """
    return derive(cfg, model__dense="dense", relora__every=0)


def switch_to_lora(dense_state: TrainState, lora_trainer: Trainer) -> TrainState:
    """The ReLoRA warm-start switch: the full-rank state carried into ``lora_trainer``'s state layout.

    Fresh LoRA factors come from ``lora_trainer.init_state()`` (the run's seed); weights, moments and
    counts are carried over by :func:`lowrank_jax.optim.relora.warm_start_to_lora`.
    """
    fresh = lora_trainer.init_state()
    shardings = lora_trainer.state_shardings
    params, opt_state = jax.jit(warm_start_to_lora, out_shardings=(shardings.params, shardings.opt_state))(
        dense_state.params, dense_state.opt_state, fresh.params, fresh.opt_state
    )
    return TrainState(dense_state.step, params, opt_state, dense_state.rng, dense_state.skipped)
