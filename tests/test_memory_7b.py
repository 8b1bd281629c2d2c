"""experiments/memory_7b.py's own Q-GaLore step with INT8 weights and per-layer updates, at the tiny preset: it
trains, it starts from the model's loss, and the compiled loop updates the stacked codes in place."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.config import derive, load_config
from lowrank_jax.models import build_model
from lowrank_jax.train.state import cross_entropy

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = ("model.vocab_size=512", "seq_len=32", "model.max_seq_len=32")


@pytest.fixture()
def memory_7b(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import memory_7b

    return memory_7b


def test_the_per_layer_int8_step_copies_no_stacked_array(memory_7b, monkeypatch):
    """The loop over the layers reads each layer's slice of the stacked uint8 codes and INT4 projectors and writes
    it back in place: the compiled step holds no copy of any stacked uint8 array (XLA copies several of them,
    twice each, when the writes are not ordered after the reads)."""
    compiled = []
    real = memory_7b.compiled_memory
    monkeypatch.setattr(memory_7b, "compiled_memory", lambda c: compiled.append(c) or real(c))
    memory_7b.int8_layerwise_memory(rank=8, preset="tiny", overrides=TINY)
    layers = load_config("tiny", []).model.layers
    copies = re.findall(rf"= u8\[{layers},\d+,\d+\]\{{[^}}]*\}} copy\(", compiled[0].as_text())
    assert copies == []


@pytest.mark.slow
def test_the_per_layer_int8_step_trains_from_the_models_loss(memory_7b):
    cfg = derive(load_config("tiny", [*memory_7b.COMMON, "batch_size=1", *TINY]), model__dense="int8")
    model = build_model(cfg.model, 0)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 512, (1, cfg.seq_len + 1)), jnp.int32)
    first = float(cross_entropy(model(batch[:, :-1]), batch[:, 1:]))
    run = memory_7b.int8_layerwise_memory
    losses = run(rank=8, preset="tiny", overrides=TINY, run_with=model, run_batches=(batch,) * 4)["losses"]
    assert losses[0] == pytest.approx(first, rel=1e-5) and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05, losses
