"""Selecting the matrices a method projects, by parameter path, on any pytree (Flax linen, NNX, plain dicts).

The papers apply their low-rank methods to the attention and MLP weight matrices and leave the token embedding,
the output head and the norms to full-size Adam (galore-torch's scripts list ``attn`` and ``mlp`` modules; Hugging
Face's ``optim_target_modules`` takes such regexes). :func:`path_mask` builds that selection from regular
expressions over a leaf's path, spelled ``"a/b/c"`` with one component per key (dict key, attribute name or
sequence index), so the same patterns select the same leaves of a linen ``params`` dict, an ``nnx.State`` and a
plain nested dict with the same names.

:data:`DEFAULT_TARGETS` is the selection of the complete optimizers (:func:`~lowrank_jax.optim.galore.galore`,
:func:`~lowrank_jax.optim.apollo.apollo`, …) when ``mask`` is not given: matrices whose path names an attention or
MLP block and ends in a weight (``kernel``/``weight``). On this project's LLaMA that is every ``blocks/attn/*`` and
``blocks/mlp/*`` kernel; on a Hugging Face-style tree ``model/layers/0/self_attn/q_proj/kernel`` and
``…/mlp/gate_proj/kernel``. A mask that selects no leaf (the method would silently be plain Adam) or every leaf
(embeddings and head projected too) prints one warning on stderr, once per distinct selection.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax

DEFAULT_TARGETS: tuple[str, ...] = (
    r"(^|/)[^/]*(attn|attention)[^/]*/(.*/)?(kernel|weight)$",
    r"(^|/)[^/]*(mlp|ffn|feed_forward)[^/]*/(.*/)?(kernel|weight)$",
)

_warned: set[tuple[str, ...]] = set()


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path as ``"a/b/0/c"`` (dict keys, attribute names, indices; NNX and linen alike).

    The attribute an ``nnx.Variable`` keeps its array in (``.value``) is not part of the name, so an
    ``nnx.State`` leaf reads like the same leaf of a plain dict.
    """
    path = list(path)
    while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in ("value", "raw_value"):
        path.pop()
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def path_mask(
    *patterns: str, exclude: Sequence[str] = (), min_ndim: int = 2, warn: bool = True
) -> Callable[[Any], Any]:
    """``params -> bool pytree``: True for leaves whose path matches any of ``patterns`` (``re.search``).

    Args:
      *patterns: regular expressions over the ``"a/b/c"`` path of a leaf (:func:`path_str`); at least one.
      exclude: regular expressions; a leaf whose path matches one of them is never selected.
      min_ndim: leaves with fewer dimensions are never selected (a method projects matrices).
      warn: print one line on stderr (once per distinct outcome) when the mask selects no leaf or every leaf.

    Returns:
      A function usable as the ``mask`` of every lowrank-jax optimizer (and of optax's masked transforms).
    """
    if not patterns:
        raise ValueError("patterns: give at least one regular expression")
    try:
        include = [re.compile(p) for p in patterns]
        skip = [re.compile(p) for p in exclude]
    except re.error as e:
        raise ValueError(f"patterns: not a regular expression ({e})") from None

    def selects(path: Any, leaf: Any) -> bool:
        name = path_str(path)
        ndim = len(getattr(leaf, "shape", ()))
        return ndim >= min_ndim and any(r.search(name) for r in include) and not any(r.search(name) for r in skip)

    def mask(params: Any) -> Any:
        tree = jax.tree_util.tree_map_with_path(selects, params)
        if warn:
            _warn_if_degenerate(jax.tree.leaves(tree), patterns)
        return tree

    return mask


def _warn_if_degenerate(chosen: list[bool], patterns: Sequence[str]) -> None:
    """One stderr line when a mask selects nothing or everything (once per pattern set and outcome)."""
    if not chosen or 0 < sum(chosen) < len(chosen):
        return
    outcome = "no leaf" if not any(chosen) else "every leaf"
    key = (outcome, *patterns)
    if key in _warned:
        return
    _warned.add(key)
    effect = (
        "the method runs as plain Adam on every parameter"
        if outcome == "no leaf"
        else "embeddings, norms and the output head are projected too"
    )
    print(
        f"lowrank-jax: warning: mask {list(patterns)} selects {outcome} of {len(chosen)}: {effect} "
        "(pass mask=lowrank_jax.path_mask(...) with patterns for your parameter names)",
        file=sys.stderr,
    )


default_mask = path_mask(*DEFAULT_TARGETS)
"""The complete optimizers' default ``mask``: attention and MLP weight matrices (:data:`DEFAULT_TARGETS`)."""


def resolve_mask(mask: Any) -> Any:
    """The ``mask`` of a complete optimizer: None → :func:`default_mask`; a regex or a tuple/list of regexes →
    :func:`path_mask` of them (a form ``optax.inject_hyperparams`` passes through untouched); anything else (a
    bool pytree, a callable) as given."""
    if mask is None:
        return default_mask
    if isinstance(mask, str):
        return path_mask(mask)
    if isinstance(mask, (tuple, list)) and mask and all(isinstance(m, str) for m in mask):
        return path_mask(*mask)
    return mask
