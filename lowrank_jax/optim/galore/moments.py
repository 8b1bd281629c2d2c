"""The inner optimizer's moments under GaLore: where they are, and carrying them across a projector refresh.

``moments='reproject'`` rotates the moments of a refreshed matrix into the new basis (``R = P_newᵀ P_old``: first
moment by ``R``, second by ``R∘R``), ``'reproject_first'`` rotates only the first moment and keeps the second
(GoLore's rule), ``'reset'`` zeroes them, ``'keep'`` (official GaLore) leaves them. They are found anywhere in the
inner state as NamedTuple fields ``mu`` / ``nu``, or through :func:`register_moments`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim.projection import Plan
from lowrank_jax.optim.tree import map_namedtuples

# 'reproject_first': official GoLore (pkumelon/Golore, peft_pretraining/GoLore.py, merge_and_reinit) rotates
# exp_avg into the new basis, Pnewᵀ (Pold exp_avg), and leaves exp_avg_sq as it is.
MOMENT_MODES = ("keep", "reproject", "reproject_first", "reset")

# Inner-state NamedTuple fields treated as moments by moments='reproject'|'reset' (first: rotated by R,
# second: by R∘R). Other state types: register_moments().
_MOMENT_FIELDS: dict[str, str] = {"mu": "first", "nu": "second"}

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

    def fields(nt: Any) -> dict[str, Any]:
        kinds = {f: _MOMENT_FIELDS[f] for f in nt._fields if f in _MOMENT_FIELDS}
        return {f: None if fn is None else fn(kind, getattr(nt, f)) for f, kind in kinds.items()}

    def registered(get_fn: Callable, set_fn: Callable) -> Callable[[Any], Any]:
        def replace(s: Any) -> Any:
            if fn is None:
                return None
            first, second = get_fn(s)
            return set_fn(
                s, None if first is None else fn("first", first), None if second is None else fn("second", second)
            )

        return replace

    opaque = {t: registered(*accessor) for t, accessor in _MOMENT_ACCESSORS.items()}
    return map_namedtuples(state, fields, opaque=opaque)


def check_moments(inner_state: Any, treedef: Any, plans: list[Plan | None], mode: str) -> None:
    """The inner state holds float moments of the low-rank shapes and no other per-parameter leaves."""
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
    """Moments of one matrix carried into the new basis (reproject, reproject_first) or zeroed (reset)."""
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

    if mode == "reproject_first":
        return [rotate(x, r_in, r_out) for x in firsts], list(seconds)
    sq = lambda r: None if r is None else r * r
    return [rotate(x, r_in, r_out) for x in firsts], [rotate(x, sq(r_in), sq(r_out)) for x in seconds]


def _remix_leaf(
    plan: Plan,
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


def remix_moments(
    inner_state: Any,
    treedef: Any,
    plans: list[Plan | None],
    pins: list,
    new_pins: list,
    pouts: list,
    new_pouts: list,
    refreshed: list,
    staggered: bool,
    mode: str,
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
            mode,
        )
        for j, x in zip(firsts_at + seconds_at, list(nf) + list(ns), strict=True):
            new_fields[j][1][i] = x.reshape(p.low_shape)
    it = iter(new_fields)
    return _map_moments(inner_state, lambda kind, tree: treedef.unflatten(next(it)[1]))
