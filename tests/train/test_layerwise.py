"""Per-layer fused update: the same trajectory as the ordinary step, with accumulation and clipping."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_cli

from lowrank_jax.config import ConfigError, load_config, replace
from lowrank_jax.train import layerwise
from lowrank_jax.train.layerwise import LayerwiseOptState
from lowrank_jax.train.step import make_trainer

SMALL = ["model.hidden=32", "model.ffn=64", "model.heads=2", "model.layers=3", "model.max_seq_len=64"]
SMALL += ["seq_len=16", "batch_size=4", "grad_accum=2", "optim.grad_clip=0.5", "optim.warmup_ratio=0.25", "steps=8"]


def _pair(*overrides, vocab=64):
    cfg = replace(load_config("tiny", [*SMALL, *overrides]), model__vocab_size=vocab)
    return make_trainer(cfg), make_trainer(replace(cfg, layerwise_update=True))


SLOW = pytest.mark.slow  # covered in the default suite by a case of the same kind


@pytest.mark.parametrize(
    "overrides,chunk_values",
    [
        pytest.param(["optim.name=adamw", "optim.weight_decay=0.1"], None, id="adamw", marks=SLOW),
        pytest.param(
            ["optim.name=galore_adamw", "galore.rank=4", "galore.update_proj_gap=2"], None, id="galore", marks=SLOW
        ),
        # every matrix >= 4096 values per layer: quantized alike
        pytest.param(["optim.name=adamw8bit", "model.hidden=64"], None, id="adamw8bit", marks=SLOW),
        pytest.param(["optim.name=adamw", "optim.grad_clip=0"], None, id="no_clip", marks=SLOW),
        # embed (64, 32) and lm_head (32, 64) updated in 4 row chunks each
        pytest.param(["optim.name=adamw", "optim.weight_decay=0.1"], 512, id="adamw_chunked", marks=SLOW),
        pytest.param(["optim.name=adamw", "optim.grad_clip=0"], 512, id="no_clip_chunked", marks=SLOW),
        # embed (128, 64) and lm_head (64, 128) in 2 chunks of 4096 values: the same 8-bit blocks
        pytest.param(
            ["optim.name=adamw8bit", "model.hidden=64", "model.vocab_size=128"],
            4096,
            id="adamw8bit_chunked",
            marks=SLOW,
        ),
        # random projections and staggered offsets: each layer numbers its matrices as the stacked model does
        pytest.param(
            ["optim.name=apollo_adamw", "apollo.rank=4", "apollo.update_proj_gap=2"], None, id="apollo", marks=SLOW
        ),
        pytest.param(
            ["optim.name=galore_adamw", "galore.rank=4", "galore.update_proj_gap=4", "galore.refresh=staggered"],
            None,
            id="galore_staggered",
        ),
        pytest.param(
            ["optim.name=galore_adamw", "galore.rank=4", "galore.update_proj_gap=2", "galore.projector=random"],
            None,
            id="golore",
            marks=SLOW,
        ),
        pytest.param(
            ["optim.name=adamw", "optim.lr_embed=3e-3", "optim.lr_norms=3e-4", "optim.lr_blocks=2e-3"],
            512,
            id="lr_groups_chunked",
        ),
    ],
)
def test_layerwise_matches_the_ordinary_step(overrides, chunk_values, monkeypatch):
    if chunk_values:
        monkeypatch.setattr(layerwise, "CHUNK_VALUES", chunk_values)
    vocab = 128 if "model.vocab_size=128" in overrides else 64
    ref, lw = _pair(*overrides, vocab=vocab)
    assert isinstance(lw.abstract_state.opt_state, LayerwiseOptState)
    chunks = {name: tx_ch[1].n for name, tx_ch in lw.tx.rest.items()}
    want = {"embed": 1, "lm_head/kernel": 1, "final_norm/scale": 1}
    if chunk_values:
        want.update({"embed": 4, "lm_head/kernel": 4} if chunk_values == 512 else {"embed": 2, "lm_head/kernel": 2})
    assert chunks == want
    s_ref, s_lw = ref.init_state(), lw.init_state()
    rng = np.random.default_rng(3)
    clipped = 0
    for _ in range(5):
        batch = rng.integers(0, vocab, (4, 17))
        s_ref, m_ref = ref.train_step(s_ref, ref.put_batch(batch))
        s_lw, m_lw = lw.train_step(s_lw, lw.put_batch(batch))
        np.testing.assert_allclose(float(m_lw["loss"]), float(m_ref["loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(m_lw["grad_norm"]), float(m_ref["grad_norm"]), rtol=2e-4)
        assert float(m_lw["lr"]) == float(m_ref["lr"])
        clipped += float(m_ref["grad_norm"]) > 0.5
    assert clipped >= 3 or "optim.grad_clip=0" in overrides  # clipping was active
    for a, b in zip(jax.tree.leaves(s_lw.params), jax.tree.leaves(s_ref.params), strict=True):
        # 8-bit: a moment on a rounding tie may land one quantization level apart (≈ lr · 1e-2; up to
        # 2.1e-4 after 5 steps since the blocks' linears run on 2-D tokens, which reorders float sums)
        atol = 3e-4 if "optim.name=adamw8bit" in overrides else 1e-5
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=atol)
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(*map(jax.tree.leaves, (s_lw.params, ref.init_state().params)), strict=True)
    )
    assert moved > 1e-3


@pytest.mark.parametrize("chunk_values", [None, 512])
def test_nonfinite_step_is_skipped(chunk_values, monkeypatch):
    if chunk_values:
        monkeypatch.setattr(layerwise, "CHUNK_VALUES", chunk_values)
    _, lw = _pair()
    state = lw.init_state()
    state = state._replace(params={**state.params, "embed": state.params["embed"].at[0, 0].set(jnp.nan)})
    before = jax.tree.map(np.asarray, state.params)
    new, m = lw.train_step(state, lw.put_batch(np.zeros((4, 17), np.int32)))
    assert int(m["skipped"]) == 1 and int(new.skipped) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_layerwise_step_needs_no_full_gradient():
    """XLA's temporaries of the fused step are a fraction of the ordinary step's, which hold a full gradient."""
    model = [
        "model.hidden=256",
        "model.ffn=704",
        "model.layers=6",
        "model.vocab_size=256",
        "model.param_dtype=bfloat16",
    ]
    temps = {}
    for lw in ("false", "true"):
        out = run_cli("memory", "tiny", *model, "seq_len=32", "batch_size=2", f"layerwise_update={lw}", "--no-licm")
        assert out.returncode == 0, out.stderr[-2000:]
        temps[lw] = json.loads(out.stdout.rstrip().rpartition("\n")[0])["xla_memory"]["temp_size_in_bytes"]
    block_bytes = 6 * (4 * 256 * 256 + 3 * 256 * 704) * 2  # every block's bf16 weights = one full block gradient
    assert temps["false"] > block_bytes
    assert temps["true"] < 0.4 * temps["false"], temps


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["layerwise_update=true", "model.scan_layers=false"], "layerwise_update"),
        (["layerwise_update=true", "model.dense=lora", "relora.every=50"], "layerwise_update"),
    ],
)
def test_layerwise_config_errors(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        load_config("tiny", overrides)
