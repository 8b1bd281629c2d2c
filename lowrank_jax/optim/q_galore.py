"""Q-GaLore: GaLore with INT4 projectors, a per-layer adaptive SVD interval, and INT8 weights.

Reference: Zhenyu Zhang, Ajay Jaiswal, Lu Yin, Shiwei Liu, Jiawei Zhao, Yuandong Tian, Zhangyang Wang, "Q-GaLore:
Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank Gradients", arXiv:2407.08296 (official code
VITA-Group/Q-GaLore: ``q_galore_torch/q_galore_projector.py``, ``q_galore_adamw8bit.py``, ``utils/quantization.py``).

Algorithm, for every selected matrix with gradient ``G_t`` (rank ``r``, per-matrix interval ``T``, scale ``α``)::

    if t % T == 0:                                   t counts updates from 0; T starts at update_proj_gap
        P ← top-r singular vectors of G_t (SVD)      the side GaLore's ``std`` picks
        c ← cos(p_prev, P[:, 0]);  queue ← (queue + [c])[-queue_size:]     (from the second SVD on)
        if len(queue) == queue_size and mean(queue) >= cos_threshold:  T ← int(T · gamma_proj)
        p_prev ← P[:, 0]                              the first singular vector, before quantization
        P ← Q⁻¹(Q(P))                                 INT4, asymmetric, per group of proj_group_size values
    R_t = project(G_t, P);   N_t = base_optimizer(R_t)          (official: 8-bit AdamW, b2 = 0.95)
    ΔW_t = α · project_back(N_t, P)                  (times −lr outside this transform)

Quantization (official ``_quantize``): a tensor is cut into groups of ``group_size`` consecutive values (PyTorch
row-major order); per group ``s = max(max − min, 1e-5) / (2ᵇ − 1)``, ``z = clip(−round(min / s), 0, 2ᵇ − 1)``,
codes ``q = clip(round(x / s) + z, 0, 2ᵇ − 1)`` and ``x̂ = s (q − z)``. The INT4 codes are stored two per byte
(uint8), the scales and zero points in float32. Stochastic rounding (the INT8 weights' update,
:func:`quantize_stochastic`) replaces ``round(x / s)`` by ``⌊x / s⌋ + Bernoulli(frac(x / s))``, so
``E[x̂] = x`` inside the clipping range. The INT8 weight layer kind is :mod:`lowrank_jax.layers.int8`.

The projector's PyTorch layout decides the groups: an input-side projector is the official ``Vh[:r]`` (``r × in``),
an output-side one ``U[:, :r]`` (``out × r``); a size that is not a multiple of the group size is zero-padded
(the official code asserts divisibility). As in the official code the zero point is clipped to ``[0, 2ᵇ − 1]``, so
a group whose values all have one sign loses the part of its range beyond ``(2ᵇ − 1)·s`` from 0 (a projector's or
weight's groups hold both signs in practice). The cosine is signed, as in the official code
(``F.cosine_similarity`` with eps 1e-8), so the interval depends on the SVD's sign convention; the queue is not
cleared when the interval grows (official). A refresh whose gradient or SVD is not finite keeps the previous
projector (:mod:`~lowrank_jax.optim.projection`) and counts in ``svd_failures``.

Defaults (official run_pretrain.py / scripts/pretrain_c4): ``update_proj_gap = 200`` (7B: 500), ``scale = 0.25``,
``proj_bits = 4``, ``proj_group_size = 256``, ``cos_threshold = 0.4``, ``gamma_proj = 2``, ``queue_size = 5``,
AdamW8bit with ``b1 = 0.9``, ``b2 = 0.95``, ``eps = 1e-8`` (bitsandbytes: eps after the bias correction, leaves
under 4096 values in float32) for the projected and the other leaves alike, INT8 weights with group size 256 and
stochastic rounding. ``proj_quant=False`` keeps float projectors (GaLore with the adaptive interval).

State (:class:`QGaLoreState`): ``count``; ``base_state`` on the proxy tree (low-rank shapes for projected leaves);
per projected leaf ``proj`` (:class:`GroupQuantized` or the float projector ``(*batch, dim, r)``), ``gap`` int32
``(*batch,)``, ``queue`` float32 ``(*batch, queue_size)``, ``queue_len`` int32 ``(*batch,)``, ``first_vec`` float32
``(*batch, dim)``; ``svd_count`` / ``svd_failures`` totals. With ``optax.inject_hyperparams`` the rank, the group
size, the bits and the queue size are read from the state's shapes in ``update`` (``init`` needs them static).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim.adam_8bit import scale_by_adam_8bit
from lowrank_jax.optim.checks import check_bool, check_choice, check_int, check_real, static_int
from lowrank_jax.optim.complete import check_learning_rate, complete_optimizer, guard_composition
from lowrank_jax.optim.masks import resolve_mask as complete_mask
from lowrank_jax.optim.projection import (
    MaskOrFn,
    Plan,
    SvdConfig,
    back_project,
    dense_svd,
    init_plans,
    make_plans,
    project,
    proxy_tree,
    refresh_leaf,
    resolve_dims,
    sides,
)
from lowrank_jax.optim.swan import checked_base
from lowrank_jax.quantization import codes_of, scales_zeros

Q_GALORE_PROJ_TYPES = ("std", "reverse_std", "input", "output")
COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's eps
__all__ = [
    "GroupQuantized",
    "QGaLoreState",
    "dequantize_groups",
    "q_galore",
    "quantize_groups",
    "quantize_stochastic",
    "scale_by_q_galore",
]


# --------------------------------------------------------------------------------------------
# Asymmetric group quantization (projectors: INT4; weights: INT8 with stochastic rounding)
# --------------------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["codes", "scales", "zeros"], meta_fields=["bits", "shape"]
)
@dataclasses.dataclass(frozen=True)
class GroupQuantized:
    """Groups ``(G, group)`` of a flattened tensor: uint8 ``codes`` (two 4-bit codes per byte when ``bits <= 4``:
    ``(G, group / 2)``), float32 ``scales`` and ``zeros`` ``(G, 1)`` (leading batch axes allowed). Static: ``bits``
    and the ``shape`` of one quantized tensor."""

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    bits: int
    shape: tuple[int, ...]

    @property
    def packed(self) -> bool:
        return self.bits <= 4

    @property
    def group_size(self) -> int:
        return self.codes.shape[-1] * (2 if self.packed else 1)


def _groups(x: jax.Array, group_size: int) -> jax.Array:
    """Flattened ``x`` as ``(G, group_size)`` float32, zero-padded to whole groups."""
    flat = x.reshape(-1).astype(jnp.float32)
    return jnp.pad(flat, (0, -flat.size % group_size)).reshape(-1, group_size)


def _pack(q_gk: jax.Array, bits: int) -> jax.Array:
    q = q_gk.astype(jnp.uint8)
    if bits > 4:
        return q
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _unpack(codes: jax.Array, bits: int) -> jax.Array:
    if bits > 4:
        return codes
    return jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[0], -1)


def quantize_groups(x: jax.Array, *, bits: int, group_size: int, key: jax.Array | None = None) -> GroupQuantized:
    """Asymmetric per-group quantization of ``x`` (module doc); with ``key``: stochastic rounding."""
    if bits <= 4 and group_size % 2:
        raise ValueError(f"group_size: must be even to pack {bits}-bit codes, got {group_size}")
    levels = 2**bits - 1
    x_gk = _groups(x, group_size)
    scales, zeros = scales_zeros(x_gk, levels, axis=1)
    q = codes_of(x_gk, scales, zeros, levels, key)
    return GroupQuantized(_pack(q, bits), scales, zeros, bits, tuple(x.shape))


def quantize_stochastic(x: jax.Array, key: jax.Array, *, bits: int = 8, group_size: int = 256) -> GroupQuantized:
    """Stochastic-rounding quantization (official ``_quantize_stochastic_round``): unbiased inside the range."""
    return quantize_groups(x, bits=bits, group_size=group_size, key=key)


def dequantize_groups(q: GroupQuantized, dtype: Any = jnp.float32) -> jax.Array:
    """``s (q − z)`` back in ``q.shape`` (the padding dropped), in ``dtype`` (one tensor: no batch axes)."""
    x = q.scales * (_unpack(q.codes, q.bits).astype(jnp.float32) - q.zeros)
    return x.reshape(-1)[: math.prod(q.shape)].reshape(q.shape).astype(dtype)


# --------------------------------------------------------------------------------------------
# The transformation
# --------------------------------------------------------------------------------------------


class QGaLoreState(NamedTuple):
    """State of :func:`scale_by_q_galore` (see the module docstring)."""

    count: jax.Array  # int32 []
    base_state: optax.OptState  # on the proxy (low-rank) tree
    proj: optax.Updates  # per projected leaf: GroupQuantized (batched) or float (*batch, dim, r); else MaskedNode
    gap: optax.Updates  # int32 (*batch,): the current SVD interval
    queue: optax.Updates  # float32 (*batch, queue_size): the last cosine similarities
    queue_len: optax.Updates  # int32 (*batch,)
    first_vec: optax.Updates  # float32 (*batch, dim): the first singular vector of the last SVD
    svd_count: jax.Array  # int32 []: successful refreshes
    svd_failures: jax.Array  # int32 []


@dataclasses.dataclass(frozen=True)
class _Settings:
    rank: Any
    update_proj_gap: Any
    scale: Any
    proj_type: str
    proj_quant: bool
    proj_bits: Any
    proj_group_size: Any
    cos_threshold: Any
    gamma_proj: Any
    queue_size: Any
    mask: MaskOrFn
    dimension_numbers: Any
    base: optax.GradientTransformation


def _torch_layout(p: Plan, proj_bdr: jax.Array) -> jax.Array:
    """A batch of projectors ``(B, dim, r)`` in the official PyTorch layout (input side: ``r × in``)."""
    return jnp.swapaxes(proj_bdr, 1, 2) if p.use_in else proj_bdr


def _quantize_proj(p: Plan, proj_bdr: jax.Array, bits: int, group_size: int) -> GroupQuantized:
    q = jax.vmap(lambda x: quantize_groups(x, bits=bits, group_size=group_size))(_torch_layout(p, proj_bdr))
    return q


def _dequantize_proj(p: Plan, q: GroupQuantized, dtype: Any) -> jax.Array:
    """``(B, dim, r)`` projectors from a batch of quantized ones in the PyTorch layout."""
    x = jax.vmap(lambda q1: dequantize_groups(q1, dtype))(q)
    return jnp.swapaxes(x, 1, 2) if p.use_in else x


def _rank(pq: Any, use_in: bool) -> int:
    """The rank of a projector leaf: its last axis, or the PyTorch-layout shape of a quantized one."""
    if isinstance(pq, GroupQuantized):
        return pq.shape[0] if use_in else pq.shape[1]
    return pq.shape[-1]


def _dim(p: Plan) -> int:
    return p.m if p.use_in else p.n


def _unbatch(p: Plan, x: jax.Array) -> jax.Array:
    """``(B, …)`` → ``(*batch, …)``."""
    return x.reshape(p.batch_shape + x.shape[1:])


def _init(params: optax.Params, *, s: _Settings) -> QGaLoreState:
    leaves, treedef, plans = init_plans(
        params, rank=s.rank, mask=s.mask, dimension_numbers=s.dimension_numbers, proj_type=s.proj_type
    )
    gap0 = static_int(s.update_proj_gap, "update_proj_gap", "it starts the per-matrix SVD interval", lo=1)
    qsize = static_int(s.queue_size, "queue_size", "it sets the queue's shape", lo=1)
    if s.proj_quant:
        bits = static_int(s.proj_bits, "proj_bits", "it sets the code layout", lo=1)
        group = static_int(s.proj_group_size, "proj_group_size", "it sets the code layout", lo=1)
    proj, gap, queue, qlen, vec = [], [], [], [], []
    for x, p in zip(leaves, plans, strict=True):
        if p is None:
            for lst in (proj, gap, queue, qlen, vec):
                lst.append(optax.MaskedNode())
            continue
        dim = _dim(p)
        eye = jnp.broadcast_to(jnp.eye(dim, p.rank, dtype=x.dtype), (p.nmat, dim, p.rank))
        pq = _quantize_proj(p, eye, bits, group) if s.proj_quant else eye
        proj.append(jax.tree.map(functools.partial(_unbatch, p), pq))
        gap.append(jnp.full(p.batch_shape, gap0, jnp.int32))
        queue.append(jnp.zeros(p.batch_shape + (qsize,), jnp.float32))
        qlen.append(jnp.zeros(p.batch_shape, jnp.int32))
        vec.append(jnp.zeros(p.batch_shape + (dim,), jnp.float32))
    tree = treedef.unflatten
    return QGaLoreState(
        count=jnp.zeros([], jnp.int32),
        base_state=s.base.init(proxy_tree(leaves, treedef, plans)),
        proj=tree(proj),
        gap=tree(gap),
        queue=tree(queue),
        queue_len=tree(qlen),
        first_vec=tree(vec),
        svd_count=jnp.zeros([], jnp.int32),
        svd_failures=jnp.zeros([], jnp.int32),
    )


def _is_proj_leaf(x: Any) -> bool:
    return isinstance(x, GroupQuantized | optax.MaskedNode)


def _adapt_gap(vec_new, vec_old, queue, qlen, gap, refreshed, s: _Settings):  # noqa: ANN001, ANN202
    """The interval rule of one batch of matrices (``(B, dim)``, ``(B, Q)``, ``(B,)``…) on the refreshed ones."""
    qsize = queue.shape[-1]
    norms = jnp.linalg.norm(vec_new, axis=-1) * jnp.linalg.norm(vec_old, axis=-1)
    cos = jnp.sum(vec_new * vec_old, axis=-1) / jnp.maximum(norms, COS_EPS)
    has_past = refreshed & jnp.any(vec_old != 0, axis=-1)  # official: from the second SVD on
    full = qlen == qsize
    pushed = jnp.where(full[:, None], jnp.roll(queue, -1, axis=-1), queue)
    slot = jnp.where(full, qsize - 1, qlen)
    pushed = jnp.where(jnp.arange(qsize)[None, :] == slot[:, None], cos[:, None], pushed)
    queue = jnp.where(has_past[:, None], pushed, queue)
    qlen = jnp.where(has_past, jnp.minimum(qlen + 1, qsize), qlen)
    grow = has_past & (qlen == qsize) & (jnp.mean(queue, axis=-1) >= s.cos_threshold)
    gap = jnp.where(grow, (gap * s.gamma_proj).astype(jnp.int32), gap)
    return queue, qlen, gap, jnp.where(refreshed[:, None], vec_new, vec_old)


def _leaf_update(p: Plan, g: jax.Array, pq: Any, gap, queue, qlen, vec, count, s: _Settings):  # noqa: ANN001, ANN202
    """Refresh the due projectors of one leaf; ``(projector for use, new pq, gap, queue, qlen, vec, ok, failed)``."""
    nb = len(p.batch_shape)
    flat = lambda x: x.reshape((p.nmat,) + x.shape[nb:])  # noqa: E731
    quant = isinstance(pq, GroupQuantized)
    old = _dequantize_proj(p, jax.tree.map(flat, pq), g.dtype) if quant else flat(pq)
    gap_b = flat(gap)
    due = (count % gap_b) == 0
    cfg = SvdConfig(svd="exact", power_iters=0, oversample=0, canonical_signs=False, svd_fn=dense_svd)
    pin, pout = (old, None) if p.use_in else (None, old)
    pin, pout, refreshed, failed = refresh_leaf(p, p.to_mats(g), pin, pout, due, None, True, cfg)
    fresh = pin if p.use_in else pout
    queue_b, qlen_b, gap_b, vec_b = _adapt_gap(
        fresh[:, :, 0].astype(jnp.float32), flat(vec), flat(queue), flat(qlen), gap_b, refreshed, s
    )
    if quant:
        new_q = _quantize_proj(p, fresh, pq.bits, pq.group_size)
        new_q = jax.tree.map(lambda a, b: jnp.where(refreshed.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                             new_q, jax.tree.map(flat, pq))  # fmt: skip
        use = _dequantize_proj(p, new_q, g.dtype)
    else:
        new_q, use = fresh, fresh
    unflat = lambda x: x.reshape(p.batch_shape + x.shape[1:])  # noqa: E731
    states = (jax.tree.map(unflat, new_q), unflat(gap_b), unflat(queue_b), unflat(qlen_b), unflat(vec_b))
    return use, states, jnp.sum(refreshed, dtype=jnp.int32), jnp.sum(failed, dtype=jnp.int32)


def _update(
    updates: optax.Updates, state: QGaLoreState, params: optax.Params | None = None, *, s: _Settings
) -> tuple[optax.Updates, QGaLoreState]:
    del params
    leaves, treedef = jax.tree.flatten(updates)
    pqs = treedef.flatten_up_to(state.proj)
    vecs = treedef.flatten_up_to(state.first_vec)
    selected = [not isinstance(x, optax.MaskedNode) for x in pqs]
    dims = resolve_dims(s.dimension_numbers, updates, leaves)
    plans = make_plans(
        leaves, selected, dims,
        lambda _, m, n: sides(s.proj_type, m, n), lambda i, m, n: _rank(pqs[i], sides(s.proj_type, m, n)[0]),
    )  # fmt: skip
    gaps, queues, qlens = (treedef.flatten_up_to(x) for x in (state.gap, state.queue, state.queue_len))
    use_in, use_out = [None] * len(leaves), [None] * len(leaves)
    new = [[optax.MaskedNode()] * len(leaves) for _ in range(5)]
    n_ok = n_fail = jnp.zeros([], jnp.int32)
    for i, (g, p) in enumerate(zip(leaves, plans, strict=True)):
        if p is None:
            continue
        use, states, ok, fail = _leaf_update(p, g, pqs[i], gaps[i], queues[i], qlens[i], vecs[i], state.count, s)
        (use_in if p.use_in else use_out)[i] = p.proj_unb(use, _dim(p))
        for lst, x in zip(new, states, strict=True):
            lst[i] = x
        n_ok, n_fail = n_ok + ok, n_fail + fail
    mats = [None if p is None else p.to_mats(g) for g, p in zip(leaves, plans, strict=True)]
    low = project(leaves, plans, mats, use_in, use_out)
    inner, base_state = s.base.update(treedef.unflatten(low), state.base_state, None)
    out = back_project(leaves, plans, treedef.flatten_up_to(inner), use_in, use_out, s.scale)
    tree = lambda xs: treedef.unflatten(xs)  # noqa: E731
    new_state = QGaLoreState(
        count=optax.safe_int32_increment(state.count),
        base_state=base_state,
        proj=treedef.unflatten(new[0]),
        gap=tree(new[1]),
        queue=tree(new[2]),
        queue_len=tree(new[3]),
        first_vec=tree(new[4]),
        svd_count=state.svd_count + n_ok,
        svd_failures=state.svd_failures + n_fail,
    )
    return treedef.unflatten(out), new_state


def scale_by_q_galore(
    *,
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    proj_quant: bool = True,
    proj_bits: int = 4,
    proj_group_size: int = 256,
    cos_threshold: float = 0.4,
    gamma_proj: int = 2,
    queue_size: int = 5,
    mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    base_optimizer: optax.GradientTransformation | None = None,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """Q-GaLore's projection around ``base_optimizer`` (module doc), params-free, no learning rate.

    Args:
      rank: ``r`` (per matrix clamped to ``min(in, out)``; static in ``init``).
      update_proj_gap: the initial SVD interval ``T`` of every matrix.
      scale: ``α``, multiplies the back-projected update (official scripts 0.25).
      proj_type: ``'std' | 'reverse_std' | 'input' | 'output'`` (GaLore's table; the official code runs ``std``).
      proj_quant, proj_bits, proj_group_size: INT4 projectors (official ``--proj_quant``, 4 bits, groups of 256).
      cos_threshold, gamma_proj, queue_size: the adaptive interval (official 0.4, 2, 5).
      mask: bool pytree (prefix) or ``params -> pytree`` of the projected leaves; default every leaf with ndim >= 2.
      dimension_numbers: :class:`~lowrank_jax.optim.projection.GaLoreDims` per leaf for ndim > 2.
      base_optimizer: params-free transform run on the low-rank tree (and the unselected leaves at full size);
        default the official 8-bit AdamW, :func:`~lowrank_jax.optim.adam_8bit.scale_by_adam_8bit` with
        ``b1, b2, eps`` and bitsandbytes' eps placement.
    """
    check_int(rank, "rank", lo=1)
    check_int(update_proj_gap, "update_proj_gap", lo=1)
    check_real(scale, "scale", lo=0.0, lo_open=True)
    check_choice(proj_type, "proj_type", Q_GALORE_PROJ_TYPES)
    check_bool(proj_quant, "proj_quant")
    check_int(proj_bits, "proj_bits", lo=1, hi=8)
    check_int(proj_group_size, "proj_group_size", lo=2)
    check_real(cos_threshold, "cos_threshold", lo=-1.0, hi=1.0)
    check_real(gamma_proj, "gamma_proj", lo=1.0)
    check_int(queue_size, "queue_size", lo=1)
    base_optimizer = checked_base(base_optimizer, lambda: scale_by_adam_8bit(b1, b2, eps, eps_placement="optax"))
    s = _Settings(
        rank, update_proj_gap, scale, proj_type, proj_quant, proj_bits, proj_group_size, cos_threshold, gamma_proj,
        queue_size, mask, dimension_numbers, base_optimizer,
    )  # fmt: skip
    tx = optax.GradientTransformation(functools.partial(_init, s=s), functools.partial(_update, s=s))
    return guard_composition(tx, "q_galore", complete=False)


def q_galore(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    proj_quant: bool = True,
    proj_bits: int = 4,
    proj_group_size: int = 256,
    cos_threshold: float = 0.4,
    gamma_proj: int = 2,
    queue_size: int = 5,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The complete Q-GaLore-AdamW8bit: :func:`scale_by_q_galore`, decoupled weight decay, learning rate.

    ``mask`` None selects :func:`lowrank_jax.optim.masks.default_mask` (attention and MLP matrices). The official
    optimizer decays the updated weight; this decays the current one (an ``lr²·wd`` difference, none at the
    official ``weight_decay = 0``).
    """
    check_learning_rate(learning_rate, "q_galore")
    scaling = scale_by_q_galore(
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        proj_quant=proj_quant,
        proj_bits=proj_bits,
        proj_group_size=proj_group_size,
        cos_threshold=cos_threshold,
        gamma_proj=gamma_proj,
        queue_size=queue_size,
        mask=complete_mask(mask),
        dimension_numbers=dimension_numbers,
        b1=b1,
        b2=b2,
        eps=eps,
    )
    return complete_optimizer("q_galore", scaling, learning_rate, weight_decay, weight_decay_mask)
