"""GaLore: gradient low-rank projection, as an optax GradientTransformation.

Reference: Zhao, Zhang, Chen, Wang, Anandkumar, Tian, "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", ICML 2024, arXiv:2403.03507 (official code: galore-torch).

Algorithm, for every selected weight matrix with gradient ``G_t`` (rank ``r``, gap ``T``, scale ``α``)::

    if t % T == 0:   P ← top-r singular vectors of G_t       (SVD in float32, cast to G's dtype)
    R_t  = project(G_t, P)           low-rank gradient, e.g. Pᵀ G_t (r × n)
    N_t  = inner(R_t)                any params-free optax transform (default: HF-style Adam),
                                     so its state (Adam's m, v) is low-rank
    ΔW_t = α · project_back(N_t, P)  e.g. P N_t (m × n)

Leaves that are not selected (by default: every leaf with ``ndim < 2``) get ``inner`` at full
size. A single inner state serves both groups: ``inner`` is initialised once on a "proxy" tree
that holds the low-rank shapes for projected leaves and the params themselves for the others.

Orientation. Flax kernels are ``(in, out)`` with ``y = x @ K``; PyTorch weights are ``(out, in)``
``= K.T``. A Flax gradient ``G`` is ``in × out``. The *input-side* projector ``P_in`` (in × r) holds
the top-r left singular vectors of ``G``: low-rank gradient ``P_inᵀ G`` (r × out), back-projection
``P_in U``. The *output-side* projector ``P_out`` (out × r) holds the top-r right singular vectors:
low-rank ``G P_out`` (in × r), back-projection ``U P_outᵀ``.

==============  =============================================  ==========================
``proj_type``   side(s) projected (Flax ``G``: in × out)        official galore-torch name
==============  =============================================  ==========================
``std``         the smaller of in/out; tie → input              ``std``
``reverse_std`` the larger of in/out; tie → output              ``reverse_std``
``input``       always input (``P_in``)                         ``right`` (``Vh[:r]``)
``output``      always output (``P_out``)                       ``left`` (``U[:, :r]``)
``both``        both: ``P_inᵀ G P_out`` (r × r)                 ``full`` (``Aᵀ G Bᵀ``)
==============  =============================================  ==========================

(Official ``std``: for a PyTorch gradient m × n with m ≥ n use the right projector ``Vh[:r]``,
which spans n = in, else the left ``U[:, :r]``, which spans m = out.) ``optax.contrib.galore``
projects the larger side, i.e. it equals ``reverse_std`` here except for square matrices, where
it projects the input side like ``std``.

Defaults reproduce the official semantics: the SVD of the *current* gradient at steps 0, T, 2T, …
(``count % T == 0``, count starting at 0 on the first update) for every leaf; Adam moments kept
as they are (not rotated, not reset) across refreshes while the bias correction keeps counting;
``scale`` multiplies the back-projected update. The effective rank of a leaf is
``min(rank, in, out)`` because a thin SVD has no more singular vectors (the official code slices
the same thin SVD; with ``rank >= min(in, out)`` and ``std`` the projector is square orthogonal).

Opt-in improvements:

- ``refresh='staggered'``: matrix ``i`` of ``N`` (leaves in flatten order; every matrix of a
  batched leaf counts) refreshes when ``count % T == (i * T) // N``, spreading SVD cost over the
  gap (no step after step 0 refreshes more than ``ceil(N / T)`` matrices). Step 0 computes every
  projector once, since none exists yet, so a matrix with a non-zero offset refreshes twice in
  the first period.
- ``svd='randomized'``: randomized range finder (Halko, Martinsson, Tropp 2011) with
  ``oversample`` extra columns and ``power_iters`` QR-orthonormalised power iterations, then a
  small exact SVD; O(m n r) instead of O(m n min(m, n)). Random test matrices come from
  ``(seed, count, matrix index)``.
- ``moments='reproject'``: on a refresh rotate the inner moments into the new basis with
  ``R = P_newᵀ P_old`` (r × r): first moment ``m ← R m`` (along the projected side, exact for
  the projection of the old estimate), second moment ``v ← (R∘R) v`` (elementwise-squared
  rotation: an approximation that keeps ``v ≥ 0``). ``moments='reset'`` zeroes the moments of
  the refreshed matrices. The moments are found anywhere in the inner state (inside chains and
  wrappers) as NamedTuple fields ``mu`` (first moment) and ``nu`` (second moment), which covers
  :func:`scale_by_adam_hf`, ``optax.scale_by_adam``, ``optax.scale_by_lion`` …; other state
  types (e.g. quantized moments) plug in with :func:`register_moments`. An inner state with other
  per-parameter leaves (e.g. AMSGrad's ``nu_max``) or no moments is rejected at init.
- ``canonical_signs=True``: flip every singular vector so that its largest-|·| entry is
  positive, so that CPU/GPU/TPU SVDs give the same trajectory (with ``moments='keep'`` the
  trajectory after a refresh depends on the SVD's sign convention).

Robustness (always on): a refresh whose gradient or SVD is not finite keeps the previous projector
(the truncated identity before the first success) and increments ``svd_failures``.

State layout (:class:`GaLoreState`): ``count``; ``inner_state`` (on the proxy tree); ``proj_in`` /
``proj_out``: per leaf ``(*batch, in, r)`` / ``(*batch, out, r)`` in the param dtype, or
``optax.MaskedNode()`` where that side is not projected; ``last_refresh``: per leaf int32
``batch_shape`` array, the step of the last successful refresh (-1 before the first); and
``svd_failures`` (int32 total). Shapes never change between steps.

Higher-rank leaves (``dimension_numbers``): a leaf of ndim > 2 is a batch of matrices described by
:class:`GaLoreDims` axis indices; default: every leading axis is a batch axis and the last two are
(in, out), so a scanned LLaMA's ``(layers, in, out)`` kernels get one projector per layer. Use
``GaLoreDims(rows=(0,), cols=(1, 2))`` for an ``(embed, heads, head_dim)`` kernel. Refreshes are
``jax.lax.cond``\\ s, so a step that does not refresh computes no SVD; with ``refresh='all'`` a
batched leaf has one cond around a batched SVD, with ``'staggered'`` a ``jax.lax.map`` over its
matrices with a cond inside each (never a vmapped cond, which would compute both branches).

Precision: SVDs run in float32; projectors are stored in the param dtype (= the gradient dtype
in the usual case, as in the official code); projections and back-projections are matmuls in the
gradient dtype with JAX's default precision (set ``jax_default_matmul_precision`` for closer
agreement with PyTorch float32 on accelerators). Note for ``both``: at a refresh the low-rank
gradient is ``diag(σ)`` and a first Adam step with a tiny ``eps`` turns its off-diagonal rounding
noise into O(1e-2) updates — in the official code as much as here.

Differences from galore-torch (none changes the default trajectory for weight decay 0): the
projected leaves are chosen by ``mask`` (default: all matrices; the official scripts list the
attention/MLP modules, so pass such a mask); a failed SVD keeps the previous projector instead of
propagating NaNs or raising; :func:`galore_adamw` decays the weight before rather than after the
update (an O(lr²·wd) difference).

With :func:`optax.inject_hyperparams`, ``scale``, ``update_proj_gap``, ``seed`` and
``power_iters`` may be traced; ``rank`` is read from the state's projector shapes during updates
but ``init`` needs it static (call ``init`` outside ``jit`` or pass ``static_args=('rank',)``);
``oversample`` must be static for ``svd='randomized'``; callables (``mask``,
``dimension_numbers``) must be listed in ``static_args``, as for any optax factory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PROJ_TYPES = ("std", "reverse_std", "input", "output", "both")
REFRESH_MODES = ("all", "staggered")
SVD_MODES = ("exact", "randomized")
MOMENT_MODES = ("keep", "reproject", "reset")
_TORCH_NAMES = {"left": "output", "right": "input", "full": "both"}

# Inner-state NamedTuple fields treated as moments by moments='reproject'|'reset' (first: rotated by R,
# second: by R∘R). Other state types: register_moments().
_MOMENT_FIELDS: dict[str, str] = {"mu": "first", "nu": "second"}

SvdFn = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
MaskOrFn = Any | Callable[[optax.Params], Any] | None


# --------------------------------------------------------------------------------------------
# HF-transformers-style Adam (the official GaLore inner optimizer)
# --------------------------------------------------------------------------------------------


class ScaleByAdamHFState(NamedTuple):
    """State of :func:`scale_by_adam_hf`: step count, first moment ``mu``, second moment ``nu``."""

    count: jax.Array  # int32 []
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_hf(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
    """Adam as in HF-transformers' ``AdamW`` (the official GaLore optimizer), without learning rate.

    ``t ← t + 1; m ← b1 m + (1-b1) g; v ← b2 v + (1-b2) g²;
    u = m / (√v + eps) · √(1-b2ᵗ) / (1-b1ᵗ)``. Unlike :func:`optax.scale_by_adam`, ``eps`` is
    added *before* the bias correction (so it acts as ``eps·√(1-b2ᵗ)`` in optax's convention).
    Defaults are galore-torch's (its ``eps`` default is 1e-6; the paper says 1e-8). The moments
    have the dtype of the params they are initialised on; updates have the gradient dtype.
    """
    _check_real(b1, "b1", lo=0.0, hi=1.0, hi_open=True)
    _check_real(b2, "b2", lo=0.0, hi=1.0, hi_open=True)
    _check_real(eps, "eps", lo=0.0)

    def init_fn(params: optax.Params) -> ScaleByAdamHFState:
        zeros = optax.tree.zeros_like(params)
        return ScaleByAdamHFState(jnp.zeros([], jnp.int32), zeros, optax.tree.zeros_like(params))

    def update_fn(
        updates: optax.Updates, state: ScaleByAdamHFState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdamHFState]:
        del params
        count = optax.safe_int32_increment(state.count)
        mu = jax.tree.map(lambda g, m: (b1 * m + (1 - b1) * g).astype(m.dtype), updates, state.mu)
        nu = jax.tree.map(lambda g, v: (b2 * v + (1 - b2) * jnp.square(g)).astype(v.dtype), updates, state.nu)
        t = count.astype(jnp.float32)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        step = jnp.sqrt(1 - jnp.power(f32(b2), t)) / (1 - jnp.power(f32(b1), t))
        new_updates = jax.tree.map(lambda g, m, v: (m / (jnp.sqrt(v) + eps) * step).astype(g.dtype), updates, mu, nu)
        return new_updates, ScaleByAdamHFState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


class GaLoreDims(NamedTuple):
    """How a leaf is seen as a batch of matrices: axis indices (negative allowed).

    ``rows`` form the input side, ``cols`` the output side, ``batch`` index independent matrices
    (each gets its own projector). Every axis must appear exactly once.
    """

    batch: Sequence[int] | int = ()
    rows: Sequence[int] | int = (0,)
    cols: Sequence[int] | int = (1,)


class GaLoreState(NamedTuple):
    """State of :func:`galore` (see the module docstring for the layout)."""

    count: jax.Array  # int32 [], number of updates so far
    inner_state: optax.OptState  # inner transform's state on the proxy (low-rank) tree
    proj_in: optax.Updates  # per leaf (*batch, in, r) or MaskedNode
    proj_out: optax.Updates  # per leaf (*batch, out, r) or MaskedNode
    last_refresh: optax.Updates  # per leaf int32 (*batch,) or MaskedNode; -1 = never
    svd_failures: jax.Array  # int32 [], refreshes that kept the previous projector


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_real(
    value: Any,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Check a numeric hyperparameter when it is concrete (it may be traced under inject_hyperparams)."""
    if _is_traced(value) or callable(value):
        return
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: must be a number, got {value!r}") from e
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name}: must be {'<' if hi_open else '<='} {hi}, got {v}")


