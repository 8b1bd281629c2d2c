"""APOLLO and APOLLO-Mini: AdamW's learning-rate scaling estimated in a random low-rank space.

Reference: Hanqing Zhu, Zhenyu Zhang, Wenyan Cong, Xi Liu, Sem Park, Vikas Chandra, Bo Long, David Z. Pan,
Zhangyang Wang, Jinwon Lee, "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025, arXiv:2412.05270
(official code: zhuhanqing/APOLLO, package ``apollo_torch``).

Algorithm, for every selected matrix with gradient ``G_t`` (rank ``r``, gap ``T``, scale ``α``, limit ``γ``)::

    if t % T == 0:  P ← random, entries N(0, 1/r)          a new draw at every refresh, no SVD
    R_t = project(G_t, P)                                   e.g. Pᵀ G_t (r × n): the only thing Adam sees
    m, v ← b1 m + (1−b1) R_t,  b2 v + (1−b2) R_t²           low-rank state
    N_t = m / (√v + ε)
    s   = ‖N_t‖ / (‖R_t‖ + 1e-8)                           per channel (APOLLO) or per matrix (APOLLO-Mini)
    S_t = √α · s ⊙ G_t                                      the *full* gradient, rescaled
    S_t ← norm-growth limiter(S_t; γ)                       ‖S_t‖ ≤ γ ‖S_{t−1}‖
    ΔW_t = c_t · S_t,   c_t = √(1 − b2ᵗ) / (1 − b1ᵗ)         (times −lr, outside this transform)

Each line follows the official code (apollo_torch/apollo.py ``AdamW.step``, random_projector.py
``GradientProjector``; line-level notes in the code): the projector is refreshed when ``step % T == 0`` with
``step`` counted from 0 before the update; the Gaussian is ``stable_randn(shape, seed) / sqrt(rank)``; ``N_t`` is
``exp_avg / denom`` without the bias correction, which multiplies the step size instead; the channels are the
unprojected side (norms over the rank axis, ``norm_dim`` in apollo.py); the update multiplies ``np.sqrt(scale)``
(so the paper's ``α`` enters as its square root), after the limiter unless ``scale_front`` (APOLLO-Mini's
scripts pass ``--scale_front``); the limiter is Fira's (:mod:`lowrank_jax.optim._norm_scaling`). Leaves that
are not selected (default: ``ndim < 2``) get the same HF-style AdamW at full size, as the official param group
without ``rank`` does.

Defaults (official scripts/pretrain_c4/llama_*_apollo*.sh and apollo.py's ``AdamW.__init__``): APOLLO
``scale_type='channel'``, ``scale=1``, ``update_proj_gap=200``, rank ≈ hidden/4 (128 / 192 / 256 / 256 / 256 for
60M / 130M / 350M / 1B / 7B); APOLLO-Mini ``rank=1``, ``scale_type='tensor'``, ``scale=128``,
``scale_front=True``; both ``proj_type='std'``, γ = 1.01, ``b1, b2 = 0.9, 0.999``, ``eps = 1e-6``, lr 0.01 in
the scripts. The projection side follows GaLore's ``std`` rule (:mod:`lowrank_jax.optim.galore`); the rank is
not clamped to ``min(in, out)`` (a Gaussian may have more columns than the side it projects, as in the
official code). Two-sided projection is not supported (the official projector raises for ``'full'``).

Differences from apollo_torch (none changes the default trajectory up to the random draws): ``P`` is not
stored but regenerated each step from ``(seed, t − t mod T, matrix index, side)`` (the official code keeps
the matrix, "a lazy implementation" by its own comment), so the state is only the low-rank moments and one
norm per matrix; the random numbers are JAX's, not torch's; the scaling factors, norms and limiter are
float32 (the update itself is in the gradient dtype). With ``eight_bit=True`` the moments are 8-bit
(:func:`~lowrank_jax.optim.scale_by_adam_8bit`, HF eps placement). Under the per-layer fused update
(``layerwise_update``) each layer's state numbers its matrices as the stacked model does (``numbering``), so
the random draws are the ordinary step's.

State (:class:`ApolloState`): ``count``; ``inner_state``: the Adam state on the "proxy" tree (low-rank shapes
for projected leaves, the params' shapes for the others); ``update_norm``: per selected leaf a float32
``(*batch,)`` array, the norm of the last limited update (``optax.MaskedNode()`` elsewhere). Higher-rank leaves
are batches of matrices exactly as in :func:`~lowrank_jax.optim.galore.galore` (``dimension_numbers``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim._norm_scaling import (
    ONE_SIDED_PROJ_TYPES,
    SCALE_TYPES,
    check_norm_growth_limit,
    frobenius,
    growth_limiter,
    hf_adam,
    hf_step_size,
    scaling_factor,
)
from lowrank_jax.optim.adam_8bit import ScaleByAdam8bitState, get_moments
from lowrank_jax.optim.checks import check_bool, check_choice, check_int, check_real, is_traced, static_int
from lowrank_jax.optim.complete import check_learning_rate, complete_optimizer, guard_composition
from lowrank_jax.optim.masks import resolve_mask
from lowrank_jax.optim.projection import (
    MaskOrFn,
    Plan,
    default_numbering,
    gaussian_projectors,
    init_plans,
    make_plans,
    period_start,
    project,
    proxy_tree,
    refresh_key,
    resolve_dims,
    sides,
)

APOLLO_PROJ_TYPES = ONE_SIDED_PROJ_TYPES
__all__ = [
    "APOLLO_PROJ_TYPES",
    "SCALE_TYPES",
    "ApolloState",
    "apollo",
    "apollo_mini",
    "scale_by_apollo",
    "scale_by_apollo_mini",
]


class ApolloState(NamedTuple):
    """State of :func:`apollo` / :func:`apollo_mini` (see the module docstring)."""

    count: jax.Array  # int32 [], number of updates so far
    inner_state: optax.OptState  # HF-style Adam on the proxy (low-rank) tree
    update_norm: optax.Updates  # per leaf float32 (*batch,) or MaskedNode: ‖S_t‖ after the limiter
    numbering: jax.Array  # int32 (2,): (offset, stride) of the matrix indices (projection.matrix_indices)


def _read_plans(updates: optax.Updates, state: ApolloState, rank: Any, proj_type: str, dimension_numbers: Any):
    """``(leaves, treedef, plans, norms)``: the projected leaves are those with an ``update_norm``.

    A traced ``rank`` (``optax.inject_hyperparams`` inside ``jit``) is read back from the low-rank moments' shapes.
    """
    leaves, treedef = jax.tree.flatten(updates)
    norms = treedef.flatten_up_to(state.update_norm)
    selected = [not isinstance(x, optax.MaskedNode) for x in norms]
    dims = resolve_dims(dimension_numbers, updates, leaves)
    if is_traced(rank):
        low = [tuple(x.shape) for x in treedef.flatten_up_to(_first_moment(state.inner_state))]
        rank_of = lambda i, m, n: low[i][-2] if sides(proj_type, m, n)[0] else low[i][-1]
    else:
        rank_ = static_int(rank, "rank", "it sets the projection shapes")
        rank_of = lambda *_: rank_
    plans = make_plans(leaves, selected, dims, lambda _, m, n: sides(proj_type, m, n), rank_of)
    return leaves, treedef, plans, norms


def _first_moment(inner_state: Any) -> Any:
    """The low-rank Adam's first moment tree (float arrays or :class:`QuantizedArray`, both with the proxy shapes)."""
    if isinstance(inner_state, ScaleByAdam8bitState):
        return get_moments(inner_state)[0]
    return inner_state.mu


