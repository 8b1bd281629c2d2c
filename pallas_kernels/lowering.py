"""Lower (``jax.export``) any computation for ``cuda`` or ``tpu`` from a machine that has neither.

``jax.export(fn, platforms=[p])`` runs the whole lowering for platform ``p`` — XLA ops to StableHLO and
every Pallas kernel to Triton IR (``cuda``) or a Mosaic TPU module (``tpu``) — without the hardware. Two
things make that work here, kept in :func:`export_for` so every test lowers the same way:

* **A device to lower for.** The Mosaic TPU lowering reads the chip generation from the device kind
  (``tpu_info.get_tpu_info()``: lane/sublane counts, VMEM); on CPU it sees ``"cpu"`` and fails with
  "Unsupported TPU device kind: cpu". JAX takes the device kind from the *abstract mesh in context*
  when there is one, so the lowering runs under ``jax.sharding.use_abstract_mesh`` of an
  :class:`~jax.sharding.AbstractMesh` whose :class:`~jax.sharding.AbstractDevice` names the chip
  (:data:`TPU_DEVICE_KIND`, TPU v5e: 128 MiB VMEM, 16 MiB scoped by default, the most constrained
  current chip). A computation with shardings (a train step built by ``make_trainer``) must be built on
  that same mesh (:func:`abstract_mesh` with its axis names), since jit requires one mesh for all inputs.
  Triton lowers for compute capability 9.0 (Hopper) when no GPU is present.
* **Triton custom calls.** ``jax.export`` refuses custom calls without a serialization-compatibility
  guarantee; the Triton kernel call (``__gpu$xla.gpu.triton``) is one, so its check is disabled. The
  exported artifact proves the lowering; it is not meant to be stored and run on a later JAX.
* **Mosaic GPU.** Its kernels lower to a ``mosaic_gpu`` custom call whose serialized module names the
  kernel (:func:`kernel_calls` reads it); the lowering verifies the warpgroup MMA shapes, the swizzled
  shared-memory layouts and the shared-memory total for sm_90a.

What a CPU lowering does not prove: Triton → PTX compilation (register and shared-memory allocation)
and Mosaic's layout passes run inside XLA at compile time on the device. The block choosers keep
estimates of shared memory / VMEM under budget for that reason (:mod:`pallas_kernels.platforms`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

PLATFORMS = ("cuda", "tpu")
TPU_DEVICE_KIND = "TPU v5 lite"  # TPU v5e
GPU_DEVICE_KIND = "NVIDIA H100 80GB HBM3"
TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_GPU_DIALECT = "stable"  # "stable_mosaic_gpu": a dialect name, not a kernel's
_DEVICES = {
    "tpu": AbstractDevice(device_kind=TPU_DEVICE_KIND, num_cores=1, platform="tpu"),
    "cuda": AbstractDevice(device_kind=GPU_DEVICE_KIND, num_cores=132, platform="gpu"),
}


def abstract_mesh(
    platform: str, axis_sizes: Sequence[int] = (1,), axis_names: Sequence[str] = ("x",), device_kind: str | None = None
) -> AbstractMesh:
    """An :class:`~jax.sharding.AbstractMesh` of devices of ``platform`` (``device_kind``: e.g. ``"TPU v6 lite"``)."""
    if platform not in _DEVICES:
        raise ValueError(f"platform: must be one of {PLATFORMS}, got {platform!r}")
    device = _DEVICES[platform]
    if device_kind is not None:
        device = AbstractDevice(device_kind=device_kind, num_cores=1, platform=device.platform)
    return AbstractMesh(
        tuple(axis_sizes), tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_sizes), abstract_device=device
    )


def export_for(
    fn: Callable[..., Any], platform: str, *args: Any, mesh: AbstractMesh | None = None, **kwargs: Any
) -> export.Exported:
    """``jax.export`` of ``fn`` (jitted here unless already) for ``platform``, lowered under ``mesh``
    (default: one abstract device of ``platform``); ``args``: arrays or ``jax.ShapeDtypeStruct``."""
    mesh = mesh if mesh is not None else abstract_mesh(platform)
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    with jax.sharding.use_abstract_mesh(mesh):
        return export.export(jitted, platforms=[platform], disabled_checks=checks)(*args, **kwargs)


def custom_call_targets(exported: export.Exported) -> list[str]:
    """The distinct custom-call targets of an exported module (``tpu_custom_call``: a Mosaic kernel)."""
    return sorted(set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module())))


def kernel_calls(exported: export.Exported) -> list[str]:
    """The Pallas kernels an exported module calls, by name, in order (Triton, Mosaic TPU and Mosaic GPU)."""
    calls = []
    for line in exported.mlir_module().splitlines():
        if f"custom_call @{TRITON_CALL}" in line or "custom_call @tpu_custom_call" in line:
            found = re.search(r'(?:kernel_name|name) = "([^"]*)"', line)
            calls.append(found.group(1) if found else "?")
        elif "custom_call @mosaic_gpu" in line:  # the kernel's name is a symbol in its serialized module
            names = [n for n in re.findall(r"\\00(\w+)_mosaic_gpu\\00", line) if n != MOSAIC_GPU_DIALECT]
            calls.append(names[0] if names else "?")
    return calls


def triton_kernels(exported: export.Exported) -> list[dict[str, Any]]:
    """Each Triton kernel call of a module exported for ``cuda``, in order: ``name``, ``grid`` (x, y, z),
    ``num_warps``, ``num_stages`` and ``ttir``, the kernel's Triton IR as text (the call carries it as
    MLIR bytecode; jaxlib's Triton dialect reads it back)."""
    from jax._src.interpreters import mlir as jmlir  # lazy: only what reads Triton IR needs these
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    ctx = jmlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    calls: list[dict[str, Any]] = []
    with ctx:

        def walk(op: Any) -> None:
            for region in op.regions:
                for block in region.blocks:
                    for inner in block.operations:
                        attrs = inner.attributes
                        target = str(attrs["call_target_name"]) if "call_target_name" in attrs else ""
                        if inner.operation.name == "stablehlo.custom_call" and TRITON_CALL in target:
                            cfg = ir.DictAttr(attrs["mhlo.backend_config"])
                            kernel = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes)
                            calls.append(
                                {
                                    "name": ir.StringAttr(cfg["name"]).value,
                                    "grid": [ir.IntegerAttr(cfg[f"grid_{a}"]).value for a in "xyz"],
                                    "num_warps": ir.IntegerAttr(cfg["num_warps"]).value,
                                    "num_stages": ir.IntegerAttr(cfg["num_stages"]).value,
                                    "ttir": kernel.operation.get_asm(enable_debug_info=False),
                                }
                            )
                        walk(inner.operation)

        walk(ir.Module.parse(exported.mlir_module()).operation)
    return calls