def _check_int(value: Any, name: str, *, lo: int) -> None:
    if _is_traced(value):
        return
    if isinstance(value, bool) or not _is_integral(value):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if int(value) < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {int(value)}")


def _is_integral(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.integer) and getattr(value, "ndim", 1) == 0


def _static_int(value: Any, name: str, why: str) -> int:
    if _is_traced(value):
        raise ValueError(
            f"{name}: must be static here ({why}); with optax.inject_hyperparams pass static_args=({name!r},)"
        )
    return int(value)


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        hint = ""
        if name == "proj_type" and value in _TORCH_NAMES:
            hint = f" ({value!r} is PyTorch orientation: use {_TORCH_NAMES[value]!r} for Flax (in, out) kernels)"
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {', '.join(map(repr, choices))}{hint}")


# --------------------------------------------------------------------------------------------
# Per-leaf plans: which leaves are projected, how they are reshaped, which side(s)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one projected leaf seen as ``B`` matrices of shape ``m × n``."""

    shape: tuple[int, ...]
    perm: tuple[int, ...]  # transpose to (batch…, rows…, cols…)
    batch_shape: tuple[int, ...]
    m: int  # input side (rows)
    n: int  # output side (cols)
    rank: int  # effective rank, <= min(m, n)
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


def _resolve_mask(mask: MaskOrFn, tree: Any, leaves: list[Any]) -> list[bool]:
    if mask is None:
        return [leaf.ndim >= 2 for leaf in leaves]
    if callable(mask):
        mask = mask(tree)
    values = _broadcast_prefix(mask, tree, "mask", is_leaf=lambda x: x is None)
    out = []
    for v, leaf in zip(values, leaves, strict=True):
        if _is_traced(v):
            raise ValueError("mask: must hold static booleans, got a traced value")
        sel = bool(v) if v is not None else False
        if sel and leaf.ndim < 2:
            raise ValueError(f"mask: selects a leaf of shape {tuple(leaf.shape)}; GaLore needs ndim >= 2")
        out.append(sel)
    return out


