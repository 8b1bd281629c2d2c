"""Device mesh and logical-axis sharding.

Parameters name their dimensions logically (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``,
``rank``, ``nnz``, ``layers``); rules map each logical name to mesh axes of a mesh with axes
``(data, fsdp, tensor)``. A laptop uses a 1-device mesh, so the same jitted step with explicit
in/out shardings runs everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axes (first fit wins; a mesh axis is used at most once per array)
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", BATCH_AXES),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv", ("tensor",)),
    ("vocab", ("tensor",)),
    ("rank", ()),
    ("nnz", ("fsdp",)),
    ("layers", ()),
)


def mesh_shape(requested: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Resolve one ``-1`` to the remaining devices and check the product equals ``n_devices``."""
    sizes = list(requested)
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if n_devices % rest:
            raise ValueError(f"mesh: {tuple(requested)} does not divide {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // rest
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh: {tuple(sizes)} needs {math.prod(sizes)} devices, {n_devices} available")
    return tuple(sizes)


def make_mesh(requested: Sequence[int] = (1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; ``(1, 1, 1)`` takes the first device only."""
    devices = list(devices if devices is not None else jax.devices())
    if tuple(requested) == (1, 1, 1):
        devices = devices[:1]
    shape = mesh_shape(requested, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_mesh(
    logical: PartitionSpec, shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RULES
) -> PartitionSpec:
    """Map a logical spec to mesh axes, leaving a dimension unsharded where it does not divide."""
    table = dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for name, dim in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape, strict=True):
        axes = [a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1] if name else []
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(tuple(axes) if len(axes) > 1 else axes[0])
        else:
            out.append(None)
    return PartitionSpec(*out)


def tree_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a pytree, from its logical specs and (abstract) shapes."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_mesh(spec, x.shape, mesh, rules)),
        logical_tree,
        abstract_tree,
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Tokens ``(batch, seq)`` split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
