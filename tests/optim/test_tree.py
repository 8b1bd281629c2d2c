"""The optax-state walk: nested containers rebuilt, every NamedTuple visited in pre-order, opaque types replaced."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.optim.tree import find_namedtuples, is_namedtuple, map_namedtuples


class _Moments(NamedTuple):
    count: Any
    mu: Any
    nu: Any


class _Wrapper(NamedTuple):
    inner: Any
    mu: Any


def _state(rng: np.random.Generator) -> Any:
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return (
        optax.EmptyState(),
        {"trainable": _Moments(jnp.asarray(3), {"w": arr(2, 3)}, {"w": arr(2, 3)}), "frozen": optax.MaskedNode()},
        [_Wrapper(inner=_Moments(jnp.asarray(1), arr(4), arr(4)), mu=arr(5))],
    )


def test_identity_visit_rebuilds_the_same_state(rng) -> None:
    state = _state(rng)
    out = map_namedtuples(state, lambda nt: {})
    assert jax.tree.structure(out) == jax.tree.structure(state)
    assert type(out) is tuple and type(out[2]) is list and type(out[1]) is dict
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state), strict=True):
        assert a is b


def test_visit_replaces_handled_fields_and_walks_the_others_in_pre_order(rng) -> None:
    state = _state(rng)
    order = []

    def visit(nt: Any) -> dict[str, Any]:
        order.append(type(nt).__name__)
        return {"mu": jax.tree.map(jnp.zeros_like, nt.mu)} if "mu" in nt._fields else {}

    out = map_namedtuples(state, visit)
    # optax.MaskedNode is an empty NamedTuple
    assert order == ["EmptyState", "_Moments", "MaskedNode", "_Wrapper", "_Moments"]
    assert not np.any(out[1]["trainable"].mu["w"]) and np.any(out[1]["trainable"].nu["w"])
    # the wrapper's own mu is replaced, so its inner state is still walked (inner is not handled by visit)
    assert not np.any(out[2][0].mu) and not np.any(out[2][0].inner.mu) and np.any(out[2][0].inner.nu)
    assert out[1]["trainable"].count is state[1]["trainable"].count


def test_opaque_types_are_replaced_whole_before_visit(rng) -> None:
    state = _state(rng)
    visited = []
    out = map_namedtuples(state, lambda nt: visited.append(type(nt)) or {}, opaque={_Wrapper: lambda w: None})
    assert out[2] == [None] and _Wrapper not in visited and _Moments in visited


def test_find_namedtuples(rng) -> None:
    state = _state(rng)
    found = find_namedtuples(state, "mu")
    assert [type(x) for x in found] == [_Moments, _Wrapper, _Moments]
    assert find_namedtuples(state, "count")[0] is state[1]["trainable"]
    assert find_namedtuples(state, "nothing") == []
    assert is_namedtuple(state[0]) and not is_namedtuple(state) and not is_namedtuple(jnp.ones(2))
