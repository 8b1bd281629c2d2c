"""The projection core of GaLore, GoLore, APOLLO and Fira: which matrices are projected, onto which subspace, when
the subspace is refreshed, and the projection and back-projection themselves.

The four methods share one scheme. For every selected weight matrix with gradient ``G_t`` (rank ``r``, gap ``T``)::

    if refresh due at t:  P ← new projector       GaLore / Fira: top-r singular vectors of G_t (SVD)
                                                   GoLore: random orthonormal once t >= random_from
                                                   APOLLO: random Gaussian, entries N(0, 1/r)
    R_t = project(G_t, P)                          Pᵀ G_t (input side), G_t P (output side) or both
    …  a low-rank optimizer state is kept for R_t  …
    ΔW_t = project_back(N_t, P)                     P N_t,  N_t Pᵀ  (GaLore, GoLore, Fira)

References: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
arXiv 2403.03507; He, Li, Hu, Chen, Yuan, "Subspace Optimization for Large Language Models with Convergence
Guarantees" (GoLore), ICML 2025, arXiv 2410.11289; Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
MLSys 2025, arXiv 2412.05270; Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?", arXiv 2410.01623.

Plans. A :class:`Plan` is the static description of one projected leaf (shapes and flags only): the leaf is seen as
a batch of ``B`` matrices ``m (in) × n (out)`` (:class:`GaLoreDims`, default: leading axes are batch axes), with
the side(s) it projects (:func:`sides`, the ``proj_type`` table of :mod:`lowrank_jax.optim.galore`) and its rank.
:func:`init_plans` builds the plans of a params tree from ``mask``, ``dimension_numbers``, ``proj_type`` and
``rank``; an update rebuilds the same plans from its state (:func:`make_plans`), so the rank and sides need not be
static there. :func:`proxy_tree` is the tree the low-rank optimizer runs on (low-rank shapes for projected leaves,
the params as they are for the others).

Projection. With ``P_in`` (in × r) and ``P_out`` (out × r): :func:`project` gives ``P_inᵀ G``, ``G P_out`` or
``P_inᵀ G P_out``; :func:`back_project` gives ``scale · P_in U``, ``scale · U P_outᵀ`` or both, in the gradient
dtype. Matmuls run in the gradient dtype with JAX's default precision.

Refresh schedule (:func:`due_matrices`). ``refresh='all'`` (official): every matrix at ``count % T == 0``, ``count``
counting updates from 0. ``refresh='staggered'``: matrix ``i`` of ``N`` refreshes when ``count % T == (i · T) // N``,
and every matrix at step 0, since no projector exists yet. APOLLO draws its Gaussian from the key of the period's
first step, ``count − count mod T`` (:func:`period_start`), so the projector need not be stored.

Projectors (:func:`refresh_projectors`). An SVD runs in float32 (exact, or the randomized range finder of Halko,
Martinsson, Tropp 2011) and its factors are cast to the projector dtype; optionally every singular vector is
flipped so that its largest-|·| entry is positive (the same trajectory on every backend). A refresh whose gradient
or SVD is not finite keeps the previous projector and counts as a failure. Refreshes are ``jax.lax.cond``\\ s, so a
step that does not refresh computes no SVD: with ``'all'`` a batched leaf has one cond around a batched SVD, with
``'staggered'`` a ``jax.lax.map`` over its matrices with a cond inside each (never a vmapped cond, which would
compute both branches).

Random numbers come from ``fold_in(fold_in(fold_in(key(seed), t), j), side)``: ``t`` the step of the refresh
(:func:`refresh_key`), ``j`` the matrix index (leaves in flatten order, every matrix of a batched leaf counts;
:func:`matrix_keys`), ``side`` 0 for the input-side projector and 1 for the output side (:func:`side_key`). The
matrix index is ``j = local · stride + offset`` with the state's ``numbering = (offset, stride)``
(:func:`matrix_indices`): ``(0, 1)`` for a transform over the whole model; the per-layer fused update
(:mod:`lowrank_jax.train.layerwise`), which runs one block's transform per layer, sets layer ``l`` of ``L`` to
``(l, L)``, so every layer's matrix gets the index it has in the stacked model (the same random draws and
staggered refresh offsets as the ordinary step).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim.checks import is_traced, static_int

PROJ_TYPES = ("std", "reverse_std", "input", "output", "both")
# galore-torch's names, which are PyTorch (out, in) orientation: the error for them names the Flax equivalent.
_TORCH_NAMES = {"left": "output", "right": "input", "full": "both"}
PROJ_TYPE_HINTS = {
    k: f"{k!r} is PyTorch orientation: use {v!r} for Flax (in, out) kernels" for k, v in _TORCH_NAMES.items()
}
REFRESH_MODES = ("all", "staggered")
SVD_MODES = ("exact", "randomized")
# 'svd': GaLore; 'random': GoLore (He et al. 2025), random orthonormal projectors from random_from on.
PROJECTORS = ("svd", "random")

MaskOrFn = Any | Callable[[optax.Params], Any] | None
SvdFn = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


# --------------------------------------------------------------------------------------------
# Plans: which leaves are projected, as which matrices, on which side(s)
# --------------------------------------------------------------------------------------------


class GaLoreDims(NamedTuple):
    """How a leaf is seen as a batch of matrices: axis indices (negative allowed).

    ``rows`` form the input side, ``cols`` the output side, ``batch`` index independent matrices
    (each gets its own projector). Every axis must appear exactly once.
    """

    batch: Sequence[int] | int = ()
    rows: Sequence[int] | int = (0,)
    cols: Sequence[int] | int = (1,)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one projected leaf seen as ``B`` matrices of shape ``m × n``."""

    shape: tuple[int, ...]
    perm: tuple[int, ...]  # transpose to (batch…, rows…, cols…)
    batch_shape: tuple[int, ...]
    m: int  # input side (rows)
    n: int  # output side (cols)
    rank: int  # effective rank, <= min(m, n) for an SVD projector
    use_in: bool
    use_out: bool
    first: int  # global index of this leaf's first matrix

    @property
    def nmat(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def low_mn(self) -> tuple[int, int]:
        return (self.rank if self.use_in else self.m, self.rank if self.use_out else self.n)

    @property
    def low_shape(self) -> tuple[int, ...]:
        return self.batch_shape + self.low_mn

    def proj_b(self, x: jax.Array | None, dim: int) -> jax.Array | None:
        """Projector ``(*batch, dim, r)`` → ``(B, dim, r)``; None stays None."""
        return None if x is None else x.reshape((self.nmat, dim, self.rank))

    def proj_unb(self, x: jax.Array | None, dim: int) -> jax.Array | None:
        """Projector ``(B, dim, r)`` → ``(*batch, dim, r)``; None stays None."""
        return None if x is None else x.reshape(self.batch_shape + (dim, self.rank))

    def low_b(self, x: jax.Array) -> jax.Array:
        """Low-rank leaf → ``(B, ·, ·)``."""
        return x.reshape((self.nmat,) + self.low_mn)

    def to_mats(self, x: jax.Array) -> jax.Array:
        """Leaf → (B, m, n)."""
        return jnp.transpose(x, self.perm).reshape((self.nmat, self.m, self.n))

    def from_mats(self, x_bmn: jax.Array) -> jax.Array:
        """(B, m, n) → leaf shape."""
        permuted = tuple(self.shape[a] for a in self.perm)
        inverse = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
        return jnp.transpose(x_bmn.reshape(permuted), inverse)


class _Leaves:
    """Non-pytree box of per-leaf values used while broadcasting a prefix tree."""

    def __init__(self, values: list[Any]) -> None:
        self.values = values


def _broadcast_prefix(prefix: Any, tree: Any, name: str, is_leaf: Callable[[Any], bool]) -> list[Any]:
    """One value per leaf of ``tree`` from a pytree-prefix ``prefix``."""
    try:
        boxed = jax.tree.map(lambda v, sub: _Leaves([v] * len(jax.tree.leaves(sub))), prefix, tree, is_leaf=is_leaf)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: must be a pytree prefix of the params ({e})") from e
    return [v for box in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, _Leaves)) for v in box.values]


