"""Subprocess helper for tests/train/test_sharded.py (needs 8 fake CPU devices before JAX starts).

python tests/sharded_check.py losses METHOD      -> JSON {mesh: [loss, ...]} for 1 device and 3 meshes
python tests/sharded_check.py specs             -> JSON of llama_7b param and 8-bit GaLore state specs on (2,2,2)
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json

import jax
import numpy as np

from lowrank_jax.config import load_config, replace
from lowrank_jax.train.step import make_trainer

SMALL = ["model.hidden=64", "model.ffn=128", "model.heads=2", "model.layers=2", "model.max_seq_len=64"]
SMALL += ["seq_len=16", "batch_size=8", "optim.warmup_ratio=0.2", "steps=10"]
GALORE = ["optim.name=galore_adamw", "galore.rank=8", "galore.update_proj_gap=2"]
METHODS = {
    "full": ["optim.name=adamw"],
    "galore": GALORE,
    "sl": ["model.dense=sl", "model.sl_rank=8"],
    "relora": ["model.dense=lora", "model.lora_rank=8", "relora.every=2", "relora.restart_warmup=1"],
    "adamw8bit": ["optim.name=adamw8bit", "model.ffn=256"],  # mlp up/gate codes (L, 64, 1, 256): row-blocked
    "galore8bit": ["optim.name=galore_adamw8bit", "galore.rank=8", "galore.update_proj_gap=2"],
    "galore8bit_layerwise": ["optim.name=galore_adamw8bit", "galore.rank=8", "layerwise_update=true"],
    "bitlinear": ["model.dense=bitlinear"],
    "apollo": ["optim.name=apollo_adamw", "apollo.rank=8", "apollo.update_proj_gap=2"],
    "apollo_mini": ["optim.name=apollo_mini_adamw", "apollo_mini.update_proj_gap=2"],
    "fira": ["optim.name=fira_adamw", "fira.rank=8", "fira.update_proj_gap=2"],
    "golore": [*GALORE, "galore.projector=random", "galore.random_from=4", "galore.moments=reproject_first"],
}
MESHES = ["1,1,1", "8,1,1", "1,8,1", "2,2,2"]


def losses(method: str) -> dict[str, list[float]]:
    out = {}
    batches = np.random.default_rng(0).integers(0, 128, (4, 8, 17))
    for mesh in MESHES:
        cfg = replace(load_config("tiny", [*SMALL, *METHODS[method], f"mesh={mesh}"]), model__vocab_size=128)
        trainer = make_trainer(cfg)
        state, got = trainer.init_state(), []
        for b in batches:
            state, m = trainer.train_step(state, trainer.put_batch(b))
            got.append(float(m["loss"]))
        out[mesh] = got
    return out


def specs() -> dict[str, str]:
    cfg = load_config("llama_7b", ["optim.name=galore_adamw8bit", "galore.rank=1024", "mesh=2,2,2"])
    trainer = make_trainer(cfg)
    flat = jax.tree_util.tree_flatten_with_path(trainer.state_shardings)[0]
    return {jax.tree_util.keystr(path): str(tuple(s.spec)) for path, s in flat}


if __name__ == "__main__":
    what = sys.argv[1]
    print(json.dumps(losses(sys.argv[2]) if what == "losses" else specs(), indent=1, sort_keys=True))