@dataclasses.dataclass(frozen=True)
class _ApolloSettings:
    """:func:`apollo`'s keywords after validation (numbers may be traced under ``inject_hyperparams``)."""

    rank: Any
    update_proj_gap: Any
    scale: Any
    scale_type: str
    proj_type: str
    norm_growth_limit: Any
    scale_front: bool
    b1: Any
    b2: Any
    inner: optax.GradientTransformation  # HF-style Adam, float or 8-bit moments
    mask: MaskOrFn
    dimension_numbers: Any
    seed: Any


def _init(params: optax.Params, *, s: _ApolloSettings) -> ApolloState:
    leaves, treedef, plans = init_plans(
        params, rank=s.rank, mask=s.mask, dimension_numbers=s.dimension_numbers, proj_type=s.proj_type, clamp=False
    )
    norms = [optax.MaskedNode() if p is None else jnp.zeros(p.batch_shape, jnp.float32) for p in plans]
    return ApolloState(
        count=jnp.zeros([], jnp.int32),
        inner_state=s.inner.init(proxy_tree(leaves, treedef, plans)),
        update_norm=treedef.unflatten(norms),
        numbering=default_numbering(),
    )


def _update(
    updates: optax.Updates, state: ApolloState, params: optax.Params | None = None, *, s: _ApolloSettings
) -> tuple[optax.Updates, ApolloState]:
    """Project with this period's Gaussians, step the low-rank Adam, scale the full gradient by its ratio."""
    del params
    leaves, treedef, plans, norms = _read_plans(updates, state, s.rank, s.proj_type, s.dimension_numbers)
    count = state.count
    # random_projector.py: a new matrix when `iter % update_proj_gap == 0`, kept in between
    base_key = refresh_key(s.seed, period_start(count, s.update_proj_gap))
    pairs = list(zip(leaves, plans, strict=True))
    projs = [
        (None, None) if p is None else gaussian_projectors(p, base_key, state.numbering, g.dtype) for g, p in pairs
    ]
    mats = [None if p is None else p.to_mats(g) for g, p in pairs]
    pins, pouts = [pi for pi, _ in projs], [po for _, po in projs]
    low = project(leaves, plans, mats, pins, pouts)
    inner_updates, inner_state = s.inner.update(treedef.unflatten(low), state.inner_state, None)
    inner_list = treedef.flatten_up_to(inner_updates)
    c_t = hf_step_size(s.b1, s.b2, count)  # apollo.py: step_size = lr * sqrt(bias_correction2) / bias_correction1
    root_scale = jnp.sqrt(jnp.asarray(s.scale, jnp.float32))

    out, new_norms = [], []
    for p, g_b, r, u, prev in zip(plans, mats, low, inner_list, norms, strict=True):
        if p is None:
            out.append(u)  # the official param group without rank: plain AdamW
            new_norms.append(prev)
            continue
        update, norm_b = _scaled_gradient(p, g_b, r, u, prev, count, c_t, root_scale, s)
        out.append(p.from_mats(update))
        new_norms.append(norm_b.reshape(p.batch_shape))
    new_state = ApolloState(
        optax.safe_int32_increment(count), inner_state, treedef.unflatten(new_norms), state.numbering
    )
    return treedef.unflatten(out), new_state


