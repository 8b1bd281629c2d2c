"""Fira: GaLore plus the gradient outside the subspace, rescaled by low-rank Adam's per-channel ratio.

Reference: Xi Chen, Kaituo Feng, Changsheng Li, Xunhao Lai, Xiangyu Yue, Ye Yuan, Guoren Wang, "Fira: Can We
Achieve Full-rank Training of LLMs Under Low-rank Constraint?", arXiv:2410.01623 (official code:
xichen-fy/Fira, optimizer_torch/fira_adamw.py).

Algorithm, for every selected matrix with gradient ``G_t`` (rank ``r``, gap ``T``, scale ``α``, limit ``γ``)::

    if t % T == 0:  P ← top-r singular vectors of G_t         exactly GaLore's projector and refresh
    R_t = project(G_t, P);   m, v ← Adam moments of R_t;   N_t = m / (√v + ε)
    φ   = ‖N_t‖ / (‖R_t‖ + 1e-8)                           per channel, over the rank axis   (Eq. 5–6)
    S_t = φ ⊙ (G_t − α · project_back(R_t))                 the residual, norm-based scaling
    S_t ← norm-growth limiter(S_t; γ)                       ‖S_t‖ ≤ γ ‖S_{t−1}‖                (Eq. 8)
    ΔW_t = c_t · (α · project_back(N_t) + S_t),   c_t = √(1 − b2ᵗ) / (1 − b1ᵗ)   (times −lr, outside)

Each line follows fira_adamw.py ``AdamW.step``: ``subgrad = projector.project_back(grad)`` where
``project_back`` multiplies by ``alpha`` (gradient_projection.py), so the residual is ``G − α P Pᵀ G`` and keeps
``(1 − α)`` of the in-subspace gradient unless ``α = 1`` (only then does it vanish at full rank);
``scaling_factor`` uses ``norm_grad = exp_avg / denom`` without the bias correction, which multiplies the step
size of the whole update; the limiter keeps ``‖S_t‖`` after its division (``state["scaling_grad"] =
scaling_grad_norm / limiter``) and does nothing at the first step. Leaves that are not selected get the same
HF-style AdamW at full size.

Defaults (pre_training_c4/scripts/llama_*.sh and fira_adamw.py): ``scale=0.25`` (``--alpha 0.25``; the 1B and
7B scripts use 0.0625), ``update_proj_gap=200`` (7B: 500), rank 128 / 256 / 256 / 512 / 512 for 60M / 130M /
350M / 1B / 7B, ``proj_type='std'``, γ = 1.01, ``b1, b2 = 0.9, 0.999``, ``eps = 1e-6``, lr 0.01. The projector
machinery is GaLore's, so every :func:`~lowrank_jax.optim.galore.scale_by_galore` option applies (``refresh``,
``svd``, ``moments``, ``projector='random'`` for a GoLore subspace, ``mask``, ``dimension_numbers``, …) except
``base_optimizer`` (the Adam is fixed: the factor needs its bias correction) and two-sided ``proj_type='both'``
(its ``r × r`` ratio has no channels of the gradient's shape; the official code cannot broadcast it either).

Differences from the official code: the factor, the norms and the limiter are float32 (the full-size
arithmetic is in the gradient dtype, as there); ``eight_bit=True`` keeps the low-rank moments 8-bit.

State (:class:`FiraState`): ``count``; ``galore``: the :class:`~lowrank_jax.optim.galore.GaLoreState` (projectors,
low-rank Adam moments, refresh bookkeeping); ``residual_norm``: per selected leaf a float32 ``(*batch,)``
array, ``‖S_t‖`` after the limiter (``optax.MaskedNode()`` elsewhere).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim._norm_scaling import (
    ONE_SIDED_PROJ_TYPES,
    check_norm_growth_limit,
    frobenius,
    growth_limiter,
    hf_adam,
    hf_step_size,
    scaling_factor,
)
from lowrank_jax.optim.complete import check_learning_rate, complete_optimizer, guard_composition
from lowrank_jax.optim.galore.transform import (
    GaLoreState,
    LowRankStep,
    galore_settings,
    init_galore_state,
    low_rank_step,
)
from lowrank_jax.optim.masks import resolve_mask
from lowrank_jax.optim.projection import MaskOrFn, Plan, back_project_mats


class FiraState(NamedTuple):
    """State of :func:`fira` (see the module docstring)."""

    count: jax.Array  # int32 [], number of updates so far
    galore: GaLoreState  # GaLore's state: projectors, low-rank Adam moments
    residual_norm: optax.Updates  # per leaf float32 (*batch,) or MaskedNode: ‖S_t‖ after the limiter


def scale_by_fira(
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    norm_growth_limit: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eight_bit: bool = False,
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
) -> optax.GradientTransformationExtraArgs:
    """Fira's scaling: GaLore's low-rank Adam update plus the norm-scaled, growth-limited residual (module doc).

    Composable like ``optax.scale_by_adam`` (no learning rate, no weight decay; :func:`fira` is the complete
    optimizer). The low-rank optimizer is fixed to the official HF-style Adam (float or ``eight_bit``): Fira's
    scaling factor reads its moments and bias correction.

    Args:
      rank: GaLore's projection rank ``r``.
      update_proj_gap, scale, proj_type: GaLore's ``T``, ``α`` (Fira's ``alpha``, official 0.25) and side.
      norm_growth_limit: ``γ`` of the limiter (official 1.01); 0 switches it off.
      b1, b2, eps: the low-rank Adam's (official 0.9, 0.999, 1e-6; eps before the bias correction).
      eight_bit: keep the Adam moments 8-bit quantized (block-wise, :func:`scale_by_adam_8bit`).
      mask: selects the projected leaves (default: ``ndim >= 2``); the others get HF-style Adam at full size.
      dimension_numbers, refresh, svd, moments, canonical_signs, power_iters, oversample, seed, projector,
        random_from: as for :func:`~lowrank_jax.optim.galore.scale_by_galore`.

    Returns:
      A params-free optax transformation (chain weight decay and the learning rate after it) whose state is
      a :class:`FiraState`.
    """
    check_norm_growth_limit(norm_growth_limit)
    s = galore_settings(
        rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        inner=hf_adam(b1, b2, eps, eight_bit),
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
    )
    if s.proj_type not in ONE_SIDED_PROJ_TYPES:
        raise ValueError(
            f"proj_type: fira needs a one-sided projection ({', '.join(ONE_SIDED_PROJ_TYPES)}), "
            f"got {s.proj_type!r} (its r × r ratio has no channels of the gradient's shape)"
        )

    def init_fn(params: optax.Params) -> FiraState:
        galore_state = init_galore_state(params, s)
        norms = jax.tree.map(lambda last: jnp.zeros(last.shape, jnp.float32), galore_state.last_refresh)
        return FiraState(jnp.zeros([], jnp.int32), galore_state, norms)

    def update_fn(
        updates: optax.Updates, state: FiraState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, FiraState]:
        del params
        st = low_rank_step(updates, state.galore, s, {})
        count = state.count
        c_t = hf_step_size(b1, b2, count)  # fira_adamw.py: step_size = lr * sqrt(bias_correction2) / bias_correction1
        norms = st.treedef.flatten_up_to(state.residual_norm)
        out, new_norms = [], []
        for i, p in enumerate(st.plans):
            if p is None:
                out.append(st.inner[i])  # the official param group without rank: plain AdamW
                new_norms.append(norms[i])
                continue
            update_b, norm_b = _leaf_update(st, i, p, norms[i], count, c_t, s.scale, norm_growth_limit)
            out.append(p.from_mats(update_b))
            new_norms.append(norm_b.reshape(p.batch_shape))
        new_state = FiraState(optax.safe_int32_increment(count), st.state, st.treedef.unflatten(new_norms))
        return st.treedef.unflatten(out), new_state

    tx = optax.GradientTransformation(init_fn, update_fn)
    return guard_composition(tx, "fira", complete=False)


def fira(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    norm_growth_limit: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eight_bit: bool = False,
    weight_decay: float = 0.0,
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
    """Fira-AdamW, complete like ``optax.adamw``: ``chain(scale_by_fira(…), add_decayed_weights, lr)``.

    Defaults are the official code's and scripts' (Chen et al., arXiv:2410.01623): rank 128 (60M; 256–512 for the
    larger models), ``update_proj_gap`` 200, ``scale`` (alpha) 0.25, γ 1.01, eps 1e-6; the scripts use lr 0.01.
    ``mask`` None selects the attention and MLP matrices by name; the rest gets the same Adam at full size.
    Weight decay applies to ``weight_decay_mask`` (default: leaves with ndim >= 2). The other keywords are
    :func:`scale_by_fira`'s.
    """
    check_learning_rate(learning_rate, "fira")
    scaling = scale_by_fira(
        rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        norm_growth_limit=norm_growth_limit,
        b1=b1,
        b2=b2,
        eps=eps,
        eight_bit=eight_bit,
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
    return complete_optimizer("fira", scaling, learning_rate, weight_decay, weight_decay_mask)


def _leaf_update(
    st: LowRankStep, i: int, p: Plan, prev: jax.Array, count: jax.Array, c_t: jax.Array, scale: Any, gamma: Any
) -> tuple[jax.Array, jax.Array]:
    """Leaf ``i``'s update ``(B, m, n)``: GaLore's back-projected step plus the scaled, limited residual; and the
    residual norm the limiter keeps, ``(B,)``."""
    g, u, r, pi, po = st.leaves[i], st.inner[i], st.low[i], st.pins[i], st.pouts[i]
    alpha = jnp.asarray(scale, g.dtype)
    # gradient_projection.py: project_back multiplies by alpha, so subgrad = alpha · P R
    residual_b = st.mats[i] - alpha * back_project_mats(p, r, pi, po).astype(g.dtype)
    phi = scaling_factor(p.low_b(u).astype(jnp.float32) / c_t, p.low_b(r), p, "channel")
    norm = frobenius(residual_b, phi)
    limiter, norm_b = growth_limiter(norm, prev.reshape(-1), count == 0, gamma)
    coef = (phi * (c_t / limiter)[:, None, None]).astype(g.dtype)
    # step_size · (project_back(norm_grad) + scaling_grad); the inner's u already carries c_t
    main_b = alpha * back_project_mats(p, u, pi, po).astype(g.dtype)
    return main_b + coef * residual_b, norm_b
