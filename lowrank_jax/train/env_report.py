"""``lowrank-jax env [CONFIG [key=value ...]]``: what a run would get on this machine.

Versions (Python, jax, jaxlib, flax, optax, orbax-checkpoint, grain, and the jax plugin that
provides the accelerator), the backend, its devices (kind and count, over all processes), the
mesh the config's ``mesh`` resolves to, and which implementation each Pallas kernel's
``implementation='auto'`` picks on this backend (and why), as :mod:`pallas_kernels.selection`
decides it for operands the kernel supports.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "libtpu", "jax-cuda12-plugin", "gcsfs")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def kernel_choices(backend: str) -> dict[str, dict[str, str]]:
    """``{kernel: {"implementation", "reason"}}`` for ``implementation='auto'`` on ``backend``."""
    from pallas_kernels import selection  # lazy: when the report is made
    from pallas_kernels.sl_matmul import api as sl_api  # lazy: when the report is made

    rules = {"sl_matmul": dict.fromkeys(sl_api.GPU_BACKENDS, sl_api.GPU_AUTO), "ternary_matmul": None}
    out = {}
    for kernel, prefer in rules.items():
        impl = selection.choose(kernel, "auto", "supported operands", None, backend, prefer)
        reason = selection.implementation_record()[-1]["reason"]
        out[kernel] = {"implementation": impl, "reason": reason}
    return out


def env_report(mesh: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict; ``mesh`` is a config's requested mesh (default: all devices data parallel)."""
    import warnings

    import jax

    from lowrank_jax import sharding as shd  # lazy: when the report is made

    devices = jax.devices()
    requested = tuple(mesh) if mesh is not None else (-1, 1, 1)
    try:
        resolved: Any = list(shd.mesh_shape(requested, len(devices)))
    except ValueError as e:
        resolved = f"not usable here: {e}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report says the same as the fallback warning
        kernels = kernel_choices(jax.default_backend())
    return {
        "python": platform.python_version(),
        "versions": {p: v for p in PACKAGES if (v := _version(p)) is not None},
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "mesh": {"requested (data, fsdp, tensor)": list(requested), "resolved": resolved},
        "kernels": kernels,
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [f"python {r['python']}; " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())]
    lines.append(
        f"backend {r['backend']}: {r['device_count']} x {r['device_kind']} ({r['local_device_count']} local, "
        f"{r['process_count']} process(es))"
    )
    mesh = r["mesh"]
    lines.append(f"mesh {mesh['requested (data, fsdp, tensor)']} -> {mesh['resolved']}")
    for k, v in r["kernels"].items():
        lines.append(f"kernel {k}: {v['implementation']} ({v['reason']})")
    return "\n".join(lines)
