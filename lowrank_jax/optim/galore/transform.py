"""The GaLore transformation: :func:`galore` (any params-free inner transform) and :func:`galore_adamw`.

One update (the algorithm box of :mod:`lowrank_jax.optim.galore`): read the plans back from the state, refresh the
due projectors (:func:`_refresh_projectors`), optionally carry the inner moments into the new bases
(:func:`~lowrank_jax.optim.galore.moments._remix_inner`), project the gradients (:func:`_project`), run the inner
transform on the low-rank tree, back-project and scale its updates (:func:`_back_project`).

The methods built on GaLore reuse these pieces instead of repeating them: Fira (:mod:`lowrank_jax.optim.fira`)
takes the validated settings (:func:`_galore_settings`), the state (:func:`_init_state`) and the whole low-rank
step (:func:`_low_rank_step`) and adds its residual; APOLLO (:mod:`lowrank_jax.optim.apollo`) takes the plans
(:func:`_init_plans`), the proxy tree and the projection (:func:`_project`) with its own random projectors.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim._checks import check_bool, check_choice, check_int, check_real, static_int
from lowrank_jax.optim.adam_hf import scale_by_adam_hf
from lowrank_jax.optim.galore.moments import MOMENT_MODES, _check_moments, _remix_inner
from lowrank_jax.optim.galore.plan import (
    _PROJ_TYPE_HINTS,
    PROJ_TYPES,
    MaskOrFn,
    _make_plans,
    _Plan,
    _resolve_dims,
    _resolve_mask,
    _sides,
)
from lowrank_jax.optim.galore.projectors import (
    PROJECTORS,
    REFRESH_MODES,
    SVD_MODES,
    SvdFn,
    _dense_svd,
    _refresh_leaf,
    _SvdConfig,
    default_numbering,
    matrix_indices,
    matrix_keys,
)


class GaLoreState(NamedTuple):
    """State of :func:`galore` (see the package docstring for the layout)."""

    count: jax.Array  # int32 [], number of updates so far
    inner_state: optax.OptState  # inner transform's state on the proxy (low-rank) tree
    proj_in: optax.Updates  # per leaf (*batch, in, r) or MaskedNode
    proj_out: optax.Updates  # per leaf (*batch, out, r) or MaskedNode
    last_refresh: optax.Updates  # per leaf int32 (*batch,) or MaskedNode; -1 = never
    svd_failures: jax.Array  # int32 [], refreshes that kept the previous projector
    numbering: jax.Array  # int32 (2,): (offset, stride) of the matrix indices (projectors.matrix_indices)


def _check_inner(inner: optax.GradientTransformation, proxy: Any) -> None:
    """The inner transform must run on the low-rank tree with ``params=None`` and keep its shapes."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), proxy)

    def run(p: Any) -> Any:
        return inner.update(p, inner.init(p), None)[0]

    try:
        out = jax.eval_shape(run, abstract)
    except Exception as e:  # any failure means it cannot run on low-rank gradients without params
        raise ValueError(
            "inner: must be a gradient transformation that needs no params (e.g. scale_by_adam_hf(), "
            f"optax.scale_by_adam()); put weight decay / learning rate after galore ({type(e).__name__}: {e})"
        ) from e
    same = jax.tree.structure(out) == jax.tree.structure(abstract) and all(
        a.shape == b.shape for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(abstract), strict=True)
    )
    if not same:
        raise ValueError("inner: its updates must have the shapes of its input gradients")


# --------------------------------------------------------------------------------------------
# The steps of one update (lists hold one entry per leaf; None where a leaf or side is not projected)
# --------------------------------------------------------------------------------------------


def _identity_projectors(plans: list[_Plan | None], leaves: list[Any]) -> tuple[list, list]:
    """Initial ``(proj_in, proj_out)``: the truncated identity (used only if the step-0 SVD fails)."""
    eye = lambda p, dim, dtype: jnp.broadcast_to(jnp.eye(dim, p.rank, dtype=dtype), p.batch_shape + (dim, p.rank))
    proj_in, proj_out = [], []
    for p, x in zip(plans, leaves, strict=True):
        proj_in.append(eye(p, p.m, x.dtype) if p is not None and p.use_in else optax.MaskedNode())
        proj_out.append(eye(p, p.n, x.dtype) if p is not None and p.use_out else optax.MaskedNode())
    return proj_in, proj_out


