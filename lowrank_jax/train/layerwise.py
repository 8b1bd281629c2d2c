"""Per-layer fused optimizer update: each block's weights are updated inside the backward pass.

GaLore (Zhao et al., ICML 2024, arXiv 2403.03507, §4.3) trains LLaMA-7B on one 24 GB GPU by
stepping every weight as soon as its gradient exists, so the full gradient never lives in memory.
The official code does it with PyTorch gradient hooks, which (a) step the optimizer on every
micro-batch, breaking gradient accumulation, and (b) silently skip gradient clipping. This module
does it in one jitted function over the scanned (``model.scan_layers``) LLaMA::

    forward   for each micro-batch a: x₀ = embed(tokens_a); x_{l+1} = block_l(x_l), keeping the
              layer inputs x_l (what remat keeps anyway); loss_a and (∂head, ∂x_L) from the head's vjp
    pass 1    (only with optim.grad_clip > 0) reverse loop over layers, vjp of block l per
              micro-batch, summing only ‖∂θ_l‖²; then ‖∂embed‖², ‖∂head‖²  →  global norm, clip factor c
    pass 2    reverse loop over layers l = L−1 … 0: ∂θ_l = Σ_a vjp_l(x_l^a, ∂x_{l+1}^a) (the gradient of
              the *whole* accumulated batch, so the update happens only at the accumulation
              boundary), θ_l, s_l ← opt(c·∂θ_l, s_l, θ_l) written back in place; finally embed,
              final norm and lm_head get their update with c·∂
    skip      a non-finite loss or global norm leaves params and optimizer state unchanged

Memory: one block's gradient and optimizer temporaries at a time instead of a params-sized
gradient pytree (plus the one embedding and head gradient); the layer inputs of every
micro-batch of the step are kept (with ``grad_accum`` > 1 that is the activation checkpoint of the
whole batch, the price of exact accumulation without a gradient accumulator). Compute: with
clipping, pass 1 repeats the backward once (≈ 1.75× a rematerialised step); without clipping
(``optim.grad_clip=0``) there is one pass and only the loss is checked for finiteness before updating.

The optimizer is the run's optimizer (``optim.name``) built twice: once for the non-block leaves
and once for one block's leaves, whose state is ``vmap``-initialised with a leading ``layers``
axis (:class:`LayerwiseOptState`). Element-wise optimizers (AdamW, 8-bit Adam, GaLore with
``refresh='all'``) give the same trajectory as the ordinary step; GaLore's ``refresh='staggered'``
staggers over the 7 matrices of a block instead of over all matrices, and 8-bit moments are
quantized per layer (the same blocks as the stacked leaf when a layer's matrix is a multiple of
the block size, and only matrices of at least ``min_size`` values per layer are quantized).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lowrank_jax.config import Config
from lowrank_jax.models import build_model, param_labels
from lowrank_jax.train.optimizer import make_optimizer
from lowrank_jax.train.step import cross_entropy, finish_step, float_grads, keep_int_params

BLOCKS = "blocks"


class LayerwiseOptState(NamedTuple):
    rest: Any  # optimizer state of the non-block leaves (embed, final_norm, lm_head)
    blocks: Any  # optimizer state of one block's leaves, stacked on a leading layers axis


def split_blocks(tree: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(everything but 'blocks', tree['blocks'])``."""
    return {k: v for k, v in tree.items() if k != BLOCKS}, tree[BLOCKS]


@dataclass(frozen=True)
class LayerwiseOptimizer:
    """The run's optimizer for the non-block leaves (``rest``) and for one block (``block``)."""

    rest: optax.GradientTransformation
    block: optax.GradientTransformation

    def init(self, params: dict[str, Any]) -> LayerwiseOptState:
        rest, blocks = split_blocks(params)
        return LayerwiseOptState(self.rest.init(rest), jax.vmap(lambda b: self.block.init({BLOCKS: b}))(blocks))


