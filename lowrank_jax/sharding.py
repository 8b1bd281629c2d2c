"""Device mesh and logical-axis sharding.

Parameters name their dimensions logically (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``,
``rank``, ``nnz``, ``layers``); rules map each logical name to mesh axes of a mesh with axes
``(data, fsdp, tensor)``. A laptop uses a 1-device mesh, so the same jitted step with explicit
in/out shardings runs everywhere.
"""

from __future__ import annotations

import math
import os
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
    """Resolve one ``-1`` to the remaining devices and check the product equals ``n_devices``.

    ``(1, 1, 1)`` (the default) always means one device, whatever the host has; a run of several
    processes must name a mesh over all their devices (a process without a device in the mesh has
    no rows to feed and no part in its collectives).
    """
    if tuple(requested) == (1, 1, 1):
        if jax.process_count() > 1:
            raise ValueError(
                f"mesh: (1, 1, 1) is one device, but {jax.process_count()} processes share this run; set "
                f"mesh=-1,1,1 (data parallel over all {n_devices} devices) or another shape over all of them"
            )
        return (1, 1, 1)
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
    shape = mesh_shape(requested, len(devices))
    return Mesh(np.asarray(devices[: math.prod(shape)]).reshape(shape), MESH_AXES)


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


def _dict_keys(path: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _aligned_logical(shape: Sequence[int], param_shape: Sequence[int], param_logical: PartitionSpec) -> PartitionSpec:
    """Logical names for a state leaf of ``shape`` that belongs to a param: each dim takes the name of
    the param dim of the same size (same position first, else the first unused one); other dims
    (GaLore's rank, 8-bit blocks) get none."""
    names = tuple(param_logical) + (None,) * (len(param_shape) - len(param_logical))
    used: set[int] = set()
    out: list[Any] = []
    for i, d in enumerate(shape):
        if i < len(param_shape) and param_shape[i] == d and i not in used:
            j: int | None = i
        else:
            j = next((j for j, pd in enumerate(param_shape) if pd == d and j not in used), None)
        if j is None:
            out.append(None)
        else:
            used.add(j)
            out.append(names[j])
    return PartitionSpec(*out)


def _state_logical(shape: Sequence[int], param_shape: Sequence[int], param_logical: PartitionSpec) -> PartitionSpec:
    """:func:`_aligned_logical`, except for 8-bit codes that keep the param's leading dims,
    ``(*param_shape[:-1], param_shape[-1] // B, B)``: their block-count dim takes the param's last name."""
    p = tuple(param_shape)
    if len(shape) == len(p) + 1 and tuple(shape[:-2]) == p[:-1] and shape[-2] * shape[-1] == p[-1]:
        names = tuple(param_logical) + (None,) * (len(p) - len(param_logical))
        return PartitionSpec(*names, None)
    return _aligned_logical(shape, param_shape, param_logical)


def state_shardings(
    abstract_state: Any, abstract_params: Any, logical_params: Any, mesh: Mesh, rules=DEFAULT_RULES
) -> Any:
    """NamedShardings for optimizer state (any optax state), derived from the params' logical axes.

    A state leaf belongs to the parameter whose key path is the longest suffix of the leaf's dict
    keys (``mu['blocks']['attn']['q']['kernel']`` → ``blocks/attn/q/kernel``; partition and
    GaLore wrappers only add a prefix). Its dims are aligned with the param's by size
    (:func:`_aligned_logical`), so full-size moments shard exactly like their param, GaLore's
    projectors ``(L, in, r)`` / ``(L, out, r)`` and low-rank moments ``(L, r, out)`` shard their
    full-size dims and keep the rank dim whole; 8-bit codes ``(*param.shape[:-1], last / B, B)``
    shard like their param, the block-count dim taking the last dim's axis. Leaves that match no
    dim but are large (flat 8-bit codes ``(num_blocks, block)``, codes of low-rank moments) are
    split on their largest dim over ``fsdp`` (ZeRO-style,
    the state is elementwise; never the leading layers / chunks axis of the per-layer update's
    stacked states, which it reads one slice at a time); scalars (counts) are replicated.
    """
    params = {
        _dict_keys(path): (x.shape, spec)
        for (path, x), spec in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0],
            jax.tree.leaves(logical_params, is_leaf=lambda s: isinstance(s, PartitionSpec)),
            strict=True,
        )
    }
    fsdp = mesh.shape["fsdp"]

    def one(path: Any, x: Any) -> NamedSharding:
        keys = _dict_keys(path)
        owner = next((params[keys[s:]] for s in range(len(keys)) if keys[s:] in params), None)
        spec = PartitionSpec()
        if owner is not None and x.ndim:
            spec = logical_to_mesh(_state_logical(x.shape, *owner), x.shape, mesh, rules)
        if x.ndim and all(a is None for a in spec) and fsdp > 1 and x.size >= 1 << 16:
            # the largest dim that divides: the blocks of (num_blocks, block), not a stacked
            # (layers / chunks, ...) axis that the per-layer update indexes one slice of at a time
            dims = [d for d in range(x.ndim) if x.shape[d] % fsdp == 0]
            if dims:
                d = max(dims, key=lambda d: x.shape[d])
                spec = PartitionSpec(*(("fsdp" if i == d else None) for i in range(x.ndim)))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def maybe_initialize_distributed(env: dict[str, str] | None = None) -> bool:
    """Start multi-host JAX when the environment asks for it; returns whether it did.

    ``LOWRANK_JAX_DISTRIBUTED=auto`` calls ``jax.distributed.initialize()`` with no arguments (TPU
    pods, SLURM and other clusters JAX detects itself); ``JAX_COORDINATOR_ADDRESS`` with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` passes them explicitly. Must run before anything
    touches the devices. Calling it again in an initialised process does nothing (returns True).
    CPU processes talk through gloo collectives (JAX's default; set here if a JAX version leaves it unset).
    """
    env = dict(os.environ if env is None else env)
    auto = env.get("LOWRANK_JAX_DISTRIBUTED") == "auto"
    if not auto and not env.get("JAX_COORDINATOR_ADDRESS"):
        return False
    kwargs = {}
    if not auto:
        try:
            kwargs = {"num_processes": int(env["JAX_NUM_PROCESSES"]), "process_id": int(env["JAX_PROCESS_ID"])}
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS: also set integer JAX_NUM_PROCESSES and JAX_PROCESS_ID ({e})"
            ) from None
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if jax.distributed.is_initialized():
        return True
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