def resolve_mask(mask: MaskOrFn, tree: Any, leaves: list[Any]) -> list[bool]:
    """One static bool per leaf of ``tree``: ``mask`` (a pytree prefix or ``tree -> prefix``), default ``ndim >= 2``."""
    if mask is None:
        return [leaf.ndim >= 2 for leaf in leaves]
    if callable(mask):
        mask = mask(tree)
    values = _broadcast_prefix(mask, tree, "mask", is_leaf=lambda x: x is None)
    out = []
    for v, leaf in zip(values, leaves, strict=True):
        if is_traced(v):
            raise ValueError("mask: must hold static booleans, got a traced value")
        sel = bool(v) if v is not None else False
        if sel and leaf.ndim < 2:
            raise ValueError(f"mask: selects a leaf of shape {tuple(leaf.shape)}; GaLore needs ndim >= 2")
        out.append(sel)
    return out


def _is_dims_leaf(x: Any) -> bool:
    return x is None or isinstance(x, GaLoreDims)


def resolve_dims(dimension_numbers: Any, tree: Any, leaves: list[Any]) -> list[GaLoreDims | None]:
    """One :class:`GaLoreDims` (or None: the default layout) per leaf of ``tree``."""
    if dimension_numbers is None:
        return [None] * len(leaves)
    if callable(dimension_numbers) and not isinstance(dimension_numbers, GaLoreDims):
        dimension_numbers = dimension_numbers(tree)
    values = _broadcast_prefix(dimension_numbers, tree, "dimension_numbers", is_leaf=_is_dims_leaf)
    for v in values:
        if not _is_dims_leaf(v):
            raise ValueError(f"dimension_numbers: leaves must be GaLoreDims or None, got {v!r}")
    return values


