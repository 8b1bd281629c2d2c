"""The GaLore transformations: :func:`scale_by_galore` (any params-free base optimizer) and :func:`galore`.

One update (the algorithm box of :mod:`lowrank_jax.optim.galore`): read the plans back from the state, refresh the
due projectors (:func:`~lowrank_jax.optim.projection.refresh_projectors`), optionally carry the inner moments into
the new bases (:func:`~lowrank_jax.optim.galore.moments.remix_moments`), project the gradients
(:func:`~lowrank_jax.optim.projection.project`), run the inner transform on the low-rank tree
(:func:`low_rank_step`), back-project and scale its updates (:func:`~lowrank_jax.optim.projection.back_project`).

Fira (:mod:`lowrank_jax.optim.fira`) is GaLore plus a residual: it builds on the validated settings
(:func:`galore_settings`), the state (:func:`init_galore_state`) and the low-rank step (:func:`low_rank_step`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim._norm_scaling import hf_adam
from lowrank_jax.optim.adam_hf import scale_by_adam_hf
from lowrank_jax.optim.checks import check_bool, check_choice, check_int, check_real, static_int
from lowrank_jax.optim.complete import check_learning_rate, complete_optimizer, guard_composition
from lowrank_jax.optim.galore.moments import MOMENT_MODES, check_moments, remix_moments
from lowrank_jax.optim.masks import resolve_mask
from lowrank_jax.optim.projection import (
    PROJ_TYPE_HINTS,
    PROJ_TYPES,
    PROJECTORS,
    REFRESH_MODES,
    SVD_MODES,
    MaskOrFn,
    Plan,
    SvdConfig,
    SvdFn,
    back_project,
    default_numbering,
    dense_svd,
    identity_projectors,
    init_plans,
    make_plans,
    project,
    proxy_tree,
    refresh_key,
    refresh_projectors,
    resolve_dims,
)


class GaLoreState(NamedTuple):
    """State of :func:`galore` (see the package docstring for the layout)."""

    count: jax.Array  # int32 [], number of updates so far
    inner_state: optax.OptState  # inner transform's state on the proxy (low-rank) tree
    proj_in: optax.Updates  # per leaf (*batch, in, r) or MaskedNode
    proj_out: optax.Updates  # per leaf (*batch, out, r) or MaskedNode
    last_refresh: optax.Updates  # per leaf int32 (*batch,) or MaskedNode; -1 = never
    svd_failures: jax.Array  # int32 [], refreshes that kept the previous projector
    numbering: jax.Array  # int32 (2,): (offset, stride) of the matrix indices (projection.matrix_indices)


def _check_inner(inner: optax.GradientTransformation, proxy: Any) -> None:
    """The inner transform must run on the low-rank tree with ``params=None`` and keep its shapes."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), proxy)

    def run(p: Any) -> Any:
        return inner.update(p, inner.init(p), None)[0]

    try:
        out = jax.eval_shape(run, abstract)
    except Exception as e:  # any failure means it cannot run on low-rank gradients without params
        raise ValueError(
            "base_optimizer: must be a gradient transformation that needs no params (e.g. scale_by_adam_hf(), "
            f"optax.scale_by_adam()); put weight decay / learning rate after scale_by_galore ({type(e).__name__}: {e})"
        ) from e
    same = jax.tree.structure(out) == jax.tree.structure(abstract) and all(
        a.shape == b.shape for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(abstract), strict=True)
    )
    if not same:
        raise ValueError("base_optimizer: its updates must have the shapes of its input gradients")


# --------------------------------------------------------------------------------------------
# Validated settings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GaLoreSettings:
    """:func:`scale_by_galore`'s keywords after validation (numbers may be traced under ``inject_hyperparams``)."""

    rank: Any
    update_proj_gap: Any
    scale: Any
    proj_type: str
    inner: optax.GradientTransformationExtraArgs
    mask: MaskOrFn
    dimension_numbers: Any
    staggered: bool
    svd: str
    moments: str
    canonical_signs: bool
    power_iters: Any
    oversample: Any
    seed: Any
    projector: str
    random_from: Any
    svd_fn: SvdFn


