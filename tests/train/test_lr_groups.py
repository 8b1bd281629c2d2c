"""Per-group learning rates (``optim.lr_embed`` / ``lr_blocks`` / ``lr_factors`` / ``lr_norms``) for every optimizer."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lowrank_jax.config import ConfigError, load_config, replace
from lowrank_jax.models import abstract_params, count_trainable, param_labels
from lowrank_jax.train.optimizer import (
    LR_GROUPS,
    lr_group_labels,
    lr_group_report,
    lr_groups,
    make_optimizer,
    trainable_params,
)
from lowrank_jax.train.step import make_trainer

SMALL = ["model.hidden=32", "model.ffn=64", "model.heads=2", "model.layers=2", "model.max_seq_len=32", "seq_len=16"]
SMALL += ["batch_size=4", "optim.warmup_ratio=0", "optim.lr=1e-3", "optim.weight_decay=0.1", "model.vocab_size=64"]
GROUP_LR = {"embed": 4e-3, "blocks": 2e-3, "factors": 3e-3, "norms": 5e-4}


def _cfg(*overrides):
    """A small config; the method settings every case shares are set in Python (``replace`` lets a config carry
    settings its optimizer does not read, which ``key=value`` overrides refuse)."""
    cfg = load_config("tiny", [*SMALL, *overrides])
    return replace(cfg, galore__rank=4, apollo__rank=4, fira__rank=4, model__sl_density=0.1)


def _groups_by_path(cfg):
    trainer = make_trainer(cfg)
    params = trainer.abstract_state.params
    names = lr_group_labels(param_labels(cfg.model), stacked_blocks=cfg.model.scan_layers)(params)
    return {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(names)}


def test_groups_of_a_dense_model():
    groups = _groups_by_path(_cfg())
    assert groups["['embed']"] == groups["['lm_head']['kernel']"] == "embed"
    assert groups["['blocks']['attn']['q']['kernel']"] == groups["['blocks']['mlp']['down']['kernel']"] == "blocks"
    # stacked (layers, hidden) norm scales are vectors, not matrices
    assert groups["['blocks']['attn_norm']['scale']"] == groups["['final_norm']['scale']"] == "norms"
    assert set(groups.values()) == {"embed", "blocks", "norms"}


@pytest.mark.parametrize("dense,factors", [("lora", {"lora_a", "lora_b"}), ("lowrank", {"lowrank_a", "lowrank_b"})])
def test_groups_of_the_lora_and_low_rank_factors(dense, factors):
    groups = _groups_by_path(_cfg(f"model.dense={dense}", "model.lora_rank=4"))
    q = {k.split("['q']")[1]: g for k, g in groups.items() if "['attn']['q']" in k}
    assert {k.strip("[]'") for k, g in q.items() if g == "factors"} == factors
    if dense == "lora":  # the frozen W is not scaled at all
        assert q["['kernel']"] == "frozen"


def test_groups_of_sltrain():
    groups = _groups_by_path(_cfg("model.dense=sl", "model.sl_rank=4"))
    q = {k.split("['q']")[1].strip("[]'"): g for k, g in groups.items() if "['attn']['q']" in k}
    assert q == {"sl_a": "factors", "sl_b": "factors", "sl_values": "factors", "sl_support": "frozen"}


def _one_step_deltas(cfg, batch):
    trainer = make_trainer(cfg)
    state = trainer.init_state()
    before = jax.device_get(state.params)
    state, _ = trainer.train_step(state, trainer.put_batch(batch))
    assert int(state.skipped) == 0
    diff = lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return jax.tree.map(diff, jax.device_get(state.params), before)


def _first_update(cfg):
    """The run's optimizer (clipping, frozen partition and groups included) on one fixed random gradient."""
    _, abstract = abstract_params(cfg.model)
    tx, _ = make_optimizer(cfg, abstract)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype), abstract)
    # integer leaves (SLTrain's support) get float32 zeros, as in the train step (state.float_grads)
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), abstract)
    grads = jax.tree.map(lambda g, x: g if np.issubdtype(x.dtype, np.floating) else 0 * g, grads, abstract)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    return jax.tree.map(np.asarray, updates)