def host_rows(sharding: NamedSharding, global_shape: Sequence[int]) -> slice:
    """The contiguous rows of a ``(batch, ...)`` array that this process's devices hold under ``sharding``."""
    starts, stops = [], []
    indices = sharding.addressable_devices_indices_map(tuple(global_shape))
    if not indices:
        raise ValueError(f"batch: process {jax.process_index()} has no device in the mesh; use a mesh over all devices")
    for index in indices.values():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(global_shape[0])
        starts.append(start)
        stops.append(stop)
    lo, hi = min(starts), max(stops)
    covered = sorted(set(zip(starts, stops, strict=True)))
    if sum(b - a for a, b in covered) < hi - lo and len(covered) > 1:
        raise ValueError("batch: this process's rows are not contiguous under the data sharding")
    return slice(lo, hi)


def global_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global ``jax.Array`` from the full host batch: each process contributes only its own rows.

    On one process this is ``jax.device_put``; on several, every process computes the same
    deterministic global batch (it is a pure function of the step) and hands JAX just the rows its
    devices hold (:func:`batch_from_rows`).
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return batch_from_rows(np.asarray(batch[host_rows(sharding, batch.shape)]), sharding, batch.shape[0])


def batch_from_rows(rows: np.ndarray, sharding: NamedSharding, batch_size: int) -> jax.Array:
    """The global ``(batch_size, ...)`` array from this process's own rows (its :func:`host_rows`).

    ``jax.make_array_from_process_local_data`` on several processes; ``jax.device_put`` on one, where
    the rows are the whole batch.
    """
    if jax.process_count() == 1:
        return jax.device_put(rows, sharding)
    return jax.make_array_from_process_local_data(sharding, rows, (batch_size, *rows.shape[1:]))
