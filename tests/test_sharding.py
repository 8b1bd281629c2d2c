"""Logical-axis rules and mesh construction (multi-device behaviour is exercised with fake CPU devices)."""

from __future__ import annotations

import pytest
from jax.sharding import Mesh, PartitionSpec

from lowrank_jax.sharding import logical_to_mesh, make_mesh, mesh_shape


class _FakeMesh:
    """Only ``shape`` is read by logical_to_mesh."""

    def __init__(self, data, fsdp, tensor):
        self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_mesh_shape_fills_minus_one_and_checks_product():
    assert mesh_shape((1, -1, 2), 8) == (1, 4, 2)
    assert mesh_shape((1, 1, 1), 1) == (1, 1, 1)
    with pytest.raises(ValueError, match="mesh"):
        mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="mesh"):
        mesh_shape((2, 2, 1), 8)


def test_default_mesh_is_one_device():
    mesh = make_mesh()
    assert isinstance(mesh, Mesh) and mesh.devices.size == 1 and mesh.axis_names == ("data", "fsdp", "tensor")


def test_logical_rules_map_and_skip_indivisible_dims():
    mesh = _FakeMesh(1, 4, 2)
    assert logical_to_mesh(PartitionSpec("embed", "mlp"), (512, 1376), mesh) == PartitionSpec("fsdp", "tensor")
    assert logical_to_mesh(PartitionSpec("layers", "embed", "heads"), (8, 512, 512), mesh) == PartitionSpec(
        None, "fsdp", "tensor"
    )
    # 1375 is not divisible by tensor=2: that dim stays unsharded.
    assert logical_to_mesh(PartitionSpec("embed", "mlp"), (512, 1375), mesh) == PartitionSpec("fsdp", None)
    # A size-1 mesh axis is never named.
    assert logical_to_mesh(PartitionSpec("embed", "mlp"), (512, 1376), _FakeMesh(8, 1, 1)) == PartitionSpec(None, None)
    # Unnamed trailing dims are replicated.
    assert logical_to_mesh(PartitionSpec("embed"), (512, 3), mesh) == PartitionSpec("fsdp", None)


def test_distributed_start_only_when_the_environment_asks():
    from lowrank_jax.sharding import maybe_initialize_distributed

    assert maybe_initialize_distributed({}) is False
    with pytest.raises(ValueError, match="^JAX_COORDINATOR_ADDRESS"):
        maybe_initialize_distributed({"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2"})


def test_global_batch_on_one_process_is_the_whole_batch():
    import numpy as np

    from lowrank_jax.sharding import batch_sharding, global_batch, host_rows

    mesh = make_mesh()
    sharding = batch_sharding(mesh)
    batch = np.random.default_rng(0).integers(0, 100, (6, 9)).astype(np.int32)
    assert host_rows(sharding, batch.shape) == slice(0, 6)
    out = global_batch(batch, sharding)
    assert out.sharding == sharding
    np.testing.assert_array_equal(np.asarray(out), batch)