def galore_settings(
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    inner: optax.GradientTransformation | None = None,
    mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh: str = "all",
    svd: str = "exact",
    moments: str = "keep",
    canonical_signs: bool = False,
    power_iters: int = 2,
    oversample: int = 8,
    seed: int = 0,
    projector: str = "svd",
    random_from: int = 0,
    svd_fn: SvdFn | None = None,
) -> GaLoreSettings:
    """Validate :func:`scale_by_galore`'s arguments (its keywords and defaults; ``inner`` is its ``base_optimizer``,
    ``svd_fn`` its ``_svd_fn``)."""
    check_int(rank, "rank", lo=1)
    check_int(update_proj_gap, "update_proj_gap", lo=1)
    check_real(scale, "scale", lo=0.0, lo_open=True)
    check_choice(proj_type, "proj_type", PROJ_TYPES, hints=PROJ_TYPE_HINTS)
    check_choice(refresh, "refresh", REFRESH_MODES)
    check_choice(svd, "svd", SVD_MODES)
    check_choice(moments, "moments", MOMENT_MODES)
    check_int(power_iters, "power_iters", lo=0)
    check_int(oversample, "oversample", lo=0)
    check_int(seed, "seed", lo=0)
    check_bool(canonical_signs, "canonical_signs")
    check_choice(projector, "projector", PROJECTORS)
    if check_int(random_from, "random_from", lo=0) and projector == "svd":
        raise ValueError(f"random_from: only applies with projector='random', got random_from={random_from}")
    if inner is None:
        inner = scale_by_adam_hf()
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise ValueError(f"base_optimizer: must be an optax GradientTransformation, got {type(inner).__name__}")
    return GaLoreSettings(
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        inner=optax.with_extra_args_support(inner),
        mask=mask,
        dimension_numbers=dimension_numbers,
        staggered=refresh == "staggered",
        svd=svd,
        moments=moments,
        canonical_signs=canonical_signs,
        power_iters=power_iters,
        oversample=oversample,
        seed=seed,
        projector=projector,
        random_from=random_from,
        svd_fn=svd_fn or dense_svd,
    )


# --------------------------------------------------------------------------------------------
# Init and the low-rank step
# --------------------------------------------------------------------------------------------


def init_galore_state(params: optax.Params, s: GaLoreSettings) -> GaLoreState:
    """The initial :class:`GaLoreState` of ``params``: identity projectors, the inner state on the proxy tree."""
    leaves, treedef, plans = init_plans(
        params, rank=s.rank, mask=s.mask, dimension_numbers=s.dimension_numbers, proj_type=s.proj_type
    )
    proxy = proxy_tree(leaves, treedef, plans)
    _check_inner(s.inner, proxy)
    inner_state = s.inner.init(proxy)
    if s.moments != "keep":
        check_moments(inner_state, treedef, plans, s.moments)
    proj_in, proj_out = identity_projectors(plans, leaves)
    last = [optax.MaskedNode() if p is None else jnp.full(p.batch_shape, -1, jnp.int32) for p in plans]
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        inner_state=inner_state,
        proj_in=treedef.unflatten(proj_in),
        proj_out=treedef.unflatten(proj_out),
        last_refresh=treedef.unflatten(last),
        svd_failures=jnp.zeros([], jnp.int32),
        numbering=default_numbering(),
    )


def _read_state(
    updates: optax.Updates, state: GaLoreState, dimension_numbers: Any
) -> tuple[list, Any, list[Plan | None], list, list, list]:
    """``(leaves, treedef, plans, pins, pouts, lasts)``: the plans are rebuilt from the projector shapes."""
    leaves, treedef = jax.tree.flatten(updates)
    pins = treedef.flatten_up_to(state.proj_in)
    pouts = treedef.flatten_up_to(state.proj_out)
    lasts = treedef.flatten_up_to(state.last_refresh)
    arr = lambda x: None if isinstance(x, optax.MaskedNode) else x
    pins, pouts = [arr(x) for x in pins], [arr(x) for x in pouts]
    selected = [not isinstance(x, optax.MaskedNode) for x in lasts]
    dims = resolve_dims(dimension_numbers, updates, leaves)
    plans = make_plans(
        leaves,
        selected,
        dims,
        lambda i, m, n: (pins[i] is not None, pouts[i] is not None),
        lambda i, m, n: (pins[i] if pins[i] is not None else pouts[i]).shape[-1],
    )
    return leaves, treedef, plans, pins, pouts, lasts


