"""Train state and the jitted train / eval steps, built on a device mesh.

The state is a pytree ``TrainState(step, params, opt_state, rng, skipped)`` with params as a pure
dict. The step is one ``jax.jit`` with explicit in/out shardings and the state donated. Gradients
are accumulated over ``grad_accum`` micro-batches with ``lax.scan``; a step whose loss or gradient
norm is not finite leaves params and optimizer state unchanged and increments ``skipped``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from lowrank_jax import sharding as shd
from lowrank_jax.config import Config
from lowrank_jax.models import build_model, logical_axes, param_labels, split_model
from lowrank_jax.train.optimizer import make_optimizer


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: number of steps taken (the data position)
    params: Any  # pure dict of arrays
    opt_state: Any
    rng: jax.Array  # uint32[2] key data; methods fold in the step
    skipped: jax.Array  # int32 scalar: steps skipped for non-finite loss/grads


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def float_grads(grads: Any, params: Any) -> Any:
    """Integer params (SLTrain's support) get float0 cotangents under ``allow_int``: replace them by
    float32 zeros, which global-norm clipping and optax accept (the frozen partition gives them no state)."""
    return jax.tree.map(lambda g, p: g if _is_float(p) else jnp.zeros(p.shape, jnp.float32), grads, params)


def keep_int_params(new: Any, old: Any) -> Any:
    """Integer params are constants of the model and never change (int32 + a float update would round)."""
    return jax.tree.map(lambda n, o: n if _is_float(o) else o, new, old)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood in nats (float32)."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets_BT[..., None], axis=-1))


@dataclass
class Trainer:
    """Everything compiled for one run: model graph, optimizer, shardings and the jitted steps."""

    cfg: Config
    mesh: Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    abstract_state: Any
    train_step: Callable
    eval_step: Callable

    def init_state(self) -> TrainState:
        """Fresh state from ``cfg.seed``, created directly with the target shardings."""
        return self._init(jax.random.key_data(jax.random.key(self.cfg.seed)))

    def _init(self, raw_key: jax.Array) -> TrainState:
        return jax.jit(self._make_state, out_shardings=self.state_shardings)(raw_key)

    def _make_state(self, raw_key: jax.Array) -> TrainState:
        key = jax.random.wrap_key_data(raw_key)
        _, params = split_model(build_model(self.cfg.model, jax.random.fold_in(key, 0)))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=raw_key,
            skipped=jnp.zeros((), jnp.int32),
        )

    def put_batch(self, batch: Any) -> jax.Array:
        """The global batch on the mesh (on several hosts each contributes only its own rows)."""
        return shd.global_batch(np.asarray(batch, np.int32), shd.batch_sharding(self.mesh))


def make_trainer(cfg: Config, mesh: Mesh | None = None) -> Trainer:
    """Build optimizer, shardings and jitted steps for ``cfg`` without allocating parameters."""
    mesh = mesh if mesh is not None else shd.make_mesh(cfg.mesh)
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // cfg.grad_accum
    if micro % n_batch_shards:
        raise ValueError(
            f"batch_size: micro-batch {micro} (batch_size/grad_accum) does not divide over {n_batch_shards} data shards"
        )
    model_cfg = cfg.model
    abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, 0))
    graphdef, abstract_params = split_model(abstract_model)
    if cfg.layerwise_update:
        from lowrank_jax.train.layerwise import layerwise_optimizer  # noqa: PLC0415

        tx, schedule = layerwise_optimizer(cfg)
    else:
        tx, schedule = make_optimizer(cfg, abstract_params)

    logical = logical_axes(model_cfg)
    param_shardings = shd.tree_shardings(logical, abstract_params, mesh)
    repl = shd.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    state_shardings = TrainState(
        step=repl,
        params=param_shardings,
        opt_state=shd.state_shardings(abstract_opt, abstract_params, logical, mesh),
        rng=repl,
        skipped=repl,
    )
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        TrainState(
            jax.ShapeDtypeStruct((), jnp.int32),
            abstract_params,
            abstract_opt,
            jax.ShapeDtypeStruct((2,), jnp.uint32),
            jax.ShapeDtypeStruct((), jnp.int32),
        ),
        state_shardings,
    )

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])

    def step_fn(state: TrainState, batch: jax.Array):
        def loss_and_grads(tokens):
            loss, grads = jax.value_and_grad(loss_fn, allow_int=True)(state.params, tokens)
            return loss, float_grads(grads, state.params)

        if cfg.grad_accum == 1:
            loss, grads = loss_and_grads(batch)
        else:
            micro_batches = batch.reshape(cfg.grad_accum, micro, batch.shape[-1])

            def accumulate(carry, mb):
                loss_sum, grad_sum = carry
                loss, grads = loss_and_grads(mb)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = float_grads(jax.tree.map(jnp.zeros_like, state.params), state.params)
            (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro_batches)
            loss = loss / cfg.grad_accum
            grads = jax.tree.map(lambda g: g / cfg.grad_accum, grads)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = keep_int_params(optax.apply_updates(state.params, updates), state.params)
        if cfg.relora.every:
            params, opt_state = _maybe_restart(cfg, state.step + 1, params, opt_state, state.rng)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        return finish_step(state, params, opt_state, ok, loss, grad_norm, schedule)

    if cfg.layerwise_update:
        from lowrank_jax.train.layerwise import make_layerwise_step  # noqa: PLC0415

        step_fn = make_layerwise_step(cfg, graphdef, tx, schedule)  # noqa: F811

    def eval_fn(params, batch):
        logits = nnx.merge(graphdef, params)(batch[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)
        return jnp.sum(nll), nll.size

    batch_shard = shd.batch_sharding(mesh)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shard),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
    )
    eval_step = jax.jit(eval_fn, in_shardings=(param_shardings, batch_shard), out_shardings=repl)
    return Trainer(cfg, mesh, graphdef, tx, schedule, state_shardings, abstract_state, train_step, eval_step)


def finish_step(
    state: TrainState, params: Any, opt_state: Any, ok: jax.Array, loss: jax.Array, grad_norm: jax.Array, schedule
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The next state (``params``/``opt_state`` already left unchanged where ``ok`` is false) and the step metrics."""
    skipped = (~ok).astype(jnp.int32)
    new_state = TrainState(state.step + 1, params, opt_state, state.rng, state.skipped + skipped)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step - state.skipped), "skipped": skipped}
    return new_state, metrics


