"""train … init_from=DIR: the first step's loss is the pretrained model's loss on that batch, for every method."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import hf_logits, torch

from lowrank_jax.config import ConfigError, load_config
from lowrank_jax.hf import import_hf
from lowrank_jax.hf.finetune import apply_init_from, init_state_from
from lowrank_jax.optim.registry import optimizer_names
from lowrank_jax.train.step import Phases

RANK = ["galore.rank=4", "galore.update_proj_gap=2"]
METHODS = {
    "adamw": [],
    "lora": ["model.dense=lora", "model.lora_rank=4"],
    "relora": [
        "model.dense=lora",
        "model.lora_rank=4",
        "relora.every=2",
        "relora.restart_warmup=1",
        "optim.warmup_ratio=0",
    ],
    "galore": ["optim.name=galore_adamw", *RANK],
    "golore": (
        ["optim.name=golore_adamw", "golore.rank=4", "golore.random_from=0"]
        if "golore_adamw" in optimizer_names()
        else ["optim.name=galore_adamw", *RANK, "galore.projector=random"]
    ),
    "apollo": ["optim.name=apollo_adamw", "apollo.rank=4"],
    "fira": ["optim.name=fira_adamw", "fira.rank=4"],
}


@pytest.fixture(scope="module")
def imported(with_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("init_from") / "model"
    import_hf(with_tokenizer[0], out)
    return out, with_tokenizer[1]


def reference_loss(hf_model, rows: np.ndarray) -> float:
    logits = torch.tensor(hf_logits(hf_model, rows[:, :-1]), dtype=torch.float64)
    return float(
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(rows[:, 1:]).reshape(-1))
    )


# adamw and lora in the default suite; the other methods (~7 s of compilation each) with -m slow
DEFAULT = ("adamw", "lora")


@pytest.mark.parametrize("method", [m if m in DEFAULT else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_first_step_loss_is_the_pretrained_loss(imported, tmp_path, method):
    src, hf_model = imported
    overrides = [f"init_from={src}", "steps=4", "batch_size=2", "seq_len=12", f"out_dir={tmp_path / 'run'}"]
    cfg = apply_init_from(load_config("tiny", overrides + METHODS[method]))
    assert (cfg.model.hidden, cfg.model.kv_heads, cfg.model.tie_embeddings) == (32, 2, True)
    assert cfg.data.tokenizer == str(src / "tokenizer.json")
    phases = Phases.compile(cfg, *Phases.trainers(cfg))
    state = init_state_from(phases, cfg)
    rows = np.random.default_rng(0).integers(0, 96, (2, 13))
    losses = []
    for step in range(2):
        state, metrics = phases.advance(state, step, rows, 2)
        losses.append(float(metrics["loss"]))
    want = reference_loss(hf_model, rows)
    print(f"{method}: first-step loss {losses[0]:.6f}, pretrained model's loss {want:.6f}")
    assert losses[0] == pytest.approx(want, abs=2e-5)
    assert losses[1] < losses[0]  # it trains from there


def test_init_from_errors(imported, tmp_path):
    src, _ = imported
    with pytest.raises(ConfigError, match="^init_from: no such directory"):
        load_config("tiny", [f"init_from={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="^init_from: model.dense=sl cannot start"):
        apply_init_from(load_config("tiny", [f"init_from={src}", "model.dense=sl"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="^init_from: .*neither a model directory"):
        apply_init_from(load_config("tiny", [f"init_from={tmp_path / 'empty'}"]))
    with pytest.raises(ConfigError, match="^seq_len: 128 exceeds the checkpoint's max_seq_len=64"):
        apply_init_from(load_config("tiny", [f"init_from={src}", "seq_len=128"]))