def _scaled_gradient(
    p: Plan,
    g_b: jax.Array,
    r: jax.Array,
    u: jax.Array,
    prev: jax.Array,
    count: jax.Array,
    c_t: jax.Array,
    root_scale: jax.Array,
    s: _ApolloSettings,
) -> tuple[jax.Array, jax.Array]:
    """One leaf's update ``(B, m, n)`` (the rescaled, limited gradient) and the norm the limiter keeps, ``(B,)``."""
    # apollo.py Step 3: norm_grad = exp_avg / denom has no bias correction; the inner's update has it
    factor = scaling_factor(p.low_b(u).astype(jnp.float32) / c_t, p.low_b(r), p, s.scale_type)
    # Step 4: scaled_grad = p.grad * grad_scaling_factor (times sqrt(scale) first with scale_front),
    # then the limiter's division, sqrt(scale) (unless in front) and the step size: one factor for G
    front = root_scale if s.scale_front else 1.0
    norm = frobenius(g_b, factor * front)
    limiter, norm_b = growth_limiter(norm, prev.reshape(-1), count == 0, s.norm_growth_limit)
    coef = factor * (root_scale * c_t / limiter)[:, None, None]
    return g_b * coef.astype(g_b.dtype), norm_b


def scale_by_apollo(
    rank: int = 256,
    *,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    proj_type: str = "std",
    norm_growth_limit: float = 1.01,
    scale_front: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eight_bit: bool = False,
    mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """APOLLO's scaling: the full gradient rescaled by low-rank Adam's per-channel (or per-tensor) ratio (module doc).

    Composable like ``optax.scale_by_adam`` (no learning rate, no weight decay; :func:`apollo` is the complete
    optimizer). The low-rank optimizer is fixed to the official HF-style Adam (float or ``eight_bit``): APOLLO's
    scaling factor reads its moments and bias correction, so another base optimizer would not be APOLLO.

    Args:
      rank: ``r``, columns of the random projection (not clamped; official APOLLO ≈ hidden/4, 256 from 350M on).
      update_proj_gap: ``T``, steps between new random projections (official scripts: 200).
      scale: ``α``; the update is multiplied by ``√α`` (official ``np.sqrt(group["scale"])``; 1 for APOLLO).
      scale_type: ``'channel'`` (APOLLO) or ``'tensor'`` (APOLLO-Mini).
      proj_type: which side is projected, ``'std' | 'reverse_std' | 'input' | 'output'`` (GaLore's table).
      norm_growth_limit: ``γ`` of the limiter (official 1.01); 0 switches it off (official ``disable_nl``).
      scale_front: multiply by ``√α`` before the limiter instead of after (official ``--scale_front``).
      b1, b2, eps: the low-rank Adam's (official AdamW defaults 0.9, 0.999, 1e-6; eps before the bias correction).
      eight_bit: keep the Adam moments 8-bit quantized (block-wise, :func:`scale_by_adam_8bit`).
      mask: pytree (prefix) of bools or ``params -> pytree`` selecting the scaled leaves (default: ``ndim >= 2``);
        the others get HF-style Adam at full size.
      dimension_numbers: as for :func:`~lowrank_jax.optim.galore.scale_by_galore` (stacked layers: one projection
        each).
      seed: seeds the random projections.

    Returns:
      A params-free optax transformation (chain weight decay and the learning rate after it) whose state is
      an :class:`ApolloState`.
    """
    check_int(rank, "rank", lo=1)
    check_int(update_proj_gap, "update_proj_gap", lo=1)
    check_real(scale, "scale", lo=0.0, lo_open=True)
    check_choice(scale_type, "scale_type", SCALE_TYPES)
    check_choice(proj_type, "proj_type", APOLLO_PROJ_TYPES, hints={"both": "APOLLO projects one side"})
    check_norm_growth_limit(norm_growth_limit)
    check_bool(scale_front, "scale_front")
    check_int(seed, "seed", lo=0)
    settings = _ApolloSettings(
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        scale_type=scale_type,
        proj_type=proj_type,
        norm_growth_limit=norm_growth_limit,
        scale_front=scale_front,
        b1=b1,
        b2=b2,
        inner=hf_adam(b1, b2, eps, eight_bit),
        mask=mask,
        dimension_numbers=dimension_numbers,
        seed=seed,
    )
    tx = optax.GradientTransformation(functools.partial(_init, s=settings), functools.partial(_update, s=settings))
    return guard_composition(tx, "apollo", complete=False)


def scale_by_apollo_mini(
    rank: int = 1,
    *,
    update_proj_gap: int = 200,
    scale: float = 128.0,
    scale_front: bool = True,
    proj_type: str = "std",
    norm_growth_limit: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eight_bit: bool = False,
    mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """APOLLO-Mini's scaling: :func:`scale_by_apollo` with tensor-wise scaling from a rank-1 projection.

    Defaults from the official scripts/pretrain_c4/llama_*_apollo_mini.sh (``num_rank=1``, ``scale_type=tensor``,
    ``apollo_scale=128``, ``--scale_front``); the other keywords are :func:`scale_by_apollo`'s.
    """
    tx = scale_by_apollo(
        rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        scale_type="tensor",
        proj_type=proj_type,
        norm_growth_limit=norm_growth_limit,
        scale_front=scale_front,
        b1=b1,
        b2=b2,
        eps=eps,
        eight_bit=eight_bit,
        mask=mask,
        dimension_numbers=dimension_numbers,
        seed=seed,
    )
    return guard_composition(tx, "apollo_mini", complete=False)


def apollo(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    proj_type: str = "std",
    norm_growth_limit: float = 1.01,
    scale_front: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    eight_bit: bool = False,
    mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """APOLLO-AdamW, complete like ``optax.adamw``: ``chain(scale_by_apollo(…), add_decayed_weights, lr)``.

    Defaults are the official apollo_torch code's and scripts' (Zhu et al., MLSys 2025, arXiv:2412.05270): rank 256
    (the 350M–7B scripts), ``update_proj_gap`` 200, ``scale`` 1, channel-wise, γ 1.01, eps 1e-6; the scripts use lr
    0.01. ``mask`` None selects the attention and MLP matrices by name (the official param group with ``rank``);
    the rest gets the same Adam at full size. Weight decay ``weight_decay`` applies to ``weight_decay_mask``
    (default: leaves with ndim >= 2). The other keywords are :func:`scale_by_apollo`'s.
    """
    check_learning_rate(learning_rate, "apollo")
    scaling = scale_by_apollo(
        rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        scale_type=scale_type,
        proj_type=proj_type,
        norm_growth_limit=norm_growth_limit,
        scale_front=scale_front,
        b1=b1,
        b2=b2,
        eps=eps,
        eight_bit=eight_bit,
        mask=resolve_mask(mask),
        dimension_numbers=dimension_numbers,
        seed=seed,
    )
    return complete_optimizer("apollo", scaling, learning_rate, weight_decay, weight_decay_mask)


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    rank: int = 1,
    update_proj_gap: int = 200,
    scale: float = 128.0,
    scale_front: bool = True,
    proj_type: str = "std",
    norm_growth_limit: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    eight_bit: bool = False,
    mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """APOLLO-Mini-AdamW, complete like ``optax.adamw``: ``chain(scale_by_apollo_mini(…), add_decayed_weights, lr)``.

    Defaults from the official scripts (rank 1, tensor-wise, scale 128 applied as √128 in front of the limiter);
    ``mask`` None selects the attention and MLP matrices by name. The other keywords are
    :func:`scale_by_apollo_mini`'s.
    """
    check_learning_rate(learning_rate, "apollo_mini")
    scaling = scale_by_apollo_mini(
        rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        scale_front=scale_front,
        proj_type=proj_type,
        norm_growth_limit=norm_growth_limit,
        b1=b1,
        b2=b2,
        eps=eps,
        eight_bit=eight_bit,
        mask=resolve_mask(mask),
        dimension_numbers=dimension_numbers,
        seed=seed,
    )
    return complete_optimizer("apollo_mini", scaling, learning_rate, weight_decay, weight_decay_mask)
