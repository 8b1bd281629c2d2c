"""The jitted train and eval steps of a run, built on a device mesh.

The step is one ``jax.jit`` with explicit in/out shardings and the state
(:class:`~lowrank_jax.train.state.TrainState`) donated. Gradients are accumulated over
``grad_accum`` micro-batches with ``lax.scan``; a step whose loss or gradient norm is not finite
leaves params and optimizer state unchanged and increments ``skipped``. With
``layerwise_update`` the step is :func:`lowrank_jax.train.layerwise.make_layerwise_step` instead;
ReLoRA restarts run inside the step (:func:`lowrank_jax.train.relora.maybe_restart`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from lowrank_jax import sharding as shd
from lowrank_jax.config import Config
from lowrank_jax.models import build_model, logical_axes, param_labels, split_model
from lowrank_jax.train.layerwise import layerwise_optimizer, make_layerwise_step
from lowrank_jax.train.optimizer import make_optimizer
from lowrank_jax.train.relora import maybe_restart, switch_to_lora, warm_start_config
from lowrank_jax.train.state import TrainState, cross_entropy, finish_step, float_grads, keep_int_params, nll_sum


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
    health_step: Callable  # (params, batch) -> (embedding RMS, residual-stream RMS after each block)

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

    def put_rows(self, rows: np.ndarray, batch_size: int) -> jax.Array:
        """The global ``(batch_size, ...)`` batch from this process's own rows (``host_rows`` of the data sharding)."""
        return shd.batch_from_rows(np.asarray(rows, np.int32), shd.batch_sharding(self.mesh), batch_size)


def make_trainer(cfg: Config, mesh: Mesh | None = None) -> Trainer:
    """Build optimizer, shardings and jitted steps for ``cfg`` without allocating parameters."""
    mesh = mesh if mesh is not None else shd.make_mesh(cfg.mesh)
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // cfg.grad_accum
    if micro % n_batch_shards:
        raise ValueError(
            f"batch_size: micro-batch {micro} (batch_size/grad_accum) does not divide over {n_batch_shards} data shards"
        )
    abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, 0))  # the only model built: nothing allocated
    graphdef, model_state = nnx.split(abstract_model)
    abstract_params = model_state.to_pure_dict()
    labels, logical = param_labels(model_state), logical_axes(model_state)
    if cfg.layerwise_update:
        tx, schedule = layerwise_optimizer(cfg, abstract_params, labels)
    else:
        tx, schedule = make_optimizer(cfg, abstract_params, labels=labels)

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

    if cfg.layerwise_update:
        step_fn = make_layerwise_step(cfg, graphdef, abstract_model, tx, schedule)
    else:
        step_fn = make_step(cfg, graphdef, tx, schedule, labels)

    def eval_fn(params, batch):
        return nll_sum(nnx.merge(graphdef, params)(batch[:, :-1]), batch[:, 1:])

    batch_shard = shd.batch_sharding(mesh)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shard),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
    )
    eval_step = jax.jit(eval_fn, in_shardings=(param_shardings, batch_shard), out_shardings=repl)
    health_step = jax.jit(
        lambda params, batch: nnx.merge(graphdef, params).residual_rms(batch[:, :-1]),
        in_shardings=(param_shardings, batch_shard),
        out_shardings=repl,
    )
    return Trainer(
        cfg, mesh, graphdef, tx, schedule, state_shardings, abstract_state, train_step, eval_step, health_step
    )


def make_step(
    cfg: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule, labels: Any
) -> Callable:
    """``step(state, batch) -> (state, metrics)``: the ``grad_accum`` micro-batches' mean gradient, one update.

    A step whose loss or gradient norm is not finite keeps params and optimizer state; ReLoRA
    restarts (``relora.every``) run after the update. ``labels`` are the params' Variable class names.
    """
    micro = cfg.batch_size // cfg.grad_accum

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])

    def loss_and_grads(params, tokens):
        loss, grads = jax.value_and_grad(loss_fn, allow_int=True)(params, tokens)
        return loss, float_grads(grads, params)

    def keep(ok, new, old):
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    def step_fn(state: TrainState, batch: jax.Array):
        if cfg.grad_accum == 1:
            loss, grads = loss_and_grads(state.params, batch)
        else:
            micro_batches = batch.reshape(cfg.grad_accum, micro, batch.shape[-1])

            def accumulate(carry, mb):
                loss_sum, grad_sum = carry
                loss, grads = loss_and_grads(state.params, mb)
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
            params, opt_state = maybe_restart(cfg, state.step + 1, params, opt_state, state.rng, labels)
        params, opt_state = keep(ok, params, state.params), keep(ok, opt_state, state.opt_state)
        return finish_step(state, params, opt_state, ok, loss, grad_norm, schedule)

    return step_fn