CASES = {
    "adamw": [],
    "adamw8bit": ["model.hidden=64", "model.ffn=128"],  # matrices >= 4096 values: quantized moments
    "galore_adamw": [],
    "galore_adamw8bit": ["model.hidden=64", "model.ffn=128"],
    "apollo_adamw": [],
    "apollo_mini_adamw": [],
    "fira_adamw": [],
    "adamw-lora": ["model.dense=lora", "model.lora_rank=4", "model.lora_trainable_scale=true"],
    "adamw-lowrank": ["model.dense=lowrank", "model.lora_rank=4"],
    "adamw-sl": ["model.dense=sl", "model.sl_rank=4"],
    "adamw-bitlinear": ["model.dense=bitlinear"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_group_lr_scales_exactly_that_group(case):
    """The same gradient: with the group lrs each group's update is ``lr_group / lr`` times the update at the one
    global lr (every update here is linear in the lr given the gradient); frozen leaves get a zero update.
    (The per-layer fused update with groups: test_layerwise, ``lr_groups_chunked``.)"""
    name = case.split("-")[0]
    base = _cfg(f"optim.name={name}", *CASES[case])
    grouped = replace(base, **{f"optim__lr_{g}": lr for g, lr in GROUP_LR.items()})
    ref, got = _first_update(base), _first_update(grouped)
    names = lr_group_labels(param_labels(base.model), stacked_blocks=base.model.scan_layers)(ref)
    seen = set()
    for (path, group), u_ref, u_got in zip(
        jax.tree_util.tree_leaves_with_path(names), jax.tree.leaves(ref), jax.tree.leaves(got), strict=True
    ):
        if group == "frozen":
            assert not np.any(u_got) and not np.any(u_ref)
            continue
        assert np.abs(u_ref).max() > 0, (path, "no update to compare")
        ratio = GROUP_LR[group] / 1e-3
        np.testing.assert_allclose(u_got, ratio * u_ref, rtol=1e-6, err_msg=f"{case} {path} ({group})")
        seen.add(group)
    factors = any(kind in case for kind in ("lora", "lowrank", "sl"))
    assert seen == {"embed", "norms"} | ({"factors"} if factors else {"blocks"})


def test_null_groups_train_at_lr_and_leave_the_optimizer_unwrapped():
    cfg = _cfg()
    assert lr_groups(cfg) == dict.fromkeys(LR_GROUPS, 1e-3)
    plain, one = make_trainer(cfg), make_trainer(replace(cfg, optim__lr_embed=1e-3))
    # no group set: the state is exactly the ungrouped optimizer's (old checkpoints restore)
    assert jax.tree.structure(plain.abstract_state.opt_state) != jax.tree.structure(one.abstract_state.opt_state)
    assert len(jax.tree.leaves(plain.abstract_state.opt_state)) == len(jax.tree.leaves(one.abstract_state.opt_state))


def test_the_report_counts_every_trainable_parameter():
    cfg = replace(_cfg("model.dense=lora", "model.lora_rank=4"), optim__lr_factors=1e-2)
    trainer = make_trainer(cfg)
    report = lr_group_report(cfg, trainer.abstract_state.params, param_labels(cfg.model))
    assert report["factors"]["lr"] == 1e-2 and report["embed"]["lr"] == report["norms"]["lr"] == 1e-3
    assert "blocks" not in report  # every block matrix is LoRA's frozen W or a factor
    L, d, f, r = 2, 32, 64, 4
    assert report["factors"]["params"] == L * (4 * r * (d + d) + 3 * r * (d + f))
    assert report["embed"]["params"] == 2 * 64 * d and report["norms"]["params"] == (2 * L + 1) * d
    assert trainable_params(report) == count_trainable(trainer.abstract_state.params, param_labels(cfg.model))
    frozen = replace(cfg, optim__lr_factors=0.0)
    report = lr_group_report(frozen, trainer.abstract_state.params, param_labels(cfg.model))
    assert trainable_params(report) == report["embed"]["params"] + report["norms"]["params"]


@pytest.mark.parametrize("bad", ["optim.lr_embed=-1e-3", "optim.lr_norms=true", "optim.lr_blocks=fast"])
def test_a_bad_group_lr_is_one_line_naming_the_field(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        _cfg(bad)


def test_a_group_at_zero_is_frozen():
    cfg = replace(_cfg(), optim__lr_blocks=0.0, optim__lr_norms=0.0)
    deltas = _one_step_deltas(cfg, np.random.default_rng(0).integers(0, 64, (4, 17)))
    names = lr_group_labels(param_labels(cfg.model), stacked_blocks=True)(deltas)
    for group, d in zip(jax.tree.leaves(names), jax.tree.leaves(deltas), strict=True):
        assert np.any(d) == (group == "embed"), group


def test_a_group_lr_from_the_command_line_and_null():
    assert _cfg("optim.lr_embed=1e-2").optim.lr_embed == 1e-2
    assert _cfg("optim.lr_embed=1e-2", "optim.lr_embed=null").optim.lr_embed is None
