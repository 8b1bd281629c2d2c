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
    pass 2    first final norm and lm_head get their update with c·∂ (so their gradient is dead before
              the layers' backward); then a reverse loop over layers l = L−1 … 0: ∂θ_l = Σ_a
              vjp_l(x_l^a, ∂x_{l+1}^a) (the gradient of the *whole* accumulated batch, so the update
              happens only at the accumulation boundary), θ_l, s_l ← opt(c·∂θ_l, s_l, θ_l) written
              back in place; finally the embedding
    skip      a non-finite loss or global norm leaves params and optimizer state unchanged

The non-block leaves are updated in row chunks of at most :data:`CHUNK_VALUES` values (the
embedding and lm_head of a 7B model are 131M values each): chunk by chunk, in place, with the
optimizer state of one chunk. The embedding's gradient is never whole: chunk ``i`` is the
lookup's vjp restricted to its rows.

Memory: one block's gradient and optimizer temporaries at a time instead of a params-sized
gradient pytree (plus the lm_head gradient, until its update); the layer inputs of every
micro-batch of the step are kept (with ``grad_accum`` > 1 that is the activation checkpoint of the
whole batch, the price of exact accumulation without a gradient accumulator). Compute: with
clipping, pass 1 repeats the backward once (≈ 1.75× a rematerialised step); without clipping
(``optim.grad_clip=0``) there is one pass and only the loss is checked for finiteness before updating.

The optimizer is the run's optimizer (``optim.name``) built for one chunk of each non-block leaf
and for one block's leaves; their states are ``vmap``-initialised with a leading chunks /
``layers`` axis (:class:`LayerwiseOptState`). AdamW, 8-bit Adam, GaLore (``refresh='all'`` or
``'staggered'``), APOLLO and GoLore give the same trajectory as the ordinary step (each layer's state numbers
its matrices as the stacked model does, see :func:`_number_layers`); 8-bit moments are
quantized per layer and per chunk (the same blocks as the whole leaf when a layer's matrix is a
multiple of the block size, and only matrices of at least ``min_size`` values per layer are
quantized; chunks are whole rows and multiples of 256 values).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lowrank_jax.config import Config, derive
from lowrank_jax.optim.tree import map_namedtuples
from lowrank_jax.train.optimizer import make_optimizer
from lowrank_jax.train.state import cross_entropy, finish_step, float_grads, keep_int_params

BLOCKS = "blocks"


# Non-block leaves (embedding, lm_head) are updated in chunks of at most this many values.
CHUNK_VALUES = 1 << 22


class LayerwiseOptState(NamedTuple):
    rest: Any  # {non-block leaf name: optimizer state of one chunk of it, stacked on a leading chunks axis}
    blocks: Any  # optimizer state of one block's leaves, stacked on a leading layers axis


def split_blocks(tree: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(everything but 'blocks', tree['blocks'])``."""
    return {k: v for k, v in tree.items() if k != BLOCKS}, tree[BLOCKS]


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    """``{'lm_head/kernel': leaf, ...}`` of a nested dict."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: not isinstance(x, dict))[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}


def _nest(name: str, leaf: Any) -> dict[str, Any]:
    """``'lm_head/kernel', x`` → ``{'lm_head': {'kernel': x}}``."""
    for key in reversed(name.split("/")):
        leaf = {key: leaf}
    return leaf


def _unflat(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_flat`."""
    out: dict[str, Any] = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return out


def _leaf(name: str, tree: dict[str, Any]) -> Any:
    for key in name.split("/"):
        tree = tree[key]
    return tree


@dataclass(frozen=True)
class Chunking:
    """A non-block leaf updated ``n`` row slices of ``size`` rows at a time."""

    n: int
    size: int

    def split(self, x: jax.Array) -> jax.Array:
        """``(n, size, ...)``: the row slices stacked on a new leading axis."""
        return x.reshape(self.n, self.size, *x.shape[1:])

    def get(self, x: jax.Array, i: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(x, i * self.size, self.size, 0)

    def put(self, x: jax.Array, part: jax.Array, i: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(x, part, i * self.size, 0)


def chunking(shape: tuple[int, ...]) -> Chunking:
    """The fewest equal row slices of at most :data:`CHUNK_VALUES` values each.

    Rows are contiguous and every slice of several holds a multiple of 256 values, so 8-bit Adam's
    blocks fall exactly as in the whole leaf; a leaf that cannot be cut so is one chunk.
    """
    rows, total = (shape[0] if shape else 1), math.prod(shape)
    for n in range(2, rows + 1) if total > CHUNK_VALUES else ():
        if rows % n == 0 and total // n <= CHUNK_VALUES and (total // n) % 256 == 0:
            return Chunking(n, rows // n)
    return Chunking(1, rows)


@dataclass(frozen=True)
class LayerwiseOptimizer:
    """The run's optimizer for one chunk of each non-block leaf (``rest``) and for one block (``block``)."""

    rest: dict[str, tuple[optax.GradientTransformation, Chunking]]
    block: optax.GradientTransformation

    def init(self, params: dict[str, Any]) -> LayerwiseOptState:
        rest, blocks = split_blocks(params)
        flat = _flat(rest)

        def init_rest(name: str) -> Any:
            tx, ch = self.rest[name]
            return jax.vmap(lambda x: tx.init(_nest(name, x)))(ch.split(flat[name]))

        block_state = _number_layers(jax.vmap(lambda b: self.block.init({BLOCKS: b}))(blocks))
        return LayerwiseOptState({name: init_rest(name) for name in self.rest}, block_state)


def _number_layers(block_state: Any) -> Any:
    """Layer ``l`` of ``L`` numbers its matrices ``(l, L)``: the indices they have in the stacked model.

    Random projections (APOLLO, GoLore, randomized SVD) and staggered refresh offsets follow a state's
    ``numbering = (offset, stride)`` field (:func:`lowrank_jax.optim.projection.matrix_indices`).
    """

    def visit(nt: Any) -> dict[str, Any]:
        if "numbering" not in nt._fields:
            return {}
        layers = nt.numbering.shape[0]
        return {"numbering": jnp.stack([jnp.arange(layers), jnp.full(layers, layers)], axis=-1).astype(jnp.int32)}

    return map_namedtuples(block_state, visit)


def layerwise_optimizer(cfg: Config, params: Any, labels: Any) -> tuple[LayerwiseOptimizer, optax.Schedule]:
    """The optimizers (without clipping, which the step applies with the global norm) and the schedule.

    ``params`` (abstract) and ``labels`` (Variable class names) are the whole model's.
    """
    rest_labels, block_labels = split_blocks(labels)
    rest = {}
    for name, x in _flat(split_blocks(params)[0]).items():
        tx, _ = make_optimizer(cfg, None, labels=_nest(name, _leaf(name, rest_labels)), clip=False)
        rest[name] = (tx, chunking(x.shape))
    # the block optimizer sees one layer at a time: no leading layers axis (weight-decay mask)
    one_layer = derive(cfg, model__scan_layers=False)
    tx_block, schedule = make_optimizer(one_layer, None, labels={BLOCKS: block_labels}, clip=False)
    return LayerwiseOptimizer(rest, tx_block), schedule


def _sumsq(tree: Any) -> jax.Array:
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


@dataclass(frozen=True)
class _Model:
    """The static pieces of the step: the model's graph, one block's graph and state template, the optimizers."""

    graphdef: nnx.GraphDef
    block_graphdef: nnx.GraphDef
    block_template: Any
    opt: LayerwiseOptimizer
    accum: int  # micro-batches per step (``grad_accum``)
    max_norm: float  # ``optim.grad_clip``; 0: no clipping


@dataclass(frozen=True)
class _Batch:
    """What the passes of one step read: the static pieces, the params before the step, the rope tables and
    the micro-batches ``(accum, rows, T + 1)``."""

    model: _Model
    params: dict[str, Any]
    cos: jax.Array
    sin: jax.Array
    micro: jax.Array

    @property
    def rest(self) -> dict[str, Any]:
        return split_blocks(self.params)[0]

    @property
    def blocks(self) -> Any:
        return split_blocks(self.params)[1]


def _model_with(model: _Model, params: dict[str, Any], overrides: dict[str, Any]) -> nnx.Module:
    return nnx.merge(model.graphdef, {**params, **overrides})


def _batch(model: _Model, params: dict[str, Any], batch: jax.Array) -> _Batch:
    cos, sin = _model_with(model, params, {}).rope(batch.shape[-1] - 1)
    micro = batch.reshape(model.accum, batch.shape[0] // model.accum, batch.shape[-1])
    return _Batch(model, params, cos, sin, micro)


def _block_fn(b: _Batch, layer: Any, h: jax.Array) -> jax.Array:
    """Block ``layer`` applied to ``h`` (int leaves, the SL support, get float0 cotangents)."""
    layer_state = nnx.State(jax.tree.map(lambda x: x, b.model.block_template))
    layer_state.replace_by_pure_dict(layer)
    return nnx.merge(b.model.block_graphdef, layer_state)(h, b.cos, b.sin)


def _head_loss(b: _Batch, head: dict[str, Any], x: jax.Array, targets: jax.Array) -> jax.Array:
    return cross_entropy(_model_with(b.model, b.params, head).head(x), targets)


def _forward_micro(b: _Batch, head: dict[str, Any], carry: tuple, tokens: jax.Array):
    """One micro-batch: its loss and head gradient added to ``carry``; the layer inputs and ∂x_L kept."""
    loss_sum, dhead_sum = carry
    x0 = _model_with(b.model, b.params, {"embed": b.rest["embed"]}).embed_tokens(tokens[:, :-1])
    x_last, inputs = jax.lax.scan(lambda h, layer: (_block_fn(b, layer, h), h), x0, b.blocks)
    loss, head_vjp = jax.vjp(lambda hd, x: _head_loss(b, hd, x, tokens[:, 1:]), head, x_last)
    dhead, dx = head_vjp(jnp.asarray(1.0 / b.model.accum, loss.dtype))
    return (loss_sum + loss, jax.tree.map(jnp.add, dhead_sum, dhead)), (inputs, dx)


def _forward(b: _Batch) -> tuple[jax.Array, dict[str, Any], jax.Array, jax.Array]:
    """``(loss, ∂head, layer inputs (L, A, B, T, D), ∂x_L (A, B, T, D))`` over the micro-batches."""
    head = {k: v for k, v in b.rest.items() if k != "embed"}  # final_norm, lm_head
    zero_head = jax.tree.map(jnp.zeros_like, head)
    init = (jnp.zeros((), jnp.float32), zero_head)
    (loss, dhead), (inputs_ALBTD, dx_ABTD) = jax.lax.scan(partial(_forward_micro, b, head), init, b.micro)
    return loss / b.model.accum, dhead, jnp.swapaxes(inputs_ALBTD, 0, 1), dx_ABTD


def _layer_grad_micro(b: _Batch, layer: Any, acc: Any, x: tuple[jax.Array, jax.Array]):
    h, d = x
    _, vjp = jax.vjp(partial(_block_fn, b), layer, h)
    g, dh_in = vjp(d)
    return jax.tree.map(jnp.add, acc, float_grads(g, layer)), dh_in


def _layer_grad(b: _Batch, layer: Any, inputs_ABTD: jax.Array, dh_ABTD: jax.Array):
    """Σ over micro-batches of block l's parameter gradient, and the cotangents of its inputs."""
    zeros = float_grads(jax.tree.map(jnp.zeros_like, layer), layer)
    return jax.lax.scan(partial(_layer_grad_micro, b, layer), zeros, (inputs_ABTD, dh_ABTD))


def _embed_grad(b: _Batch, dh_ABTD: jax.Array, i: jax.Array) -> jax.Array:
    """Chunk ``i`` of the embedding's gradient: the vjp of the lookup, rows outside the chunk dropped."""
    ch, table = b.model.opt.rest["embed"][1], b.rest["embed"]
    tokens = b.micro[..., :-1].reshape(-1) - i * ch.size
    rows = jnp.where((tokens >= 0) & (tokens < ch.size), tokens, ch.size)
    d = dh_ABTD.reshape(-1, table.shape[-1]).astype(table.dtype)
    return jnp.zeros((ch.size, table.shape[-1]), table.dtype).at[rows].add(d, mode="drop")


def _rest_grads(b: _Batch, dhead: dict[str, Any], dh0: Any) -> dict[str, Callable[[jax.Array], jax.Array]]:
    """Per non-block leaf, ``i ->`` chunk ``i`` of its gradient (``dh0``: cotangents of the embeddings)."""
    out = {name: partial(b.model.opt.rest[name][1].get, g) for name, g in _flat(dhead).items()}
    return {**out, "embed": partial(_embed_grad, b, dh0)}


def _chunked_sumsq(ch: Chunking, grad_of: Callable[[jax.Array], jax.Array]) -> jax.Array:
    return jax.lax.fori_loop(0, ch.n, lambda i, acc: acc + _sumsq(grad_of(i)), jnp.zeros(()))


def _clip_factor(norm: jax.Array, max_norm: float) -> jax.Array:
    """``optax.clip_by_global_norm``'s factor (``max_norm > 0``)."""
    return jnp.where(norm < max_norm, 1.0, max_norm / norm)


def _scaled(tree: Any, c: jax.Array) -> Any:
    return jax.tree.map(lambda g: (g.astype(jnp.float32) * c).astype(g.dtype), tree)


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _put_index(i: jax.Array, full: jax.Array, part: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(full, part, i, 0)


def _norm_layer(b: _Batch, carry: tuple, x: tuple):
    dh, sq = carry
    g, dh = _layer_grad(b, *x, dh)
    return (dh, sq + _sumsq(g)), None


def _norm_pass(b: _Batch, dhead: dict[str, Any], inputs_LABTD: jax.Array, dx_ABTD: jax.Array) -> jax.Array:
    """The global gradient norm: a reverse pass over the layers summing only ‖∂θ_l‖², then the other leaves."""
    init = (dx_ABTD, jnp.zeros(()))
    (dh0, sq), _ = jax.lax.scan(partial(_norm_layer, b), init, (b.blocks, inputs_LABTD), reverse=True)
    rest = b.model.opt.rest
    return jnp.sqrt(sq + sum(_chunked_sumsq(rest[name][1], g) for name, g in _rest_grads(b, dhead, dh0).items()))


def _update_chunk(b: _Batch, name: str, grad_of: Callable, c: jax.Array, ok: jax.Array, i: jax.Array, carry: tuple):
    leaf, st, sq = carry
    tx, ch = b.model.opt.rest[name]
    p, s, g = ch.get(leaf, i), jax.tree.map(lambda a: a[i], st), grad_of(i)
    updates, new_s = tx.update(_nest(name, _scaled(g, c)), s, _nest(name, p))
    new_p = jnp.where(ok, optax.apply_updates(p, _leaf(name, updates)), p)
    return ch.put(leaf, new_p, i), jax.tree.map(partial(_put_index, i), st, _select(ok, new_s, s)), sq + _sumsq(g)


def _rest_update(b: _Batch, name: str, grad_of: Callable, opt_state: Any, c: jax.Array, ok: jax.Array):
    """Leaf ``name`` updated chunk by chunk in place: ``(leaf, its optimizer state, its gradient's sum of squares)``."""
    init = (_leaf(name, b.rest), opt_state, jnp.zeros(()))
    return jax.lax.fori_loop(0, b.model.opt.rest[name][1].n, partial(_update_chunk, b, name, grad_of, c, ok), init)


def _update_layer(b: _Batch, c: jax.Array, ok: jax.Array, carry: tuple, x: tuple):
    """Block ``index``: its gradient over the micro-batches, its update written back in place."""
    blk, blk_state, dh, sq = carry
    index, inputs_ABTD = x
    layer = jax.tree.map(lambda a: a[index], blk)
    g, dh = _layer_grad(b, layer, inputs_ABTD, dh)
    layer_state = jax.tree.map(lambda a: a[index], blk_state)
    updates, new_state = b.model.opt.block.update({BLOCKS: _scaled(g, c)}, layer_state, {BLOCKS: layer})
    new_layer = _select(ok, keep_int_params(optax.apply_updates(layer, updates[BLOCKS]), layer), layer)
    new_state = _select(ok, new_state, layer_state)
    put = partial(_put_index, index)
    return (jax.tree.map(put, blk, new_layer), jax.tree.map(put, blk_state, new_state), dh, sq + _sumsq(g)), None


def _update_pass(b: _Batch, opt_state: LayerwiseOptState, dhead, inputs_LABTD, dx_ABTD, c: jax.Array, ok: jax.Array):
    """Backward with in-place updates (gradients scaled by ``c``); where ``ok`` is false every slice is
    written back unchanged. Returns ``(params, optimizer state, gradient norm)``."""
    # final norm and lm_head first: their gradients are dead before the layer loop starts
    grads = _rest_grads(b, dhead, None)
    head_names = [name for name in b.model.opt.rest if name != "embed"]
    new_rest = {name: _rest_update(b, name, grads[name], opt_state.rest[name], c, ok) for name in head_names}
    new_rest, blocks_in = jax.lax.optimization_barrier((new_rest, b.blocks))
    n_layers = jax.tree.leaves(b.blocks)[0].shape[0]
    init = (blocks_in, opt_state.blocks, dx_ABTD, jnp.zeros(()))
    (new_blocks, new_blocks_state, dh0, sq), _ = jax.lax.scan(
        partial(_update_layer, b, c, ok), init, (jnp.arange(n_layers), inputs_LABTD), reverse=True
    )
    new_rest["embed"] = _rest_update(b, "embed", _rest_grads(b, dhead, dh0)["embed"], opt_state.rest["embed"], c, ok)
    sq = sq + sum(r[2] for r in new_rest.values())
    params = _unflat({name: r[0] for name, r in new_rest.items()})
    opt_rest = {name: r[1] for name, r in new_rest.items()}
    return {**params, BLOCKS: new_blocks}, LayerwiseOptState(opt_rest, new_blocks_state), jnp.sqrt(sq)


def make_layerwise_step(
    cfg: Config, graphdef: nnx.GraphDef, abstract_model: nnx.Module, opt: LayerwiseOptimizer, schedule: optax.Schedule
) -> Callable:
    """``step(state, batch) -> (state, metrics)`` with the per-layer fused update (see the module doc).

    ``abstract_model`` is the run's model from ``nnx.eval_shape`` (its ``blocks`` give one block's
    graph). The state is a :class:`~lowrank_jax.train.state.TrainState`; metrics match the ordinary step's.
    """
    if not cfg.model.scan_layers:
        raise ValueError("layerwise_update: needs model.scan_layers=true (the blocks stacked on a layers axis)")
    model = _Model(graphdef, *nnx.split(abstract_model.blocks), opt, cfg.grad_accum, cfg.optim.grad_clip)

    def step(state: Any, batch: jax.Array):
        b = _batch(model, state.params, batch)
        loss, dhead, inputs_LABTD, dx_ABTD = _forward(b)
        # No lax.cond around the update: a cond's operands cannot be updated in place, which would copy
        # every block's weights and state; a skipped step writes each slice back unchanged instead.
        if model.max_norm > 0:
            grad_norm = _norm_pass(b, dhead, inputs_LABTD, dx_ABTD)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            c = _clip_factor(grad_norm, model.max_norm)
            new_params, new_opt, _ = _update_pass(b, state.opt_state, dhead, inputs_LABTD, dx_ABTD, c, ok)
        else:
            ok = jnp.isfinite(loss)
            c = jnp.ones((), jnp.float32)
            new_params, new_opt, grad_norm = _update_pass(b, state.opt_state, dhead, inputs_LABTD, dx_ABTD, c, ok)
        return finish_step(state, new_params, new_opt, ok, loss, grad_norm, schedule)

    return step