def _is_dims_leaf(x: Any) -> bool:
    return x is None or isinstance(x, GaLoreDims)


def _resolve_dims(dimension_numbers: Any, tree: Any, leaves: list[Any]) -> list[GaLoreDims | None]:
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


def _sides(proj_type: str, m: int, n: int) -> tuple[bool, bool]:
    """``(use_in, use_out)`` for a Flax gradient ``m (in) × n (out)``."""
    if proj_type == "std":
        return (m <= n, m > n)
    if proj_type == "reverse_std":
        return (m > n, m <= n)
    return (proj_type in ("input", "both"), proj_type in ("output", "both"))


def _make_plans(
    leaves: list[Any],
    selected: list[bool],
    dims: list[GaLoreDims | None],
    sides: Callable[[int, int, int], tuple[bool, bool]],
    rank_of: Callable[[int, int, int], int],
) -> list[_Plan | None]:
    plans: list[_Plan | None] = []
    first = 0
    for i, (leaf, sel, d) in enumerate(zip(leaves, selected, dims, strict=True)):
        if not sel:
            plans.append(None)
            continue
        shape = tuple(leaf.shape)
        perm, nb, m, n = _layout(shape, d)
        use_in, use_out = sides(i, m, n)
        batch_shape = tuple(shape[a] for a in perm[:nb])
        plan = _Plan(shape, perm, batch_shape, m, n, rank_of(i, m, n), use_in, use_out, first)
        first += plan.nmat
        plans.append(plan)
    return plans


