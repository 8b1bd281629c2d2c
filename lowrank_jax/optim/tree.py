"""One walk over optax states: rebuild the nested tuples, lists, dicts and NamedTuples, visiting every NamedTuple.

Optax states are NamedTuples (``ScaleByAdamState(count, mu, nu)``) nested in tuples (``optax.chain``), dicts
(``optax.partition``) and wrapper states (``inject_hyperparams``, ``masked``). GaLore's moment rotation and ReLoRA's
optimizer reset and warm start all find the NamedTuples with given fields (``mu``/``nu``/``count``) and replace
those fields, leaving the rest of the state as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def map_namedtuples(
    node: Any,
    visit: Callable[[Any], dict[str, Any]],
    *,
    opaque: Mapping[type, Callable[[Any], Any]] | None = None,
) -> Any:
    """Rebuild ``node``, visiting every NamedTuple in pre-order.

    ``visit(nt)`` returns new values for the fields it handles; the other fields are walked. A node whose exact
    type is a key of ``opaque`` is not walked but replaced by ``opaque[type(node)](node)`` (checked first, so it
    also overrides ``visit`` for a NamedTuple type). Anything else (arrays, None, ``optax.MaskedNode``) is kept.
    """
    recurse = lambda v: map_namedtuples(v, visit, opaque=opaque)
    if opaque and type(node) in opaque:
        return opaque[type(node)](node)
    if is_namedtuple(node):
        new = visit(node)
        return node._replace(**{f: new[f] if f in new else recurse(v) for f, v in zip(node._fields, node, strict=True)})
    if isinstance(node, tuple | list):
        return type(node)(recurse(v) for v in node)
    if isinstance(node, dict):
        return type(node)((k, recurse(v)) for k, v in node.items())
    return node


def find_namedtuples(node: Any, field: str) -> list:
    """Every NamedTuple inside ``node`` that has the field ``field``, in :func:`map_namedtuples` order."""
    found: list = []

    def visit(nt: Any) -> dict[str, Any]:
        if field in nt._fields:
            found.append(nt)
        return {}

    map_namedtuples(node, visit)
    return found