def _read_state(
    updates: optax.Updates, state: GaLoreState, dimension_numbers: Any
) -> tuple[list, Any, list[_Plan | None], list, list, list]:
    """``(leaves, treedef, plans, pins, pouts, lasts)``: the plans are rebuilt from the projector shapes."""
    leaves, treedef = jax.tree.flatten(updates)
    pins = treedef.flatten_up_to(state.proj_in)
    pouts = treedef.flatten_up_to(state.proj_out)
    lasts = treedef.flatten_up_to(state.last_refresh)
    arr = lambda x: None if isinstance(x, optax.MaskedNode) else x
    pins, pouts = [arr(x) for x in pins], [arr(x) for x in pouts]
    selected = [not isinstance(x, optax.MaskedNode) for x in lasts]
    dims = _resolve_dims(dimension_numbers, updates, leaves)
    plans = _make_plans(
        leaves,
        selected,
        dims,
        lambda i, m, n: (pins[i] is not None, pouts[i] is not None),
        lambda i, m, n: (pins[i] if pins[i] is not None else pouts[i]).shape[-1],
    )
    return leaves, treedef, plans, pins, pouts, lasts


class _Refreshed(NamedTuple):
    mats: list  # the gradient as (B, m, n) matrices
    pins: list  # projectors after this step's refreshes
    pouts: list
    lasts: list  # int32 (*batch,): step of the last successful refresh
    refreshed: list  # bool (B,): refreshed at this step
    failures: jax.Array  # int32 [], refreshes at this step that kept the old projector