def evaluate(trainer: Trainer, params: Any, batches: list) -> float:
    """Mean validation NLL (nats/token) over the fixed held-out batches."""
    total, count = 0.0, 0
    for b in batches:
        s, n = trainer.eval_step(params, trainer.put_batch(b))
        total += float(s)
        count += int(n)
    return total / count


def health(trainer: Trainer, params: Any, batch: Any) -> dict[str, Any]:
    """``embed_rms``, ``block_rms`` (per block) and ``max_block_rms_ratio`` (largest block RMS over the
    embedding RMS) on one batch: what :mod:`lowrank_jax.train.loop` logs at every evaluation."""
    embed, blocks = jax.device_get(trainer.health_step(params, trainer.put_batch(batch)))
    blocks = [float(b) for b in blocks]
    return {"embed_rms": float(embed), "block_rms": blocks, "max_block_rms_ratio": max(blocks) / float(embed)}


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


@dataclass(frozen=True)
class Phases:
    """A run's compiled steps: with ``relora.warm_start`` the full-rank ``warm`` trainer runs steps
    ``[0, switch)``, then the state moves into ``trainer``'s LoRA layout and ``trainer`` runs the rest.

    :meth:`trainers` builds the trainers, :meth:`compile` their AOT-compiled steps; :meth:`advance` runs one
    step, switching first when ``step == switch``. The training loop and the sweep's canaries step through it.
    """

    trainer: Trainer
    step_fn: Any
    warm: Trainer | None = None
    warm_step_fn: Any = None
    switch: int = 0

    @staticmethod
    def trainers(cfg: Config) -> tuple[Trainer, Trainer | None]:
        """``cfg``'s trainer and, with a warm start, the full-rank trainer of its first phase."""
        return make_trainer(cfg), make_trainer(warm_start_config(cfg)) if cfg.relora.warm_start else None

    @classmethod
    def compile(cls, cfg: Config, trainer: Trainer, warm: Trainer | None) -> Phases:
        step_fn = compile_train_step(trainer)
        warm_step_fn = compile_train_step(warm) if warm is not None else None
        return cls(trainer, step_fn, warm, warm_step_fn, cfg.relora.warm_start)

    def phase(self, step: int) -> tuple[Trainer, Any]:
        """(trainer, compiled step) that runs ``step``: the full-rank phase before the switch."""
        if self.warm is not None and step < self.switch:
            return self.warm, self.warm_step_fn
        return self.trainer, self.step_fn

    def init_state(self) -> TrainState:
        return self.phase(0)[0].init_state()

    def switch_if_due(self, state: TrainState, step: int) -> tuple[TrainState, bool]:
        """Before ``step``: the state in ``trainer``'s layout if ``step`` is the switch; whether it switched."""
        if self.warm is not None and step == self.switch:
            return switch_to_lora(state, self.trainer), True
        return state, False

    def run_step(self, state: TrainState, step: int, rows: np.ndarray, batch_size: int) -> tuple[TrainState, Any]:
        """Run ``step``'s phase on this process's ``rows`` (the switch already made): ``(state, metrics)``."""
        return self.phase(step)[1](state, self.trainer.put_rows(rows, batch_size))

    def advance(self, state: TrainState, step: int, rows: np.ndarray, batch_size: int) -> tuple[TrainState, Any]:
        """:meth:`switch_if_due`, then :meth:`run_step`."""
        state, _ = self.switch_if_due(state, step)
        return self.run_step(state, step, rows, batch_size)


def memory_report(trainer: Trainer) -> dict[str, int]:
    """XLA's memory analysis of the compiled train step (per device, bytes); nothing is allocated."""
    return compiled_memory(compile_train_step(trainer))