def _axes(value: Sequence[int] | int, ndim: int) -> tuple[int, ...]:
    axes = (value,) if isinstance(value, int) else tuple(value)
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"dimension_numbers: axis out of range in {axes} for ndim {ndim}")
    return tuple(a % ndim for a in axes)


def _layout(shape: tuple[int, ...], dims: GaLoreDims | None) -> tuple[tuple[int, ...], int, int, int]:
    """``(perm, n_batch_axes, m, n)`` of a leaf seen as a batch of matrices."""
    ndim = len(shape)
    if dims is None:
        dims = GaLoreDims(batch=tuple(range(ndim - 2)), rows=(ndim - 2,), cols=(ndim - 1,))
    batch, rows, cols = (_axes(a, ndim) for a in dims)
    perm = batch + rows + cols
    if sorted(perm) != list(range(ndim)) or not rows or not cols:
        raise ValueError(
            f"dimension_numbers: {dims} must use every axis of shape {shape} exactly once, with rows and cols non-empty"
        )
    m = math.prod(shape[a] for a in rows)
    n = math.prod(shape[a] for a in cols)
    return perm, len(batch), m, n


def sides(proj_type: str, m: int, n: int) -> tuple[bool, bool]:
    """``(use_in, use_out)`` for a Flax gradient ``m (in) × n (out)`` (``std``: the smaller side, tie → input)."""
    if proj_type == "std":
        return (m <= n, m > n)
    if proj_type == "reverse_std":
        return (m > n, m <= n)
    return (proj_type in ("input", "both"), proj_type in ("output", "both"))


def make_plans(
    leaves: list[Any],
    selected: list[bool],
    dims: list[GaLoreDims | None],
    sides_of: Callable[[int, int, int], tuple[bool, bool]],
    rank_of: Callable[[int, int, int], int],
) -> list[Plan | None]:
    """One :class:`Plan` per selected leaf (None elsewhere); ``sides_of`` / ``rank_of`` take ``(leaf index, m, n)``."""
    plans: list[Plan | None] = []
    first = 0
    for i, (leaf, sel, d) in enumerate(zip(leaves, selected, dims, strict=True)):
        if not sel:
            plans.append(None)
            continue
        shape = tuple(leaf.shape)
        perm, nb, m, n = _layout(shape, d)
        use_in, use_out = sides_of(i, m, n)
        batch_shape = tuple(shape[a] for a in perm[:nb])
        plan = Plan(shape, perm, batch_shape, m, n, rank_of(i, m, n), use_in, use_out, first)
        first += plan.nmat
        plans.append(plan)
    return plans