# --------------------------------------------------------------------------------------------
# Projectors: SVD (exact / randomized), canonical signs, refresh
# --------------------------------------------------------------------------------------------


def _dense_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.linalg.svd(x, full_matrices=False)


def _canonical_columns(x_kr: jax.Array) -> jax.Array:
    """Flip each column so that its largest-|·| entry is positive."""
    idx = jnp.argmax(jnp.abs(x_kr), axis=0)
    sign = jnp.sign(jnp.take_along_axis(x_kr, idx[None, :], axis=0))
    return x_kr * jnp.where(sign == 0, 1, sign).astype(x_kr.dtype)


@dataclasses.dataclass(frozen=True)
class _SvdConfig:
    svd: str
    power_iters: Any  # int or traced
    oversample: int
    canonical_signs: bool
    svd_fn: SvdFn


def _top_singular(
    x_mn: jax.Array, r: int, key: jax.Array | None, cfg: _SvdConfig
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


def _new_projectors(
    g_mn: jax.Array,
    p_in: jax.Array | None,
    p_out: jax.Array | None,
    key: jax.Array | None,
    plan: _Plan,
    cfg: _SvdConfig,
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


def _refresh_leaf(
    plan: _Plan,
    g_b: jax.Array,
    pin_b: jax.Array | None,
    pout_b: jax.Array | None,
    do_b: jax.Array,
    keys_b: jax.Array | None,
    staggered: bool,
    cfg: _SvdConfig,
) -> tuple[jax.Array | None, jax.Array | None, jax.Array, jax.Array]:
    """New ``(pin_b, pout_b, refreshed_b, failed_b)`` for the ``B`` matrices of a leaf."""
    one = lambda g, pi, po, k: _new_projectors(g, pi, po, k, plan, cfg)
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


# --------------------------------------------------------------------------------------------
# Inner-state moments (reproject / reset)
# --------------------------------------------------------------------------------------------


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


_MOMENT_ACCESSORS: dict[type, tuple[Callable[[Any], tuple[Any, Any]], Callable[[Any, Any, Any], Any]]] = {}


def register_moments(
    state_type: type,
    get_fn: Callable[[Any], tuple[Any, Any]],
    set_fn: Callable[[Any, Any, Any], Any],
) -> None:
    """Teach ``moments='reproject'|'reset'`` where an inner state type keeps its moments.

    ``get_fn(state) -> (first, second)``: float trees shaped like the updates (either may be None);
    ``set_fn(state, first, second) -> state`` stores them back (e.g. requantizing). Registered types
    are matched exactly, before the default rule (NamedTuple fields ``mu`` → first moment,
    ``nu`` → second moment). Example for a quantized Adam:
    ``register_moments(ScaleByAdam8bitState, get_moments, set_moments)``.
    """
    if not isinstance(state_type, type) or not (callable(get_fn) and callable(set_fn)):
        raise ValueError("register_moments: expected (state_type, get_fn, set_fn) with callable get_fn/set_fn")
    _MOMENT_ACCESSORS[state_type] = (get_fn, set_fn)


def _map_moments(state: Any, fn: Callable[[str, Any], Any] | None) -> Any:
    """Rebuild ``state`` with every moment tree replaced by ``fn(kind, tree)``; ``fn=None`` drops them."""
    accessor = _MOMENT_ACCESSORS.get(type(state))
    if accessor is not None:
        if fn is None:
            return None
        first, second = accessor[0](state)
        return accessor[1](
            state,
            None if first is None else fn("first", first),
            None if second is None else fn("second", second),
        )
    if _is_namedtuple(state):
        kinds = {f: _MOMENT_FIELDS[f] for f in state._fields if f in _MOMENT_FIELDS}
        if kinds:
            return state._replace(
                **{
                    f: (None if fn is None else fn(kinds[f], v)) if f in kinds else _map_moments(v, fn)
                    for f, v in zip(state._fields, state, strict=True)
                }
            )
        return type(state)(*(_map_moments(s, fn) for s in state))
    if isinstance(state, tuple | list):
        return type(state)(_map_moments(s, fn) for s in state)
    if isinstance(state, dict):
        return type(state)((k, _map_moments(v, fn)) for k, v in state.items())
    return state


def _check_moments(inner_state: Any, treedef: Any, plans: list[_Plan | None], mode: str) -> None:
    found: list[str] = []

    def check(kind: str, tree: Any) -> Any:
        try:
            per_leaf = treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as e:
            raise ValueError(f"moments: an inner-state moment tree is not shaped like the params ({e})") from e
        for plan, v in zip(plans, per_leaf, strict=True):
            if plan is None or isinstance(v, optax.MaskedNode) or v is None:
                continue
            if not (isinstance(v, jax.Array) and v.shape == plan.low_shape and jnp.issubdtype(v.dtype, jnp.floating)):
                raise ValueError(
                    f"moments: inner moment leaf {type(v).__name__}{getattr(v, 'shape', '')} is not a float array "
                    f"of the low-rank shape {plan.low_shape}; use moments='keep' or register_moments(...)"
                )
        found.append(kind)
        return tree

    _map_moments(inner_state, check)
    if not found:
        raise ValueError(
            f"moments={mode!r}: the inner state has no moments galore can find (NamedTuple fields mu/nu or a type "
            "registered with register_moments); use moments='keep'"
        )
    others = [x for x in jax.tree.leaves(_map_moments(inner_state, None)) if getattr(x, "ndim", 0) > 0]
    if others:
        raise ValueError(
            f"moments={mode!r}: the inner state has per-parameter leaves besides its moments "
            f"(shapes {[tuple(x.shape) for x in others[:3]]}); use moments='keep' or register_moments(...)"
        )


def _remix_one(
    firsts: list[jax.Array],
    seconds: list[jax.Array],
    old_in: Any,
    new_in: Any,
    old_out: Any,
    new_out: Any,
    mode: str,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Moments of one matrix carried into the new basis (reproject) or zeroed (reset)."""
    if mode == "reset":
        return [jnp.zeros_like(x) for x in firsts], [jnp.zeros_like(x) for x in seconds]
    f32 = jnp.float32
    r_in = None if old_in is None else new_in.astype(f32).T @ old_in.astype(f32)
    r_out = None if old_out is None else new_out.astype(f32).T @ old_out.astype(f32)

    def rotate(x: jax.Array, a: jax.Array | None, b: jax.Array | None) -> jax.Array:
        y = x.astype(f32)
        if a is not None:
            y = a @ y
        if b is not None:
            y = y @ b.T
        return y.astype(x.dtype)

    sq = lambda r: None if r is None else r * r
    return [rotate(x, r_in, r_out) for x in firsts], [rotate(x, sq(r_in), sq(r_out)) for x in seconds]


def _remix_leaf(
    plan: _Plan,
    firsts: list[jax.Array],
    seconds: list[jax.Array],
    old_in: Any,
    new_in: Any,
    old_out: Any,
    new_out: Any,
    refreshed_b: jax.Array,
    staggered: bool,
    mode: str,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Apply :func:`_remix_one` to the refreshed matrices of a leaf (arrays are (B, ·, ·))."""
    one = lambda f, s, oi, ni, oo, no: _remix_one(f, s, oi, ni, oo, no, mode)
    ident = lambda f, s, *_: (f, s)
    if staggered and plan.nmat > 1:

        def body(args: tuple) -> tuple:
            f, s, oi, ni, oo, no, rf = args
            return jax.lax.cond(rf, one, ident, f, s, oi, ni, oo, no)

        return jax.lax.map(body, (firsts, seconds, old_in, new_in, old_out, new_out, refreshed_b))

    def remix_all(f: list, s: list, oi: Any, ni: Any, oo: Any, no: Any) -> tuple:
        nf, ns = jax.vmap(one)(f, s, oi, ni, oo, no)
        pick = lambda new, old: jnp.where(refreshed_b.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
        return jax.tree.map(pick, nf, f), jax.tree.map(pick, ns, s)

    return jax.lax.cond(jnp.any(refreshed_b), remix_all, ident, firsts, seconds, old_in, new_in, old_out, new_out)


# --------------------------------------------------------------------------------------------
# The transformation
# --------------------------------------------------------------------------------------------


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
    _svd_fn: SvdFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    """GaLore gradient projection around an ``inner`` transform (see the module docstring).

    Args:
      rank: projection rank ``r`` (per leaf clamped to ``min(in, out)``).
      update_proj_gap: ``T``, steps between projector refreshes.
      scale: ``α``, multiplies the back-projected update of projected leaves (paper: 0.25).
      proj_type: ``'std' | 'reverse_std' | 'input' | 'output' | 'both'`` (table in the module doc).
      inner: params-free optax transform run on the low-rank gradients (and at full size on
        unselected leaves); default :func:`scale_by_adam_hf` (the official AdamW without lr).
      mask: pytree (prefix) of bools or ``params -> pytree`` selecting the projected leaves;
        default every leaf with ``ndim >= 2``.
      dimension_numbers: pytree prefix of :class:`GaLoreDims` / None, or ``params -> pytree``;
        default for ndim > 2: leading axes are batch axes, last two are (in, out).
      refresh: ``'all'`` (official: every matrix at ``count % T == 0``) or ``'staggered'``.
      svd: ``'exact'`` (float32 ``jnp.linalg.svd``) or ``'randomized'``.
      moments: ``'keep'`` (official), ``'reproject'`` or ``'reset'`` on refresh.
      canonical_signs: make singular-vector signs deterministic across backends.
      power_iters, oversample, seed: randomized SVD settings.
      _svd_fn: testing hook replacing ``jnp.linalg.svd(x, full_matrices=False)`` (``x -> (u, s, vh)``).

    Returns:
      An optax transformation whose state is a :class:`GaLoreState`.
    """
    _check_int(rank, "rank", lo=1)
    _check_int(update_proj_gap, "update_proj_gap", lo=1)
    _check_real(scale, "scale", lo=0.0, lo_open=True)
    _check_choice(proj_type, "proj_type", PROJ_TYPES)
    _check_choice(refresh, "refresh", REFRESH_MODES)
    _check_choice(svd, "svd", SVD_MODES)
    _check_choice(moments, "moments", MOMENT_MODES)
    _check_int(power_iters, "power_iters", lo=0)
    _check_int(oversample, "oversample", lo=0)
    _check_int(seed, "seed", lo=0)
    if not isinstance(canonical_signs, bool):
        raise ValueError(f"canonical_signs: must be a bool, got {canonical_signs!r}")
    if inner is None:
        inner = scale_by_adam_hf()
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise ValueError(f"inner: must be an optax GradientTransformation, got {type(inner).__name__}")
    inner_tx = optax.with_extra_args_support(inner)
    staggered = refresh == "staggered"

    def init_fn(params: optax.Params) -> GaLoreState:
        rank_ = _static_int(rank, "rank", "it sets the state shapes")
        leaves, treedef = jax.tree.flatten(params)
        selected = _resolve_mask(mask, params, leaves)
        dims = _resolve_dims(dimension_numbers, params, leaves)
        plans = _make_plans(
            leaves, selected, dims, lambda _, m, n: _sides(proj_type, m, n), lambda _, m, n: min(rank_, m, n)
        )
        proxy = [
            leaf if p is None else jnp.zeros(p.low_shape, leaf.dtype) for leaf, p in zip(leaves, plans, strict=True)
        ]
        proxy_tree = treedef.unflatten(proxy)
        _check_inner(inner_tx, proxy_tree)
        inner_state = inner_tx.init(proxy_tree)
        if moments != "keep":
            _check_moments(inner_state, treedef, plans, moments)

        # Initial projectors: the truncated identity (used only if the step-0 SVD fails).
        eye = lambda p, dim, dtype: jnp.broadcast_to(jnp.eye(dim, p.rank, dtype=dtype), p.batch_shape + (dim, p.rank))
        proj_in, proj_out = [], []
        for p, x in zip(plans, leaves, strict=True):
            proj_in.append(eye(p, p.m, x.dtype) if p is not None and p.use_in else optax.MaskedNode())
            proj_out.append(eye(p, p.n, x.dtype) if p is not None and p.use_out else optax.MaskedNode())
        last = [optax.MaskedNode() if p is None else jnp.full(p.batch_shape, -1, jnp.int32) for p in plans]
        return GaLoreState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner_state,
            proj_in=treedef.unflatten(proj_in),
            proj_out=treedef.unflatten(proj_out),
            last_refresh=treedef.unflatten(last),
            svd_failures=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: optax.Updates, state: GaLoreState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, GaLoreState]:
        del params
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
        n_total = sum(p.nmat for p in plans if p is not None)
        count = state.count
        cfg = _SvdConfig(
            svd=svd,
            power_iters=power_iters,
            oversample=_static_int(oversample, "oversample", "it sets the sketch size") if svd == "randomized" else 0,
            canonical_signs=canonical_signs,
            svd_fn=_svd_fn or _dense_svd,
        )
        base_key = jax.random.fold_in(jax.random.key(seed), count) if svd == "randomized" else None

        new_pins, new_pouts, new_lasts = list(pins), list(pouts), list(lasts)
        refreshed: list[jax.Array | None] = [None] * len(leaves)
        failures = jnp.zeros([], jnp.int32)
        mats: list[jax.Array | None] = [None] * len(leaves)
        for i, (g, p) in enumerate(zip(leaves, plans, strict=True)):
            if p is None:
                continue
            idx = jnp.arange(p.first, p.first + p.nmat, dtype=jnp.int32)
            if staggered:
                do_b = ((count % update_proj_gap) == (idx * update_proj_gap) // n_total) | (count == 0)
            else:
                do_b = jnp.broadcast_to((count % update_proj_gap) == 0, (p.nmat,))
            keys_b = None if base_key is None else jax.vmap(lambda j: jax.random.fold_in(base_key, j))(idx)
            g_b = p.to_mats(g)
            mats[i] = g_b
            pin_b, pout_b, rf_b, fail_b = _refresh_leaf(
                p, g_b, p.proj_b(pins[i], p.m), p.proj_b(pouts[i], p.n), do_b, keys_b, staggered, cfg
            )
            new_pins[i], new_pouts[i] = p.proj_unb(pin_b, p.m), p.proj_unb(pout_b, p.n)
            new_lasts[i] = jnp.where(rf_b, count, lasts[i].reshape(-1)).reshape(p.batch_shape)
            refreshed[i] = rf_b
            failures = failures + jnp.sum(fail_b, dtype=jnp.int32)

        inner_state = state.inner_state
        if moments != "keep":
            inner_state = _remix_inner(inner_state, treedef, plans, pins, new_pins, pouts, new_pouts, refreshed)

        # Project: low-rank gradients for selected leaves, the gradient itself otherwise.
        low = []
        for g, p, g_b, pi, po in zip(leaves, plans, mats, new_pins, new_pouts, strict=True):
            if p is None:
                low.append(g)
                continue
            x = g_b
            if p.use_in:
                x = jnp.einsum("bmr,bmn->brn", p.proj_b(pi, p.m).astype(g.dtype), x)
            if p.use_out:
                x = jnp.einsum("bmn,bnr->bmr", x, p.proj_b(po, p.n).astype(g.dtype))
            low.append(x.reshape(p.low_shape))

        inner_updates, inner_state = inner_tx.update(treedef.unflatten(low), inner_state, None, **extra_args)

        # Back-project and scale.
        out = []
        for g, p, u, pi, po in zip(
            leaves, plans, treedef.flatten_up_to(inner_updates), new_pins, new_pouts, strict=True
        ):
            if p is None:
                out.append(u)
                continue
            y = p.low_b(u)
            if p.use_in:
                y = jnp.einsum("bmr,brn->bmn", p.proj_b(pi, p.m).astype(y.dtype), y)
            if p.use_out:
                y = jnp.einsum("bmr,bnr->bmn", y, p.proj_b(po, p.n).astype(y.dtype))
            out.append((p.from_mats(y) * scale).astype(g.dtype))

        mk = lambda xs: treedef.unflatten([optax.MaskedNode() if x is None else x for x in xs])
        new_state = GaLoreState(
            count=optax.safe_int32_increment(count),
            inner_state=inner_state,
            proj_in=mk(new_pins),
            proj_out=mk(new_pouts),
            last_refresh=treedef.unflatten(new_lasts),
            svd_failures=state.svd_failures + failures,
        )
        return treedef.unflatten(out), new_state

    def _remix_inner(
        inner_state: Any,
        treedef: Any,
        plans: list[_Plan | None],
        pins: list,
        new_pins: list,
        pouts: list,
        new_pouts: list,
        refreshed: list,
    ) -> Any:
        """Rotate / reset the inner moments of the refreshed matrices (one cond per leaf or matrix)."""
        fields: list[tuple[str, list[Any]]] = []

        def collect(kind: str, tree: Any) -> Any:
            fields.append((kind, treedef.flatten_up_to(tree)))
            return tree

        _map_moments(inner_state, collect)
        new_fields = [(kind, list(vals)) for kind, vals in fields]
        for i, p in enumerate(plans):
            if p is None:
                continue
            firsts_at = [j for j, (kind, vals) in enumerate(fields) if kind == "first" and hasattr(vals[i], "shape")]
            seconds_at = [j for j, (kind, vals) in enumerate(fields) if kind == "second" and hasattr(vals[i], "shape")]
            nf, ns = _remix_leaf(
                p,
                [p.low_b(fields[j][1][i]) for j in firsts_at],
                [p.low_b(fields[j][1][i]) for j in seconds_at],
                p.proj_b(pins[i], p.m),
                p.proj_b(new_pins[i], p.m),
                p.proj_b(pouts[i], p.n),
                p.proj_b(new_pouts[i], p.n),
                refreshed[i],
                staggered,
                moments,
            )
            for j, x in zip(firsts_at + seconds_at, list(nf) + list(ns), strict=True):
                new_fields[j][1][i] = x.reshape(p.low_shape)
        it = iter(new_fields)
        return _map_moments(inner_state, lambda kind, tree: treedef.unflatten(next(it)[1]))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
