"""Per-leaf plans: which leaves GaLore projects, how each is seen as a batch of matrices, which side(s).

A :class:`_Plan` is static (shapes and flags only): ``init`` builds one per selected leaf from ``mask``,
``dimension_numbers``, ``proj_type`` and ``rank``; ``update`` rebuilds the same plans from the state's
projector shapes, so ``rank`` and the sides need not be static there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim._checks import is_traced

PROJ_TYPES = ("std", "reverse_std", "input", "output", "both")
# galore-torch's names, which are PyTorch (out, in) orientation: the error for them names the Flax equivalent.
_TORCH_NAMES = {"left": "output", "right": "input", "full": "both"}
_PROJ_TYPE_HINTS = {
    k: f"{k!r} is PyTorch orientation: use {v!r} for Flax (in, out) kernels" for k, v in _TORCH_NAMES.items()
}

MaskOrFn = Any | Callable[[optax.Params], Any] | None


class GaLoreDims(NamedTuple):
    """How a leaf is seen as a batch of matrices: axis indices (negative allowed).

    ``rows`` form the input side, ``cols`` the output side, ``batch`` index independent matrices
    (each gets its own projector). Every axis must appear exactly once.
    """

    batch: Sequence[int] | int = ()
    rows: Sequence[int] | int = (0,)
    cols: Sequence[int] | int = (1,)


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
        if is_traced(v):
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