def init_plans(
    params: optax.Params, *, rank: Any, mask: MaskOrFn, dimension_numbers: Any, proj_type: str, clamp: bool = True
) -> tuple[list, Any, list[Plan | None]]:
    """``(leaves, treedef, plans)`` of ``params`` for a transform's ``init`` (``rank`` must be static here).

    ``clamp``: the effective rank is ``min(rank, in, out)`` (an SVD has no more singular vectors); a random
    Gaussian projection (APOLLO) may have more columns than the side it projects.
    """
    rank_ = static_int(rank, "rank", "it sets the state shapes")
    leaves, treedef = jax.tree.flatten(params)
    selected = resolve_mask(mask, params, leaves)
    dims = resolve_dims(dimension_numbers, params, leaves)
    rank_of = (lambda _, m, n: min(rank_, m, n)) if clamp else (lambda *_: rank_)
    plans = make_plans(leaves, selected, dims, lambda _, m, n: sides(proj_type, m, n), rank_of)
    return leaves, treedef, plans


def proxy_tree(leaves: list, treedef: Any, plans: list[Plan | None]) -> Any:
    """The tree the low-rank optimizer runs on: zeros of the low-rank shape for projected leaves, the rest as is."""
    proxy = [leaf if p is None else jnp.zeros(p.low_shape, leaf.dtype) for leaf, p in zip(leaves, plans, strict=True)]
    return treedef.unflatten(proxy)


def identity_projectors(plans: list[Plan | None], leaves: list[Any]) -> tuple[list, list]:
    """Initial ``(proj_in, proj_out)`` per leaf: the truncated identity, ``optax.MaskedNode()`` where not projected."""
    eye = lambda p, dim, dtype: jnp.broadcast_to(jnp.eye(dim, p.rank, dtype=dtype), p.batch_shape + (dim, p.rank))
    proj_in, proj_out = [], []
    for p, x in zip(plans, leaves, strict=True):
        proj_in.append(eye(p, p.m, x.dtype) if p is not None and p.use_in else optax.MaskedNode())
        proj_out.append(eye(p, p.n, x.dtype) if p is not None and p.use_out else optax.MaskedNode())
    return proj_in, proj_out


# --------------------------------------------------------------------------------------------
# Project and project back (lists hold one entry per leaf; None where a leaf or side is not projected)
# --------------------------------------------------------------------------------------------


def project(leaves: list, plans: list[Plan | None], mats: list, pins: list, pouts: list) -> list:
    """Low-rank gradients (``P_inᵀ G``, ``G P_out`` or both) for projected leaves, the gradient itself otherwise.

    ``mats``: each projected gradient as ``(B, m, n)`` matrices (:meth:`Plan.to_mats`).
    """
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


def back_project_mats(p: Plan, u: jax.Array, pi: jax.Array | None, po: jax.Array | None) -> jax.Array:
    """``P_in U`` / ``U P_outᵀ`` of one leaf's low-rank ``u`` as ``(B, m, n)`` matrices (in ``u``'s dtype)."""
    y = p.low_b(u)
    if p.use_in:
        y = jnp.einsum("bmr,brn->bmn", p.proj_b(pi, p.m).astype(y.dtype), y)
    if p.use_out:
        y = jnp.einsum("bmr,bnr->bmn", y, p.proj_b(po, p.n).astype(y.dtype))
    return y


def back_project(leaves: list, plans: list[Plan | None], inner: list, pins: list, pouts: list, scale: Any) -> list:
    """``scale · P_in U`` / ``U P_outᵀ`` (in the gradient dtype) for projected leaves; the inner update otherwise."""
    out = []
    for g, p, u, pi, po in zip(leaves, plans, inner, pins, pouts, strict=True):
        if p is None:
            out.append(u)
            continue
        out.append((p.from_mats(back_project_mats(p, u, pi, po)) * scale).astype(g.dtype))
    return out


# --------------------------------------------------------------------------------------------
# Refresh schedule and random keys
# --------------------------------------------------------------------------------------------


def default_numbering() -> jax.Array:
    """``(offset, stride) = (0, 1)``: a transform's matrices numbered as they come (see the module doc)."""
    return jnp.array([0, 1], jnp.int32)


def matrix_indices(plan: Plan, numbering: jax.Array) -> jax.Array:
    """The global indices of a leaf's matrices, ``(B,)`` int32: ``(first + b) · stride + offset``."""
    local = jnp.arange(plan.first, plan.first + plan.nmat, dtype=jnp.int32)
    return local * numbering[1] + numbering[0]