def _svd_config(s: GaLoreSettings, count: jax.Array) -> SvdConfig:
    """How this step's refreshes compute their projectors."""
    return SvdConfig(
        svd=s.svd,
        power_iters=s.power_iters,
        oversample=static_int(s.oversample, "oversample", "it sets the sketch size") if s.svd == "randomized" else 0,
        canonical_signs=s.canonical_signs,
        svd_fn=s.svd_fn,
        projector=s.projector,
        use_random=False if s.projector == "svd" else count >= s.random_from,
    )


class LowRankStep(NamedTuple):
    """One low-rank step, before back-projection (lists hold one entry per leaf)."""

    leaves: list  # the gradient
    treedef: Any
    plans: list  # Plan | None
    mats: list  # the gradient as (B, m, n) matrices (None for unprojected leaves)
    low: list  # the projected (low-rank) gradients; the gradient itself for unprojected leaves
    inner: list  # the inner transform's updates of ``low``
    pins: list  # projectors after this step's refreshes
    pouts: list
    state: GaLoreState  # the new state


def low_rank_step(updates: optax.Updates, state: GaLoreState, s: GaLoreSettings, extra_args: dict) -> LowRankStep:
    """Refresh the due projectors, carry the moments, project, run the inner transform (no back-projection)."""
    leaves, treedef, plans, pins, pouts, lasts = _read_state(updates, state, s.dimension_numbers)
    count = state.count
    cfg = _svd_config(s, count)
    needs_key = s.svd == "randomized" or s.projector == "random"
    base_key = refresh_key(s.seed, count) if needs_key else None
    new = refresh_projectors(
        leaves, plans, pins, pouts, lasts, count, s.update_proj_gap, s.staggered, base_key, state.numbering, cfg
    )

    inner_state = state.inner_state
    if s.moments != "keep":
        inner_state = remix_moments(
            inner_state, treedef, plans, pins, new.pins, pouts, new.pouts, new.refreshed, s.staggered, s.moments
        )
    low = project(leaves, plans, new.mats, new.pins, new.pouts)
    inner_updates, inner_state = s.inner.update(treedef.unflatten(low), inner_state, None, **extra_args)

    mk = lambda xs: treedef.unflatten([optax.MaskedNode() if x is None else x for x in xs])
    new_state = GaLoreState(
        count=optax.safe_int32_increment(count),
        inner_state=inner_state,
        proj_in=mk(new.pins),
        proj_out=mk(new.pouts),
        last_refresh=treedef.unflatten(new.lasts),
        svd_failures=state.svd_failures + new.failures,
        numbering=state.numbering,
    )
    inner_list = treedef.flatten_up_to(inner_updates)
    return LowRankStep(leaves, treedef, plans, new.mats, low, inner_list, new.pins, new.pouts, new_state)


# --------------------------------------------------------------------------------------------
# The transformations
# --------------------------------------------------------------------------------------------


