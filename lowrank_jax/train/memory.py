"""Per-device memory of a train step from XLA's ahead-of-time compile, with nothing allocated.

``lowrank-jax memory CONFIG [method=NAME] [key=value ...] [--devices N]`` builds the run's
:class:`~lowrank_jax.train.step.Trainer` on abstract inputs (``jax.ShapeDtypeStruct`` with their
shardings), lowers and compiles the jitted train step and prints ``compiled.memory_analysis()``:
argument (params + optimizer state + batch), output, temporary and aliased (donated) bytes per
device, and the peak estimate ``argument + output + temp − alias``. ``method=`` expands to the
overrides of one of :data:`METHODS`; any other ``key=value`` is a config override. On a CPU host,
``--devices N`` asks XLA for N host devices (``--xla_force_host_platform_device_count``) so a mesh
such as ``mesh=1,8,1`` (FSDP over 8) can be compiled and measured without the hardware.

``--no-licm`` disables XLA's while-loop-invariant code motion. On the CPU backend bf16 matmuls
run in float32 and that pass hoists a float32 copy of every stacked bf16 weight out of the layer
loop (``L × in × out × 4`` bytes that a GPU compile, whose bf16 matmuls are native, never
allocates); the CPU figures for bf16 models are taken with it off and say so.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from lowrank_jax import sharding as shd
from lowrank_jax.config import Config, ConfigError, load_config, replace
from lowrank_jax.models import count_bytes, count_params
from lowrank_jax.train.step import compile_train_step, compiled_memory, make_trainer

# method name -> overrides; ranks follow the papers' 7B settings where a method has one (GaLore r=1024,
# SLTrain r=1024 alpha 8 delta 0.05; ReLoRA's default r=128; Fira r=512, pre_training_c4/scripts/llama_7b.sh;
# APOLLO r=256 and APOLLO-Mini r=1, scripts/pretrain_c4/llama_7b_apollo{,_mini}.sh).
METHODS: dict[str, list[str]] = {
    "adamw": ["optim.name=adamw"],
    "adamw8bit": ["optim.name=adamw8bit"],
    "galore": ["optim.name=galore_adamw", "galore.rank=1024"],
    "galore8bit": ["optim.name=galore_adamw8bit", "galore.rank=1024"],
    "fira": ["optim.name=fira_adamw", "fira.rank=512"],
    "apollo": ["optim.name=apollo_adamw", "apollo.rank=256"],
    "apollo_mini": ["optim.name=apollo_mini_adamw", "apollo_mini.rank=1"],
    "sl": ["model.dense=sl", "model.sl_rank=1024", "model.sl_alpha=8", "model.sl_density=0.05"],
    "relora": ["model.dense=lora", "model.lora_rank=128"],  # restarts (relora.every) add no memory
    "bitlinear": ["model.dense=bitlinear"],
}


def expand_method(overrides: list[str]) -> list[str]:
    """Replace ``method=NAME`` by the overrides of ``METHODS[NAME]`` (later overrides still win)."""
    out: list[str] = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "method":
            if value not in METHODS:
                raise ConfigError(f"method: unknown method {value!r} (known: {', '.join(sorted(METHODS))})")
            out = [*METHODS[value], *out]
        else:
            out.append(item)
    return out


NO_LICM_FLAG = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def _set_xla_flag(flag: str) -> None:
    """Add ``--name=value`` to XLA_FLAGS (replacing the same name).

    JAX reads XLA_FLAGS when it first initialises a backend (the first device query or array), not at
    import, so this works after ``import jax`` as long as nothing has touched a device yet.
    """
    name = flag.split("=", 1)[0]
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=", 1)[0] != name]
    os.environ["XLA_FLAGS"] = " ".join([*flags, flag])


def request_host_devices(n: int) -> None:
    """Ask XLA for ``n`` CPU devices; must run before JAX initialises its backends."""
    if n < 1:
        raise ConfigError(f"--devices: must be >= 1, got {n}")
    _set_xla_flag(f"--xla_force_host_platform_device_count={n}")


def step_memory(cfg: Config) -> dict[str, Any]:
    """XLA's per-device memory analysis of ``cfg``'s compiled train step, plus state byte counts."""
    if cfg.model.vocab_size == 0:  # the BPE tokenizer is trained to data.vocab_size tokens
        cfg = replace(cfg, model__vocab_size=cfg.data.vocab_size)
    try:
        shd.mesh_shape(cfg.mesh, jax.device_count())
        trainer = make_trainer(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    memory = compiled_memory(compile_train_step(trainer))
    state = trainer.abstract_state
    return {
        "devices": int(trainer.mesh.devices.size),
        "mesh": dict(trainer.mesh.shape),
        "device_kind": jax.devices()[0].device_kind,
        "params": count_params(state.params),
        "param_bytes": count_bytes(state.params),
        "optimizer_state_bytes": count_bytes(state.opt_state),
        "xla_memory": memory,
    }


def memory_command(
    config: str, overrides: list[str], devices: int | None = None, no_licm: bool = False
) -> dict[str, Any]:
    """What ``lowrank-jax memory`` prints: the resolved method/config and :func:`step_memory`."""
    if devices is not None:
        request_host_devices(devices)
    if no_licm:
        _set_xla_flag(NO_LICM_FLAG)
    cfg = load_config(config, expand_method(overrides))
    return {"config": config, "overrides": overrides, "xla_flags": os.environ.get("XLA_FLAGS", ""), **step_memory(cfg)}