def _refresh_projectors(
    leaves: list,
    plans: list[_Plan | None],
    pins: list,
    pouts: list,
    lasts: list,
    count: jax.Array,
    update_proj_gap: Any,
    staggered: bool,
    base_key: jax.Array | None,
    numbering: jax.Array,
    cfg: _SvdConfig,
) -> _Refreshed:
    """Refresh the due matrices' projectors: all at ``count % T == 0``, or matrix ``i`` of ``N`` at its offset."""
    n_total = sum(p.nmat for p in plans if p is not None) * numbering[1]
    new_pins, new_pouts, new_lasts = list(pins), list(pouts), list(lasts)
    refreshed: list[jax.Array | None] = [None] * len(leaves)
    failures = jnp.zeros([], jnp.int32)
    mats: list[jax.Array | None] = [None] * len(leaves)
    for i, (g, p) in enumerate(zip(leaves, plans, strict=True)):
        if p is None:
            continue
        idx = matrix_indices(p, numbering)
        if staggered:
            do_b = ((count % update_proj_gap) == (idx * update_proj_gap) // n_total) | (count == 0)
        else:
            do_b = jnp.broadcast_to((count % update_proj_gap) == 0, (p.nmat,))
        keys_b = None if base_key is None else matrix_keys(base_key, idx)
        g_b = p.to_mats(g)
        mats[i] = g_b
        pin_b, pout_b, rf_b, fail_b = _refresh_leaf(
            p, g_b, p.proj_b(pins[i], p.m), p.proj_b(pouts[i], p.n), do_b, keys_b, staggered, cfg
        )
        new_pins[i], new_pouts[i] = p.proj_unb(pin_b, p.m), p.proj_unb(pout_b, p.n)
        new_lasts[i] = jnp.where(rf_b, count, lasts[i].reshape(-1)).reshape(p.batch_shape)
        refreshed[i] = rf_b
        failures = failures + jnp.sum(fail_b, dtype=jnp.int32)
    return _Refreshed(mats, new_pins, new_pouts, new_lasts, refreshed, failures)


def _project(leaves: list, plans: list[_Plan | None], mats: list, pins: list, pouts: list) -> list:
    """Low-rank gradients (``P_inᵀ G``, ``G P_out`` or both) for projected leaves, the gradient itself otherwise."""
    low = []
    for g, p, g_b, pi, po in zip(leaves, plans, mats, pins, pouts, strict=True):
        if p is None:
            low.append(g)
            continue
        x = g_b
        if p.use_in:
            x = jnp.einsum("bmr,bmn->brn", p.proj_b(pi, p.m).astype(g.dtype), x)
        if p.use_out:
            x = jnp.einsum("bmn,bnr->bmr", x, p.proj_b(po, p.n).astype(g.dtype))
        low.append(x.reshape(p.low_shape))
    return low


def _back_project_mats(p: _Plan, u: jax.Array, pi: jax.Array | None, po: jax.Array | None) -> jax.Array:
    """``P_in U`` / ``U P_outᵀ`` of one leaf's low-rank ``u`` as ``(B, m, n)`` matrices (in ``u``'s dtype)."""
    y = p.low_b(u)
    if p.use_in:
        y = jnp.einsum("bmr,brn->bmn", p.proj_b(pi, p.m).astype(y.dtype), y)
    if p.use_out:
        y = jnp.einsum("bmr,bnr->bmn", y, p.proj_b(po, p.n).astype(y.dtype))
    return y


def _back_project(leaves: list, plans: list[_Plan | None], inner: list, pins: list, pouts: list, scale: Any) -> list:
    """``scale · P_in U`` / ``U P_outᵀ`` (in the gradient dtype) for projected leaves; the inner update otherwise."""
    out = []
    for g, p, u, pi, po in zip(leaves, plans, inner, pins, pouts, strict=True):
        if p is None:
            out.append(u)
            continue
        out.append((p.from_mats(_back_project_mats(p, u, pi, po)) * scale).astype(g.dtype))
    return out


# --------------------------------------------------------------------------------------------
# The transformations: validated settings, init and the low-rank step, shared with Fira
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    """:func:`galore`'s keywords after validation (numbers may be traced under ``inject_hyperparams``)."""

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


def _settings(kw: dict[str, Any]) -> _Settings:
    """Validate :func:`galore`'s arguments, given as a dict of all of them (``locals()`` of :func:`galore`)."""
    rank, update_proj_gap, scale, proj_type = kw["rank"], kw["update_proj_gap"], kw["scale"], kw["proj_type"]
    refresh, svd, moments, canonical_signs = kw["refresh"], kw["svd"], kw["moments"], kw["canonical_signs"]
    power_iters, oversample, seed, projector = kw["power_iters"], kw["oversample"], kw["seed"], kw["projector"]
    random_from, inner = kw["random_from"], kw["inner"]
    check_int(rank, "rank", lo=1)
    check_int(update_proj_gap, "update_proj_gap", lo=1)
    check_real(scale, "scale", lo=0.0, lo_open=True)
    check_choice(proj_type, "proj_type", PROJ_TYPES, hints=_PROJ_TYPE_HINTS)
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
        raise ValueError(f"inner: must be an optax GradientTransformation, got {type(inner).__name__}")
    return _Settings(
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        inner=optax.with_extra_args_support(inner),
        mask=kw["mask"],
        dimension_numbers=kw["dimension_numbers"],
        staggered=refresh == "staggered",
        svd=svd,
        moments=moments,
        canonical_signs=canonical_signs,
        power_iters=power_iters,
        oversample=oversample,
        seed=seed,
        projector=projector,
        random_from=random_from,
        svd_fn=kw["_svd_fn"] or _dense_svd,
    )


def _init_plans(
    params: optax.Params, *, rank: Any, mask: MaskOrFn, dimension_numbers: Any, proj_type: str, clamp: bool = True
) -> tuple[list, Any, list[_Plan | None]]:
    """``(leaves, treedef, plans)`` of ``params`` for ``init`` (``rank`` must be static here).

    ``clamp``: the effective rank is ``min(rank, in, out)`` (an SVD has no more singular vectors); a random
    Gaussian projection (APOLLO) may have more columns than the side it projects.
    """
    rank_ = static_int(rank, "rank", "it sets the state shapes")
    leaves, treedef = jax.tree.flatten(params)
    selected = _resolve_mask(mask, params, leaves)
    dims = _resolve_dims(dimension_numbers, params, leaves)
    rank_of = (lambda _, m, n: min(rank_, m, n)) if clamp else (lambda *_: rank_)
    plans = _make_plans(leaves, selected, dims, lambda _, m, n: _sides(proj_type, m, n), rank_of)
    return leaves, treedef, plans


def _proxy_tree(leaves: list, treedef: Any, plans: list[_Plan | None]) -> Any:
    """The tree the inner transform runs on: zeros of the low-rank shape for projected leaves, the rest as is."""
    proxy = [leaf if p is None else jnp.zeros(p.low_shape, leaf.dtype) for leaf, p in zip(leaves, plans, strict=True)]
    return treedef.unflatten(proxy)


def _init_state(params: optax.Params, s: _Settings) -> GaLoreState:
    leaves, treedef, plans = _init_plans(
        params, rank=s.rank, mask=s.mask, dimension_numbers=s.dimension_numbers, proj_type=s.proj_type
    )
    proxy_tree = _proxy_tree(leaves, treedef, plans)
    _check_inner(s.inner, proxy_tree)
    inner_state = s.inner.init(proxy_tree)
    if s.moments != "keep":
        _check_moments(inner_state, treedef, plans, s.moments)
    proj_in, proj_out = _identity_projectors(plans, leaves)
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


class _Step(NamedTuple):
    """One low-rank step, before back-projection (lists hold one entry per leaf)."""

    leaves: list  # the gradient
    treedef: Any
    plans: list  # _Plan | None
    mats: list  # the gradient as (B, m, n) matrices (None for unprojected leaves)
    low: list  # the projected (low-rank) gradients; the gradient itself for unprojected leaves
    inner: list  # the inner transform's updates of ``low``
    pins: list  # projectors after this step's refreshes
    pouts: list
    state: GaLoreState  # the new state


def _low_rank_step(updates: optax.Updates, state: GaLoreState, s: _Settings, extra_args: dict) -> _Step:
    """Refresh the due projectors, carry the moments, project, run the inner transform (no back-projection)."""
    leaves, treedef, plans, pins, pouts, lasts = _read_state(updates, state, s.dimension_numbers)
    count = state.count
    use_random = False if s.projector == "svd" else count >= s.random_from
    cfg = _SvdConfig(
        svd=s.svd,
        power_iters=s.power_iters,
        oversample=static_int(s.oversample, "oversample", "it sets the sketch size") if s.svd == "randomized" else 0,
        canonical_signs=s.canonical_signs,
        svd_fn=s.svd_fn,
        projector=s.projector,
        use_random=use_random,
    )
    needs_key = s.svd == "randomized" or s.projector == "random"
    base_key = jax.random.fold_in(jax.random.key(s.seed), count) if needs_key else None
    new = _refresh_projectors(
        leaves, plans, pins, pouts, lasts, count, s.update_proj_gap, s.staggered, base_key, state.numbering, cfg
    )

    inner_state = state.inner_state
    if s.moments != "keep":
        inner_state = _remix_inner(
            inner_state, treedef, plans, pins, new.pins, pouts, new.pouts, new.refreshed, s.staggered, s.moments
        )
    low = _project(leaves, plans, new.mats, new.pins, new.pouts)
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
    return _Step(leaves, treedef, plans, new.mats, low, inner_list, new.pins, new.pouts, new_state)


def galore(
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
    _svd_fn: SvdFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    """GaLore gradient projection around an ``inner`` transform (see the package docstring).

    Args:
      rank: projection rank ``r`` (per leaf clamped to ``min(in, out)``).
      update_proj_gap: ``T``, steps between projector refreshes.
      scale: ``α``, multiplies the back-projected update of projected leaves (paper: 0.25).
      proj_type: ``'std' | 'reverse_std' | 'input' | 'output' | 'both'`` (table in the package doc).
      inner: params-free optax transform run on the low-rank gradients (and at full size on
        unselected leaves); default :func:`scale_by_adam_hf` (the official AdamW without lr).
      mask: pytree (prefix) of bools or ``params -> pytree`` selecting the projected leaves;
        default every leaf with ``ndim >= 2``.
      dimension_numbers: pytree prefix of :class:`GaLoreDims` / None, or ``params -> pytree``;
        default for ndim > 2: leading axes are batch axes, last two are (in, out).
      refresh: ``'all'`` (official: every matrix at ``count % T == 0``) or ``'staggered'``.
      svd: ``'exact'`` (float32 ``jnp.linalg.svd``) or ``'randomized'``.
      moments: ``'keep'`` (official), ``'reproject'``, ``'reproject_first'`` (GoLore) or ``'reset'`` on refresh.
      canonical_signs: make singular-vector signs deterministic across backends.
      power_iters, oversample, seed: randomized SVD settings (``seed`` also seeds GoLore's projectors).
      projector: ``'svd'`` (GaLore) or ``'random'`` (GoLore: the refreshes at steps ``>= random_from``
        draw random orthonormal projectors instead of an SVD).
      random_from: GoLore's switch step (official: ``rand_ratio · steps``); only with ``projector='random'``.
      _svd_fn: testing hook replacing ``jnp.linalg.svd(x, full_matrices=False)`` (``x -> (u, s, vh)``).

    Returns:
      An optax transformation whose state is a :class:`GaLoreState`.
    """
    s = _settings(dict(locals()))

    def init_fn(params: optax.Params) -> GaLoreState:
        return _init_state(params, s)

    def update_fn(
        updates: optax.Updates, state: GaLoreState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, GaLoreState]:
        del params
        st = _low_rank_step(updates, state, s, extra_args)
        out = _back_project(st.leaves, st.plans, st.inner, st.pins, st.pouts, s.scale)
        return st.treedef.unflatten(out), st.state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# galore()'s keyword options and their defaults (also the options of the methods built on it, e.g. fira()).
GALORE_OPTIONS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(galore).parameters.items() if name not in ("rank", "_svd_fn")
}


def _galore_settings(rank: int, options: dict[str, Any]) -> _Settings:
    """:func:`galore`'s validated settings for ``rank`` and a subset of its keyword options."""
    unknown = sorted(set(options) - set(GALORE_OPTIONS))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an option of galore (options: {', '.join(GALORE_OPTIONS)})")
    return _settings({**GALORE_OPTIONS, "_svd_fn": None, **options, "rank": rank})


def _matrix_mask(params: optax.Params) -> Any:
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    weight_decay: float = 0.0,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
    **galore_kwargs: Any,
) -> optax.GradientTransformation:
    """The official GaLore-AdamW: ``chain(galore(inner=scale_by_adam_hf), add_decayed_weights, lr)``.

    Projected leaves move by ``lr · scale · project_back(Adam_HF(R))``, the others by
    ``lr · Adam_HF(g)``; decoupled weight decay ``lr · wd · W`` applies to ``weight_decay_mask``
    (default: leaves with ndim >= 2). Difference to galore-torch: it decays the already-updated
    weight, ``W ← (W − lr·u)(1 − lr·wd)``, whereas this decays the current one, ``W ← W − lr·(u +
    wd·W)``; they differ by ``lr²·wd·u`` per step (zero for the papers' ``wd = 0``).
    ``galore_kwargs`` go to :func:`galore` (``refresh``, ``svd``, ``moments``, …).
    """
    if "inner" in galore_kwargs:
        raise ValueError("inner: galore_adamw fixes the inner transform; use galore(..., inner=...) instead")
    return optax.chain(
        galore(
            rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            inner=scale_by_adam_hf(b1, b2, eps),
            mask=mask,
            **galore_kwargs,
        ),
        optax.add_decayed_weights(
            weight_decay, mask=weight_decay_mask if weight_decay_mask is not None else _matrix_mask
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