def scale_by_galore(
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    base_optimizer: optax.GradientTransformation | None = None,
    mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh: str = "all",
    svd: str = "exact",
    moments: str = "keep",
    canonical_signs: bool = False,
    power_iters: int = 2,
    oversample: int = 8,
    seed: int = 0,
    projector: str = "svd",
    random_from: int = 0,
    _svd_fn: SvdFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    """GaLore gradient projection around a params-free ``base_optimizer`` (see the package docstring).

    Composable like ``optax.scale_by_adam``: no learning rate, no weight decay (chain them after it, or use the
    complete optimizer :func:`galore`). Defaults are galore-torch's (rank 128, ``update_proj_gap`` 200, ``scale``
    0.25, ``proj_type='std'``, HF-style Adam with eps 1e-6 as the base optimizer).

    Args:
      rank: projection rank ``r`` (per leaf clamped to ``min(in, out)``).
      update_proj_gap: ``T``, steps between projector refreshes.
      scale: ``α``, multiplies the back-projected update of projected leaves (paper: 0.25).
      proj_type: ``'std' | 'reverse_std' | 'input' | 'output' | 'both'`` (table in the package doc).
      base_optimizer: params-free optax transform run on the low-rank gradients (and at full size on
        unselected leaves); default :func:`scale_by_adam_hf` (the official AdamW without lr).
      mask: pytree (prefix) of bools or ``params -> pytree`` selecting the projected leaves;
        default every leaf with ``ndim >= 2`` (:func:`~lowrank_jax.optim.masks.path_mask` selects by name).
      dimension_numbers: pytree prefix of :class:`GaLoreDims` / None, or ``params -> pytree``;
        default for ndim > 2: leading axes are batch axes, last two are (in, out).
      refresh: ``'all'`` (official: every matrix at ``count % T == 0``) or ``'staggered'``.
      svd: ``'exact'`` (float32 ``jnp.linalg.svd``) or ``'randomized'``.
      moments: ``'keep'`` (official), ``'reproject'``, ``'reproject_first'`` (GoLore) or ``'reset'`` on refresh.
      canonical_signs: make singular-vector signs deterministic across backends.
      power_iters, oversample, seed: randomized SVD settings (``seed`` also seeds GoLore's projectors).
      projector: ``'svd'`` (GaLore) or ``'random'`` (GoLore: the refreshes at steps ``>= random_from``
        draw random orthonormal projectors instead of an SVD; see :func:`scale_by_golore`).
      random_from: GoLore's switch step (official: ``rand_ratio · steps``); only with ``projector='random'``.
      _svd_fn: testing hook replacing ``jnp.linalg.svd(x, full_matrices=False)`` (``x -> (u, s, vh)``).

    Returns:
      An optax transformation whose state is a :class:`GaLoreState`.
    """
    settings = galore_settings(
        rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        inner=base_optimizer,
        mask=mask,
        dimension_numbers=dimension_numbers,
        refresh=refresh,
        svd=svd,
        moments=moments,
        canonical_signs=canonical_signs,
        power_iters=power_iters,
        oversample=oversample,
        seed=seed,
        projector=projector,
        random_from=random_from,
        svd_fn=_svd_fn,
    )
    return guard_composition(_galore_transform(settings), "galore", complete=False)


def _galore_transform(s: GaLoreSettings) -> optax.GradientTransformationExtraArgs:
    """:func:`scale_by_galore`'s init and update for validated settings."""

    def init_fn(params: optax.Params) -> GaLoreState:
        return init_galore_state(params, s)

    def update_fn(
        updates: optax.Updates, state: GaLoreState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, GaLoreState]:
        del params
        st = low_rank_step(updates, state, s, extra_args)
        out = back_project(st.leaves, st.plans, st.inner, st.pins, st.pouts, s.scale)
        return st.treedef.unflatten(out), st.state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def galore(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    eight_bit: bool = False,
    mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh: str = "all",
    svd: str = "exact",
    moments: str = "keep",
    canonical_signs: bool = False,
    power_iters: int = 2,
    oversample: int = 8,
    seed: int = 0,
    projector: str = "svd",
    random_from: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """GaLore-AdamW, the official optimizer, complete like ``optax.adamw``.

    ``chain(scale_by_galore(base_optimizer=HF Adam(b1, b2, eps)), add_decayed_weights(weight_decay), lr)``:
    projected leaves move by ``lr · scale · project_back(Adam_HF(R))``, the others by ``lr · Adam_HF(g)``;
    decoupled weight decay ``lr · wd · W`` applies to ``weight_decay_mask`` (default: leaves with ndim >= 2).
    Defaults are galore-torch's (Zhao et al., ICML 2024, arXiv:2403.03507): rank 128, ``update_proj_gap`` 200,
    ``scale`` 0.25, eps 1e-6; the paper's runs use lr 0.01 and no weight decay. ``eight_bit=True`` keeps the
    low-rank moments 8-bit (the paper's 8-bit GaLore). ``mask`` None selects the attention and MLP matrices by
    name (:data:`~lowrank_jax.optim.masks.DEFAULT_TARGETS`), as the official scripts do; the embedding, norms and
    output head get the same Adam at full size. The other keywords are :func:`scale_by_galore`'s.

    Difference to galore-torch: it decays the already-updated weight, ``W ← (W − lr·u)(1 − lr·wd)``, whereas this
    decays the current one, ``W ← W − lr·(u + wd·W)``; they differ by ``lr²·wd·u`` per step (zero for ``wd = 0``).
    """
    check_learning_rate(learning_rate, "galore")
    scaling = scale_by_galore(
        rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        base_optimizer=hf_adam(b1, b2, eps, eight_bit),
        mask=resolve_mask(mask),
        dimension_numbers=dimension_numbers,
        refresh=refresh,
        svd=svd,
        moments=moments,
        canonical_signs=canonical_signs,
        power_iters=power_iters,
        oversample=oversample,
        seed=seed,
        projector=projector,
        random_from=random_from,
    )
    return complete_optimizer("galore", scaling, learning_rate, weight_decay, weight_decay_mask)
