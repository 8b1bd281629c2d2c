"""The whole jitted train step of every method lowers for ``cuda`` and ``tpu`` from CPU (``jax.export``).

Each step is built by :func:`lowrank_jax.train.step.make_trainer` on a small bf16 LLaMA and exported
with its shardings. The trainer is built on an abstract mesh of the target's devices
(:func:`pallas_kernels.lowering.abstract_mesh`): the Mosaic TPU lowering needs a chip generation,
which JAX reads from the abstract mesh in context, and jit needs that one mesh for all its inputs.
The SL step runs ``sl_implementation=pallas``, so its module must call the three SL kernels (Triton
on cuda, Mosaic on tpu); the other methods are XLA only (GaLore's SVD included: a cuSOLVER call on
cuda, an XLA decomposition on tpu).
"""

from __future__ import annotations

import pytest

from lowrank_jax import sharding as shd
from lowrank_jax.config import load_config
from lowrank_jax.train.step import batch_abstract, make_trainer
from pallas_kernels.lowering import PLATFORMS, abstract_mesh, export_for, kernel_calls

SMALL = [
    "model.vocab_size=256",
    "model.hidden=64",
    "model.ffn=160",
    "model.heads=2",
    "model.layers=2",
    "model.max_seq_len=32",
    "model.dtype=bfloat16",
    "seq_len=16",
    "batch_size=2",
    "steps=20",
]
METHODS = {
    "adamw": [],
    "galore": ["optim.name=galore_adamw", "galore.rank=8"],
    "galore8bit": ["optim.name=galore_adamw8bit", "galore.rank=8"],
    "galore8bit_layerwise": ["optim.name=galore_adamw8bit", "galore.rank=8", "layerwise_update=true"],
    "relora": ["model.dense=lora", "model.lora_rank=8", "relora.every=5", "relora.restart_warmup=2"],
    "sl_pallas": ["model.dense=sl", "model.sl_rank=8", "model.sl_implementation=pallas"],
    "bitlinear": ["model.dense=bitlinear"],
    "apollo": ["optim.name=apollo_adamw", "apollo.rank=8"],
    "fira_layerwise": ["optim.name=fira_adamw", "fira.rank=8", "layerwise_update=true"],
    "golore": ["optim.name=golore_adamw", "golore.rank=8", "golore.random_from=10"],
    "swan": ["optim.name=swan"],
    "ldadam": ["optim.name=ldadamw", "ldadam.rank=8"],
    "q_galore": ["optim.name=q_galore_adamw8bit", "q_galore.rank=8"],
}
SL_KERNELS = {"sl_matmul_fwd", "sl_matmul_dx", "sl_matmul_dvalues"}


def export_train_step(overrides: list[str], platform: str):
    """``jax.export`` of the train step of ``tiny`` + ``overrides`` for ``platform`` (nothing allocated)."""
    cfg = load_config("tiny", [*SMALL, *overrides])
    mesh = abstract_mesh(platform, (1, 1, 1), shd.MESH_AXES)
    trainer = make_trainer(cfg, mesh)
    return export_for(trainer.train_step, platform, trainer.abstract_state, batch_abstract(trainer), mesh=mesh)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("method", list(METHODS))
def test_train_step_lowers(method, platform):
    exported = export_train_step(METHODS[method], platform)
    assert exported.platforms == (platform,)
    calls = set(kernel_calls(exported))
    assert calls == (SL_KERNELS if method == "sl_pallas" else set()), calls
