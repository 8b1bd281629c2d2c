"""The optimizer registry as the training loop uses it: every name builds, trains and shrinks state as claimed."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lowrank_jax.config import load_config, replace
from lowrank_jax.models import count_bytes
from lowrank_jax.optim import GaLoreState, default_mask
from lowrank_jax.optim.registry import optimizer_names
from lowrank_jax.train.step import make_trainer


@pytest.fixture(scope="module")
def base(small_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("opt")
    return replace(
        load_config("tiny", [*small_overrides, f"out_dir={out}"]),
        model__vocab_size=512,
        galore__rank=8,
        galore__update_proj_gap=3,
    )


def test_registry_lists_the_methods():
    assert {"adamw", "adamw8bit", "galore_adamw", "galore_adamw8bit"} <= set(optimizer_names())


def test_default_mask_selects_attention_and_mlp_kernels_only(base):
    trainer = make_trainer(base)
    mask = default_mask(trainer.abstract_state.params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    selected = sorted(k for k, v in flat.items() if v)
    assert len(selected) == 7 and all("blocks" in k and "kernel" in k for k in selected)
    assert not flat["['embed']"] and not flat["['lm_head']['kernel']"]
    assert not flat["['blocks']['attn_norm']['scale']"]


# the 8-bit pair (~9 s each) with -m slow
@pytest.mark.parametrize(
    "name",
    [
        "adamw",
        pytest.param("adamw8bit", marks=pytest.mark.slow),
        "galore_adamw",
        pytest.param("galore_adamw8bit", marks=pytest.mark.slow),
    ],
)
def test_each_optimizer_trains_in_the_loop(base, name):
    cfg = replace(base, optim__name=name, optim__lr=3e-3, optim__warmup_ratio=0.0)
    trainer = make_trainer(cfg)
    state = trainer.init_state()
    batch = trainer.put_batch(np.random.default_rng(0).integers(0, 512, (8, 33)))
    losses = []
    for _ in range(8):  # crosses two GaLore refreshes (gap 3)
        state, m = trainer.train_step(state, batch)
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
    assert int(state.skipped) == 0


def test_galore_state_is_low_rank_and_smaller(base):
    sizes = {}
    for name in ("adamw", "galore_adamw", "galore_adamw8bit"):
        trainer = make_trainer(replace(base, optim__name=name))
        sizes[name] = count_bytes(trainer.abstract_state.opt_state)
        if name == "galore_adamw":
            galore_state = next(
                s
                for s in jax.tree.leaves(trainer.abstract_state.opt_state, is_leaf=lambda x: isinstance(x, GaLoreState))
                if isinstance(s, GaLoreState)
            )
            # q kernel stacked (layers=2, in=64, out=64): std projects the input side with rank 8.
            q_proj = galore_state.proj_in["blocks"]["attn"]["q"]["kernel"]
            assert q_proj.shape == (2, 64, 8)
    assert sizes["galore_adamw8bit"] < sizes["galore_adamw"] < sizes["adamw"]


def test_a_galore_config_field_reaches_the_transform(base):
    """``galore.oversample`` changes the randomized range finder's sketch, hence the first projector."""
    cfg = replace(base, optim__name="galore_adamw", galore__svd="randomized", galore__rank=2)
    grads = jax.tree.map(
        lambda x: np.random.default_rng(1).standard_normal(x.shape).astype(x.dtype),
        make_trainer(cfg).init_state().params,
    )
    q_proj = {}
    for oversample in (0, 8):
        trainer = make_trainer(replace(cfg, galore__oversample=oversample))
        state = trainer.init_state()
        _, opt_state = jax.jit(trainer.tx.update)(grads, state.opt_state, state.params)  # eager: 15 s
        galore_state = next(
            s
            for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GaLoreState))
            if isinstance(s, GaLoreState)
        )
        q_proj[oversample] = np.asarray(galore_state.proj_in["blocks"]["attn"]["q"]["kernel"])
    assert q_proj[0].shape == q_proj[8].shape == (2, 64, 2)
    assert not np.allclose(np.abs(q_proj[0]), np.abs(q_proj[8]), atol=1e-3)