def layerwise_optimizer(cfg: Config) -> tuple[LayerwiseOptimizer, optax.Schedule]:
    """The two optimizers (without clipping, which the step applies with the global norm) and the schedule."""
    rest_labels, block_labels = split_blocks(param_labels(cfg.model))
    tx_rest, schedule = make_optimizer(cfg, None, labels=rest_labels, clip=False)
    # the block optimizer sees one layer at a time: no leading layers axis (weight-decay mask)
    one_layer = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
    tx_block, _ = make_optimizer(one_layer, None, labels={BLOCKS: block_labels}, clip=False)
    return LayerwiseOptimizer(tx_rest, tx_block), schedule


def _sumsq(tree: Any) -> jax.Array:
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


def make_layerwise_step(
    cfg: Config, graphdef: nnx.GraphDef, opt: LayerwiseOptimizer, schedule: optax.Schedule
) -> Callable:
    """``step(state, batch) -> (state, metrics)`` with the per-layer fused update (see the module doc).

    The state is a :class:`~lowrank_jax.train.step.TrainState`; metrics match the ordinary step's.
    """
    if not cfg.model.scan_layers:
        raise ValueError("layerwise_update: needs model.scan_layers=true (the blocks stacked on a layers axis)")
    accum, max_norm = cfg.grad_accum, cfg.optim.grad_clip
    block_graphdef, block_template = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model, 0)).blocks)

    def step(state: Any, batch: jax.Array):
        params = state.params
        rest, blocks = split_blocks(params)
        head = {k: v for k, v in rest.items() if k != "embed"}  # final_norm, lm_head

        def model_with(overrides: dict[str, Any]):
            return nnx.merge(graphdef, {**params, **overrides})

        cos, sin = model_with({}).rope(batch.shape[-1] - 1)

        def block_fn(layer: Any, h: jax.Array) -> jax.Array:  # int leaves (SL support) get float0 cotangents
            layer_state = nnx.State(jax.tree.map(lambda x: x, block_template))
            layer_state.replace_by_pure_dict(layer)
            return nnx.merge(block_graphdef, layer_state)(h, cos, sin)

        def embed_fn(embed: jax.Array, tokens: jax.Array) -> jax.Array:
            return model_with({"embed": embed}).embed_tokens(tokens)

        def head_loss(head: dict[str, Any], x: jax.Array, targets: jax.Array) -> jax.Array:
            return cross_entropy(model_with(head).head(x), targets)

        micro = batch.reshape(accum, batch.shape[0] // accum, batch.shape[-1])

        def forward(carry, tokens):
            loss_sum, dhead_sum = carry
            x0 = embed_fn(rest["embed"], tokens[:, :-1])
            x_last, inputs = jax.lax.scan(lambda h, layer: (block_fn(layer, h), h), x0, blocks)
            loss, head_vjp = jax.vjp(lambda hd, x: head_loss(hd, x, tokens[:, 1:]), head, x_last)
            dhead, dx = head_vjp(jnp.asarray(1.0 / accum, loss.dtype))
            return (loss_sum + loss, jax.tree.map(jnp.add, dhead_sum, dhead)), (inputs, dx)

        zero_head = jax.tree.map(jnp.zeros_like, head)
        (loss, dhead), (inputs_ALBTD, dx_ABTD) = jax.lax.scan(forward, (jnp.zeros((), jnp.float32), zero_head), micro)
        loss = loss / accum
        inputs_LABTD = jnp.swapaxes(inputs_ALBTD, 0, 1)

        def layer_grad(layer: Any, inputs_ABTD: jax.Array, dh_ABTD: jax.Array):
            """Σ over micro-batches of block l's parameter gradient, and the cotangents of its inputs."""

            def one(acc, x):
                h, d = x
                _, vjp = jax.vjp(block_fn, layer, h)
                g, dh_in = vjp(d)
                return jax.tree.map(jnp.add, acc, float_grads(g, layer)), dh_in

            zeros = float_grads(jax.tree.map(jnp.zeros_like, layer), layer)
            return jax.lax.scan(one, zeros, (inputs_ABTD, dh_ABTD))

        def embed_grad(dh_ABTD: jax.Array) -> jax.Array:
            def one(acc, x):
                tokens, d = x
                _, vjp = jax.vjp(lambda e: embed_fn(e, tokens[:, :-1]), rest["embed"])
                return acc + vjp(d)[0], None

            return jax.lax.scan(one, jnp.zeros_like(rest["embed"]), (micro, dh_ABTD))[0]

        def clip_factor(norm: jax.Array) -> jax.Array:  # optax.clip_by_global_norm (max_norm > 0)
            return jnp.where(norm < max_norm, 1.0, max_norm / norm)

        def scaled(tree: Any, c: jax.Array) -> Any:
            return jax.tree.map(lambda g: (g.astype(jnp.float32) * c).astype(g.dtype), tree)

        def norm_pass() -> jax.Array:
            def body(carry, x):
                dh, sq = carry
                g, dh = layer_grad(*x, dh)
                return (dh, sq + _sumsq(g)), None

            (dh0, sq), _ = jax.lax.scan(body, (dx_ABTD, _sumsq(dhead)), (blocks, inputs_LABTD), reverse=True)
            return jnp.sqrt(sq + _sumsq(embed_grad(dh0)))

        def update_pass(c: jax.Array, ok: jax.Array):
            """Backward with in-place updates; where ``ok`` is false every slice is written back unchanged."""

            def select(new: Any, old: Any) -> Any:
                return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

            def body(carry, x):
                blk, blk_state, dh, sq = carry
                index, inputs_ABTD = x
                layer = jax.tree.map(lambda a: a[index], blk)
                g, dh = layer_grad(layer, inputs_ABTD, dh)
                layer_state = jax.tree.map(lambda a: a[index], blk_state)
                updates, new_state = opt.block.update({BLOCKS: scaled(g, c)}, layer_state, {BLOCKS: layer})
                new_layer = select(keep_int_params(optax.apply_updates(layer, updates[BLOCKS]), layer), layer)
                new_state = select(new_state, layer_state)
                put = lambda full, part: jax.lax.dynamic_update_index_in_dim(full, part, index, 0)  # noqa: E731
                carry = (jax.tree.map(put, blk, new_layer), jax.tree.map(put, blk_state, new_state), dh, sq + _sumsq(g))
                return carry, None

            n_layers = jax.tree.leaves(blocks)[0].shape[0]
            init = (blocks, state.opt_state.blocks, dx_ABTD, _sumsq(dhead))
            (new_blocks, new_blocks_state, dh0, sq), _ = jax.lax.scan(
                body, init, (jnp.arange(n_layers), inputs_LABTD), reverse=True
            )
            grads_rest = {"embed": embed_grad(dh0), **dhead}
            updates, rest_state = opt.rest.update(scaled(grads_rest, c), state.opt_state.rest, rest)
            new_rest = select(optax.apply_updates(rest, updates), rest)
            new_opt = LayerwiseOptState(select(rest_state, state.opt_state.rest), new_blocks_state)
            return {**new_rest, BLOCKS: new_blocks}, new_opt, jnp.sqrt(sq + _sumsq(grads_rest["embed"]))

        # No lax.cond around the update: a cond's operands cannot be updated in place, which would copy
        # every block's weights and state; a skipped step writes each slice back unchanged instead.
        if max_norm > 0:
            grad_norm = norm_pass()
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new_params, new_opt, _ = update_pass(clip_factor(grad_norm), ok)
        else:
            ok = jnp.isfinite(loss)
            new_params, new_opt, grad_norm = update_pass(jnp.ones((), jnp.float32), ok)
        return finish_step(state, new_params, new_opt, ok, loss, grad_norm, schedule)

    return step