def _maybe_restart(cfg: Config, new_step: jax.Array, params: Any, opt_state: Any, raw_key: jax.Array):
    """ReLoRA: right after the update taken at lr 0 (steps F + k·every), merge, re-init and prune.

    ``F`` is the warm-start step (the switch to LoRA) or ``every``; at the switch ``B = 0``, so the
    merge changes nothing and only re-draws ``A`` and prunes the one lr-0 step of factor moments.
    """
    from lowrank_jax.optim.relora import relora_restart  # noqa: PLC0415

    r, m = cfg.relora, cfg.model
    labels = param_labels(m)
    since_first = new_step - 1 - (r.warm_start or r.every)  # restarts at F, F + every, ... (F: first)
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

    Only ``model.dense`` and ``relora.every`` change, so :func:`make_schedule` gives the run's
    schedule, which before the switch (step ``relora.warm_start``) is the plain warmup + cosine.
    """
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dense="dense"),
        relora=dataclasses.replace(cfg.relora, every=0),
    )


def switch_to_lora(dense_state: TrainState, lora_trainer: Trainer) -> TrainState:
    """The ReLoRA warm-start switch: the full-rank state carried into ``lora_trainer``'s state layout.

    Fresh LoRA factors come from ``lora_trainer.init_state()`` (the run's seed); weights, moments and
    counts are carried over by :func:`lowrank_jax.optim.relora.warm_start_to_lora`.
    """
    from lowrank_jax.optim.relora import warm_start_to_lora  # noqa: PLC0415

    fresh = lora_trainer.init_state()
    shardings = lora_trainer.state_shardings
    params, opt_state = jax.jit(warm_start_to_lora, out_shardings=(shardings.params, shardings.opt_state))(
        dense_state.params, dense_state.opt_state, fresh.params, fresh.opt_state
    )
    return TrainState(dense_state.step, params, opt_state, dense_state.rng, dense_state.skipped)


def evaluate(trainer: Trainer, params: Any, batches: list) -> float:
    """Mean validation NLL (nats/token) over the fixed held-out batches."""
    total, count = 0.0, 0
    for b in batches:
        s, n = trainer.eval_step(params, trainer.put_batch(b))
        total += float(s)
        count += int(n)
    return total / count


def compiled_memory(compiled: Any) -> dict[str, int]:
    """XLA's memory analysis of a compiled executable (per device, bytes); ``{}`` where unsupported."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    keys = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    out = {k: int(getattr(ma, k, 0)) for k in keys}
    out["peak_estimate_bytes"] = (
        out["argument_size_in_bytes"]
        + out["output_size_in_bytes"]
        + out["temp_size_in_bytes"]
        - out["alias_size_in_bytes"]
    )
    return out


def batch_abstract(trainer: Trainer) -> jax.ShapeDtypeStruct:
    """The abstract global batch ``(batch_size, seq_len + 1)`` int32 with its sharding."""
    cfg = trainer.cfg
    return jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + 1), jnp.int32, sharding=shd.batch_sharding(trainer.mesh))


def compile_train_step(trainer: Trainer) -> Any:
    """Ahead-of-time compiled train step (nothing allocated); call it like ``trainer.train_step``."""
    return trainer.train_step.lower(trainer.abstract_state, batch_abstract(trainer)).compile()


def memory_report(trainer: Trainer) -> dict[str, int]:
    """XLA's memory analysis of the compiled train step (per device, bytes); nothing is allocated."""
    return compiled_memory(compile_train_step(trainer))
