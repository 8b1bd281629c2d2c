"""LDAdam: Adam on low-dimensional gradient statistics, carried across subspace changes.

Reference: Thomas Robert, Mher Safaryan, Ionut-Vlad Modoranu, Dan Alistarh, "LDAdam: Adaptive Optimization from
Low-Dimensional Gradient Statistics", ICLR 2025, arXiv:2410.16103 (official code IST-DASLab/LDAdam,
``ldadamw_torch/ldadamw.py`` and ``projector.py``).

Algorithm, for every selected matrix with accumulated gradient ``A_t = G_t + E_{t−1}`` (rank ``r``, projector
``P_t`` of orthonormal columns, low-dimensional moments ``m, v``; ``t`` counts updates from 0)::

    t = 0:  P_t ← top-r singular vectors of A_t (SVD),  P_{t−1} = 0
    t > 0:  B = ρ · P_{t−1} m / (1 − β1ᵗ) + (1 − ρ) · A_t          block power iteration, one step:
            P_t ← QR(B Bᵀ P_{t−1})                                   (warm-started from P_{t−1}, no SVD)
    R_t = P_tᵀ A_t;   R = P_tᵀ P_{t−1}  (r × r)                    low-rank gradient; change of subspace
    m̃ = R m                                                        projection-aware first moment
    v ← | (R∘R) (v / (1−β2ᵗ) − m² / (1−β1ᵗ)²) + m̃² / (1−β1ᵗ)² | · (1−β2ᵗ)     (t > 0; then m ← m̃)
    E_t = A_t − P_t R_t + β1/(1−β1) · (P_{t−1} m_old − P_t m̃)       generalised error feedback
    m ← β1 m + (1−β1) R_t;   v ← β2 v + (1−β2) R_t²
    ΔW = P_t · (m / (1−β1^{t+1})) / (√(v / (1−β2^{t+1})) + ε)     (times −lr outside this transform)

The projected side follows the official ``proj_type`` (PyTorch ``(out, in)`` weights): ``std`` projects the input
side when ``out > in`` and the output side otherwise (a square matrix: the output side); ``reverse_std`` the
opposite; ``input`` / ``output`` force a side. The rank is not clamped: a rank above the projected side is an error,
as in the official code. The error buffer ``E`` (``error_feedback=True``, the official default) is a full-size
state leaf here, where the official code keeps it in the ``.grad`` tensor by not zeroing it; without error feedback
no buffer is kept. The outcome does not depend on the signs of the SVD / QR columns (the moments are rotated by
``R``), so every backend gives the same trajectory.

Defaults (official LDAdamW and scripts/run_llama_pretraining_LDAdam.sh): ``b1 = 0.908``, ``b2 = 0.99``,
``eps = 1e-8`` (optax placement, after the bias correction), ``rho = 0.908``, ``rank = 16`` (pretraining scripts:
8), lr 1e-3, weight decay 0. Unselected leaves take ``base_optimizer`` (default ``optax.scale_by_adam`` with the
same ``b1, b2, eps``: the official plain AdamW group). Projections and the QR run in float32; the state keeps the
param dtype (the official states are ``p.dtype``).

State (:class:`LDAdamState`): ``count``; per selected leaf ``proj`` ``(*batch, dim, r)``, ``mu`` / ``nu``
``(*batch, r, other)``, ``error`` (the leaf's shape, or ``optax.MaskedNode()`` without error feedback); elsewhere
``optax.MaskedNode()``; ``base_state`` on the unselected leaves.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim.checks import check_bool, check_choice, check_int, check_real, static_int
from lowrank_jax.optim.complete import check_learning_rate, complete_optimizer, guard_composition
from lowrank_jax.optim.masks import resolve_mask as complete_mask
from lowrank_jax.optim.projection import MaskOrFn, Plan, make_plans, resolve_dims, resolve_mask
from lowrank_jax.optim.swan import checked_base

LDADAM_PROJ_TYPES = ("std", "reverse_std", "input", "output")
__all__ = ["LDADAM_PROJ_TYPES", "LDAdamState", "ldadam", "scale_by_ldadam"]


class LDAdamState(NamedTuple):
    """State of :func:`scale_by_ldadam` (see the module docstring)."""

    count: jax.Array  # int32 [], updates so far
    proj: optax.Updates  # per selected leaf (*batch, dim, r): the projector P_{t-1}
    mu: optax.Updates  # per selected leaf (*batch, r, other)
    nu: optax.Updates
    error: optax.Updates  # per selected leaf (its shape) with error feedback, else MaskedNode
    base_state: optax.OptState  # base optimizer on the unselected leaves


def ldadam_sides(proj_type: str, m: int, n: int) -> tuple[bool, bool]:
    """``(use_in, use_out)`` of a Flax ``m (in) × n (out)`` matrix under the official LDAdam rule (tie → output)."""
    if proj_type == "std":
        use_in = n > m
    elif proj_type == "reverse_std":
        use_in = n < m
    else:
        use_in = proj_type == "input"
    return use_in, not use_in


@dataclasses.dataclass(frozen=True)
class _Settings:
    rank: Any
    b1: Any
    b2: Any
    eps: Any
    rho: Any
    proj_type: str
    error_feedback: bool
    mask: MaskOrFn
    dimension_numbers: Any
    base: optax.GradientTransformation


def _plans(tree: Any, s: _Settings, rank: int) -> tuple[list, Any, list[Plan | None]]:
    leaves, treedef = jax.tree.flatten(tree)
    selected = resolve_mask(s.mask, tree, leaves)
    dims = resolve_dims(s.dimension_numbers, tree, leaves)
    plans = make_plans(leaves, selected, dims, lambda _, m, n: ldadam_sides(s.proj_type, m, n), lambda *_: rank)
    return leaves, treedef, plans


def _canon(p: Plan, x_bmn: jax.Array) -> jax.Array:
    """Matrices ``(B, m, n)`` → ``(B, dim, other)`` with the projected side first."""
    return x_bmn if p.use_in else jnp.swapaxes(x_bmn, 1, 2)


def _dims(p: Plan) -> tuple[int, int]:
    return (p.m, p.n) if p.use_in else (p.n, p.m)


def _masked(treedef: Any, xs: list) -> Any:
    return treedef.unflatten([optax.MaskedNode() if x is None else x for x in xs])


def _init(params: optax.Params, *, s: _Settings) -> LDAdamState:
    rank = static_int(s.rank, "rank", "it sets the state shapes")
    leaves, treedef, plans = _plans(params, s, rank)
    proj, mu, err = [], [], []
    for x, p in zip(leaves, plans, strict=True):
        if p is None:
            proj.append(None), mu.append(None), err.append(None)
            continue
        dim, other = _dims(p)
        if rank > dim:
            raise ValueError(f"rank: {rank} is larger than the projected side ({dim}) of a leaf of shape {p.shape}")
        proj.append(jnp.zeros(p.batch_shape + (dim, rank), x.dtype))
        mu.append(jnp.zeros(p.batch_shape + (rank, other), x.dtype))
        err.append(jnp.zeros(p.shape, x.dtype) if s.error_feedback else None)
    rest = treedef.unflatten([x if p is None else optax.MaskedNode() for x, p in zip(leaves, plans, strict=True)])
    return LDAdamState(
        count=jnp.zeros([], jnp.int32),
        proj=_masked(treedef, proj),
        mu=_masked(treedef, mu),
        nu=_masked(treedef, mu),
        error=_masked(treedef, err),
        base_state=s.base.init(rest),
    )


def _subspace(a: jax.Array, p_prev: jax.Array, m: jax.Array, t: jax.Array, r: int, s: _Settings) -> jax.Array:
    """The new projector ``(dim, r)``: an SVD at t = 0, one warm-started block power iteration after."""

    def svd(_: Any) -> jax.Array:
        return jnp.linalg.svd(a, full_matrices=False)[0][:, :r]

    def power(_: Any) -> jax.Array:
        b = s.rho * (p_prev @ m) / (1 - jnp.power(jnp.float32(s.b1), t)) + (1 - s.rho) * a
        return jnp.linalg.qr(b @ (b.T @ p_prev))[0]

    return jax.lax.cond(t == 0, svd, power, None)


def _matrix_step(a, p_prev, m, v, t, s: _Settings):  # noqa: ANN001, ANN202 (float32 (dim, other) / (dim, r) / (r, other))
    """One canonical matrix: ``(direction (dim, other), P, m, v, error)`` (module docstring, line by line)."""
    r = p_prev.shape[-1]
    tf = t.astype(jnp.float32)
    b1, b2 = jnp.float32(s.b1), jnp.float32(s.b2)
    p = _subspace(a, p_prev, m, t, r, s)
    low = p.T @ a
    rot = p.T @ p_prev
    m_rot = rot @ m
    error = a - p @ low + s.b1 / (1 - s.b1) * (p_prev @ m - p @ m_rot)
    bc1, bc2 = 1 - jnp.power(b1, tf), 1 - jnp.power(b2, tf)
    # t = 0: bc1 = bc2 = 0 and the moments are still zero; the where keeps the formula's 0/0 out
    safe1, safe2 = jnp.where(t > 0, bc1, 1.0), jnp.where(t > 0, bc2, 1.0)
    v_rot = jnp.abs((rot * rot) @ (v / safe2 - m * m / safe1**2) + m_rot * m_rot / safe1**2) * safe2
    m, v = jnp.where(t > 0, m_rot, m), jnp.where(t > 0, v_rot, v)
    m = b1 * m + (1 - b1) * low
    v = b2 * v + (1 - b2) * low * low
    u = (m / (1 - jnp.power(b1, tf + 1))) / (jnp.sqrt(v / (1 - jnp.power(b2, tf + 1))) + s.eps)
    return p @ u, p, m, v, error


def _batch_f32(p: Plan, x: jax.Array) -> jax.Array:
    """A state leaf ``(*batch, a, b)`` as float32 ``(B, a, b)``."""
    return x.reshape((p.nmat,) + x.shape[len(p.batch_shape) :]).astype(jnp.float32)


def _update(
    updates: optax.Updates, state: LDAdamState, params: optax.Params | None = None, *, s: _Settings
) -> tuple[optax.Updates, LDAdamState]:
    leaves, treedef = jax.tree.flatten(updates)
    projs = treedef.flatten_up_to(state.proj)
    rank_of = {i: x.shape[-1] for i, x in enumerate(projs) if not isinstance(x, optax.MaskedNode)}
    dims = resolve_dims(s.dimension_numbers, updates, leaves)
    plans = make_plans(
        leaves, [i in rank_of for i in range(len(leaves))], dims,
        lambda _, m, n: ldadam_sides(s.proj_type, m, n), lambda i, *_: rank_of[i],
    )  # fmt: skip
    mus, nus, errs = (treedef.flatten_up_to(x) for x in (state.mu, state.nu, state.error))
    rest = treedef.unflatten([x if p is None else optax.MaskedNode() for x, p in zip(leaves, plans, strict=True)])
    base_updates, base_state = s.base.update(rest, state.base_state, params)
    base_list = treedef.flatten_up_to(base_updates)
    step = jax.vmap(functools.partial(_matrix_step, s=s), in_axes=(0, 0, 0, 0, None))
    out, new_p, new_m, new_v, new_e = [], [], [], [], []
    for i, (g, p) in enumerate(zip(leaves, plans, strict=True)):
        if p is None:
            out.append(base_list[i]), new_p.append(None), new_m.append(None), new_v.append(None), new_e.append(None)
            continue
        acc = g.astype(jnp.float32) + (0.0 if isinstance(errs[i], optax.MaskedNode) else errs[i])
        f32 = functools.partial(_batch_f32, p)
        d, pr, m, v, e = step(_canon(p, p.to_mats(acc)), f32(projs[i]), f32(mus[i]), f32(nus[i]), state.count)
        unb = lambda x, like: x.reshape(like.shape).astype(like.dtype)
        out.append(p.from_mats(_canon(p, d)).astype(g.dtype))
        new_p.append(unb(pr, projs[i])), new_m.append(unb(m, mus[i])), new_v.append(unb(v, nus[i]))
        keep_e = not isinstance(errs[i], optax.MaskedNode)
        new_e.append(p.from_mats(_canon(p, e)).astype(errs[i].dtype) if keep_e else None)
    new_state = LDAdamState(
        count=optax.safe_int32_increment(state.count),
        proj=_masked(treedef, new_p),
        mu=_masked(treedef, new_m),
        nu=_masked(treedef, new_v),
        error=_masked(treedef, new_e),
        base_state=base_state,
    )
    return treedef.unflatten(out), new_state


def scale_by_ldadam(
    *,
    rank: int = 16,
    b1: float = 0.908,
    b2: float = 0.99,
    eps: float = 1e-8,
    rho: float = 0.908,
    proj_type: str = "std",
    error_feedback: bool = True,
    mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    base_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """LDAdam's update for the selected matrices (module doc), ``base_optimizer``'s for the other leaves.

    Args:
      rank: ``r`` (static in ``init``; read from the state's shapes in ``update``).
      b1, b2, eps: the low-dimensional Adam's (official 0.908, 0.99, 1e-8).
      rho: ``ρ``, the weight of the previous first moment in the power iteration's matrix (official 0.908).
      proj_type: ``'std' | 'reverse_std' | 'input' | 'output'`` (official ``std``/``reverse_std``/``right``/``left``).
      error_feedback: keep the generalised error buffer (official default True).
      mask: bool pytree (prefix) or ``params -> pytree`` of the projected leaves; default every leaf with ndim >= 2.
      dimension_numbers: :class:`~lowrank_jax.optim.projection.GaLoreDims` per leaf for ndim > 2.
      base_optimizer: params-free transform of the unselected leaves; default ``optax.scale_by_adam(b1, b2, eps)``.
    """
    check_int(rank, "rank", lo=1)
    check_real(b1, "b1", lo=0.0, hi=1.0, hi_open=True)
    check_real(b2, "b2", lo=0.0, hi=1.0, hi_open=True)
    check_real(eps, "eps", lo=0.0, lo_open=True)
    check_real(rho, "rho", lo=0.0, hi=1.0, hi_open=True)
    check_choice(proj_type, "proj_type", LDADAM_PROJ_TYPES)
    check_bool(error_feedback, "error_feedback")
    base_optimizer = checked_base(base_optimizer, lambda: optax.scale_by_adam(b1, b2, eps))
    s = _Settings(rank, b1, b2, eps, rho, proj_type, error_feedback, mask, dimension_numbers, base_optimizer)
    tx = optax.GradientTransformation(functools.partial(_init, s=s), functools.partial(_update, s=s))
    return guard_composition(tx, "ldadam", complete=False)


def ldadam(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    rank: int = 16,
    b1: float = 0.908,
    b2: float = 0.99,
    eps: float = 1e-8,
    rho: float = 0.908,
    proj_type: str = "std",
    error_feedback: bool = True,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The complete LDAdamW: :func:`scale_by_ldadam`, decoupled weight decay, learning rate (official defaults).

    ``mask`` None selects :func:`lowrank_jax.optim.masks.default_mask` (attention and MLP matrices).
    """
    check_learning_rate(learning_rate, "ldadam")
    scaling = scale_by_ldadam(
        rank=rank,
        b1=b1,
        b2=b2,
        eps=eps,
        rho=rho,
        proj_type=proj_type,
        error_feedback=error_feedback,
        mask=complete_mask(mask),
        dimension_numbers=dimension_numbers,
    )
    return complete_optimizer("ldadam", scaling, learning_rate, weight_decay, weight_decay_mask)