def due_matrices(
    count: jax.Array, update_proj_gap: Any, idx: jax.Array, n_total: Any, staggered: bool, nmat: int
) -> jax.Array:
    """``(B,)`` bool: which of a leaf's matrices (global indices ``idx``) refresh at step ``count``.

    ``'all'``: every matrix at ``count % T == 0``; ``staggered``: matrix ``i`` of ``n_total`` at
    ``count % T == (i · T) // n_total``, and every matrix at step 0.
    """
    if staggered:
        return ((count % update_proj_gap) == (idx * update_proj_gap) // n_total) | (count == 0)
    return jnp.broadcast_to((count % update_proj_gap) == 0, (nmat,))


def period_start(count: jax.Array, update_proj_gap: Any) -> jax.Array:
    """The first step of the refresh period holding ``count``: ``count − count mod T`` (APOLLO's draw step)."""
    return count - count % update_proj_gap


def refresh_key(seed: Any, step: jax.Array) -> jax.Array:
    """The key of the random draws of one step: ``fold_in(key(seed), step)``."""
    return jax.random.fold_in(jax.random.key(seed), step)


def matrix_keys(base_key: jax.Array, idx: jax.Array) -> jax.Array:
    """One key per matrix, ``(B,)``: ``base_key`` folded with the matrix's global index (:func:`matrix_indices`)."""
    return jax.vmap(lambda j: jax.random.fold_in(base_key, j))(idx)


def side_key(key: jax.Array, use_out: bool) -> jax.Array:
    """The key of one side's projector: 0 for the input side, 1 for the output side."""
    return jax.random.fold_in(key, int(use_out))


# --------------------------------------------------------------------------------------------
# Projectors: SVD (GaLore, Fira), random orthonormal (GoLore), random Gaussian (APOLLO)
# --------------------------------------------------------------------------------------------


def random_orthonormal(key: jax.Array, dim: int, r: int) -> jax.Array:
    """A ``dim × r`` matrix with orthonormal columns, uniform on the Stiefel manifold (float32).

    GoLore (arXiv 2410.11289, §4) samples ``Z`` with i.i.d. N(0, 1) entries and takes its polar factor
    ``Z (ZᵀZ)^(-1/2)`` (official ``get_random_orthogonal_matrix``, peft_pretraining/projector.py), which is
    ``U Vᵀ`` for the thin SVD ``Z = U S Vᵀ``.
    """
    z = jax.random.normal(key, (dim, r), jnp.float32)
    u, _, vh = jnp.linalg.svd(z, full_matrices=False)
    return u @ vh


def random_gaussian(key: jax.Array, dim: int, r: int) -> jax.Array:
    """APOLLO's projection: ``dim × r`` with i.i.d. N(0, 1/r) entries (float32).

    Official apollo_torch/random_projector.py, ``get_orthogonal_matrix``: ``stable_randn(shape) / sqrt(rank)``;
    not orthonormal; scaled so that ``E[P Pᵀ] = I`` (Johnson–Lindenstrauss: ``‖Pᵀx‖ ≈ ‖x‖``).
    """
    return jax.random.normal(key, (dim, r), jnp.float32) / jnp.sqrt(jnp.float32(r))


def gaussian_projectors(
    p: Plan, base_key: jax.Array, numbering: jax.Array, dtype: Any
) -> tuple[jax.Array | None, jax.Array | None]:
    """A leaf's Gaussian projectors (:func:`random_gaussian`) drawn from ``base_key``, ``(B, dim, r)`` in ``dtype``."""
    keys_b = matrix_keys(base_key, matrix_indices(p, numbering))
    draw = lambda dim, out: jax.vmap(lambda k: random_gaussian(side_key(k, out), dim, p.rank))(keys_b).astype(dtype)
    return (draw(p.m, False) if p.use_in else None), (draw(p.n, True) if p.use_out else None)


def dense_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``jnp.linalg.svd(x, full_matrices=False)``."""
    return jnp.linalg.svd(x, full_matrices=False)


def _canonical_columns(x_kr: jax.Array) -> jax.Array:
    """Flip each column so that its largest-|·| entry is positive."""
    idx = jnp.argmax(jnp.abs(x_kr), axis=0)
    sign = jnp.sign(jnp.take_along_axis(x_kr, idx[None, :], axis=0))
    return x_kr * jnp.where(sign == 0, 1, sign).astype(x_kr.dtype)


@dataclasses.dataclass(frozen=True)
class SvdConfig:
    """How a refresh computes its projectors (GaLore's ``svd``, ``power_iters``, ``oversample``, … settings)."""

    svd: str
    power_iters: Any  # int or traced
    oversample: int
    canonical_signs: bool
    svd_fn: SvdFn
    projector: str = "svd"
    use_random: Any = False  # bool or traced: this step's refreshes draw random projectors (GoLore)


def _top_singular(
    x_mn: jax.Array, r: int, key: jax.Array | None, cfg: SvdConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-r ``(u (m×r), s (r,), vh (r×n))`` of a float32 matrix."""
    m, n = x_mn.shape
    if cfg.svd == "exact":
        u, s, vh = cfg.svd_fn(x_mn)
        return u[:, :r], s[:r], vh[:r]
    k = min(r + cfg.oversample, m, n)
    omega_nk = jax.random.normal(key, (n, k), jnp.float32)
    q_mk, _ = jnp.linalg.qr(x_mn @ omega_nk)

    def power(_: Any, q: jax.Array) -> jax.Array:
        z_nk, _ = jnp.linalg.qr(x_mn.T @ q)
        q, _ = jnp.linalg.qr(x_mn @ z_nk)
        return q

    q_mk = jax.lax.fori_loop(0, cfg.power_iters, power, q_mk)
    ub_kk, s, vh_kn = cfg.svd_fn(q_mk.T @ x_mn)
    return (q_mk @ ub_kk)[:, :r], s[:r], vh_kn[:r]


def _random_projectors(
    p_in: jax.Array | None, p_out: jax.Array | None, key: jax.Array, plan: Plan
) -> tuple[jax.Array | None, jax.Array | None, jax.Array]:
    """GoLore: fresh random orthonormal projectors for the projected side(s); never a failure."""
    new_in = None if p_in is None else random_orthonormal(side_key(key, False), plan.m, plan.rank).astype(p_in.dtype)
    new_out = None if p_out is None else random_orthonormal(side_key(key, True), plan.n, plan.rank).astype(p_out.dtype)
    return new_in, new_out, jnp.ones((), bool)


def _new_projectors(
    g_mn: jax.Array,
    p_in: jax.Array | None,
    p_out: jax.Array | None,
    key: jax.Array | None,
    plan: Plan,
    cfg: SvdConfig,
) -> tuple[jax.Array | None, jax.Array | None, jax.Array]:
    """Projectors from the SVD of one gradient matrix, or the old ones if anything is not finite."""
    x = g_mn.astype(jnp.float32)
    finite_in = jnp.all(jnp.isfinite(x))
    u, s, vh = _top_singular(jnp.where(finite_in, x, 0.0), plan.rank, key, cfg)
    if cfg.canonical_signs:
        u, vh = _canonical_columns(u), _canonical_columns(vh.T).T
    ok = finite_in & jnp.all(jnp.isfinite(s)) & jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(vh))
    new_in = None if p_in is None else jnp.where(ok, u.astype(p_in.dtype), p_in)
    new_out = None if p_out is None else jnp.where(ok, vh.T.astype(p_out.dtype), p_out)
    return new_in, new_out, ok


def refresh_leaf(
    plan: Plan,
    g_b: jax.Array,
    pin_b: jax.Array | None,
    pout_b: jax.Array | None,
    do_b: jax.Array,
    keys_b: jax.Array | None,
    staggered: bool,
    cfg: SvdConfig,
) -> tuple[jax.Array | None, jax.Array | None, jax.Array, jax.Array]:
    """New ``(pin_b, pout_b, refreshed_b, failed_b)`` for the ``B`` matrices of a leaf (``do_b``: which are due)."""

    def one(g: jax.Array, pi: Any, po: Any, k: Any) -> tuple[Any, Any, jax.Array]:
        svd_fn = lambda: _new_projectors(g, pi, po, k, plan, cfg)
        if cfg.projector == "svd":
            return svd_fn()
        # GoLore: with projector='random' a cond on this step's use_random draws random ones instead (no SVD)
        return jax.lax.cond(cfg.use_random, lambda: _random_projectors(pi, po, k, plan), svd_fn)

    yes = jnp.ones((), bool)
    if staggered and plan.nmat > 1:
        # One cond per matrix inside a sequential map: only the due matrices compute an SVD.
        def body(args: tuple) -> tuple:
            g, pi, po, do, k = args
            pi, po, ok = jax.lax.cond(do, one, lambda g, pi, po, k: (pi, po, yes), g, pi, po, k)
            return pi, po, do & ok, do & ~ok

        return jax.lax.map(body, (g_b, pin_b, pout_b, do_b, keys_b))

    # Every matrix of the leaf is due at the same steps (or B == 1): one cond, all SVDs inside.
    def refresh_all(g: jax.Array, pi: Any, po: Any, k: Any) -> tuple[Any, Any, jax.Array]:
        if jax.default_backend() == "cpu":
            # Batched CPU LAPACK kernels fan their batch out onto the thread pool that every host
            # device also runs on; with several CPU devices refreshing at once they all wait on
            # tasks that no free thread can pick up (a deadlock seen with jax 0.10.2 on 8 devices).
            # One matrix at a time keeps each kernel unbatched; on CPU this costs no parallelism
            # the thunk executor does not already get from the independent leaves.
            return jax.lax.map(lambda a: one(*a), (g, pi, po, k))
        return jax.vmap(one)(g, pi, po, k)

    def keep_all(g: jax.Array, pi: Any, po: Any, k: Any) -> tuple[Any, Any, jax.Array]:
        return pi, po, jnp.ones(do_b.shape, bool)

    pin_b, pout_b, ok_b = jax.lax.cond(do_b[0], refresh_all, keep_all, g_b, pin_b, pout_b, keys_b)
    return pin_b, pout_b, do_b & ok_b, do_b & ~ok_b


class Refreshed(NamedTuple):
    """The outcome of :func:`refresh_projectors` (lists hold one entry per leaf; None where not projected)."""

    mats: list  # the gradient as (B, m, n) matrices
    pins: list  # projectors after this step's refreshes
    pouts: list
    lasts: list  # int32 (*batch,): step of the last successful refresh
    refreshed: list  # bool (B,): refreshed at this step
    failures: jax.Array  # int32 [], refreshes at this step that kept the old projector


def refresh_projectors(
    leaves: list,
    plans: list[Plan | None],
    pins: list,
    pouts: list,
    lasts: list,
    count: jax.Array,
    update_proj_gap: Any,
    staggered: bool,
    base_key: jax.Array | None,
    numbering: jax.Array,
    cfg: SvdConfig,
) -> Refreshed:
    """Refresh the due matrices' projectors (:func:`due_matrices`) from the gradient ``leaves``."""
    n_total = sum(p.nmat for p in plans if p is not None) * numbering[1]
    new_pins, new_pouts, new_lasts = list(pins), list(pouts), list(lasts)
    refreshed: list[jax.Array | None] = [None] * len(leaves)
    failures = jnp.zeros([], jnp.int32)
    mats: list[jax.Array | None] = [None] * len(leaves)
    for i, (g, p) in enumerate(zip(leaves, plans, strict=True)):
        if p is None:
            continue
        idx = matrix_indices(p, numbering)
        do_b = due_matrices(count, update_proj_gap, idx, n_total, staggered, p.nmat)
        keys_b = None if base_key is None else matrix_keys(base_key, idx)
        g_b = p.to_mats(g)
        mats[i] = g_b
        pin_b, pout_b, rf_b, fail_b = refresh_leaf(
            p, g_b, p.proj_b(pins[i], p.m), p.proj_b(pouts[i], p.n), do_b, keys_b, staggered, cfg
        )
        new_pins[i], new_pouts[i] = p.proj_unb(pin_b, p.m), p.proj_unb(pout_b, p.n)
        new_lasts[i] = jnp.where(rf_b, count, lasts[i].reshape(-1)).reshape(p.batch_shape)
        refreshed[i] = rf_b
        failures = failures + jnp.sum(fail_b, dtype=jnp.int32)
    return Refreshed(mats, new_pins, new_pouts, new_lasts, refreshed, failures)
