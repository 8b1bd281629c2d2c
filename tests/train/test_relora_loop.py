"""ReLoRA / LoRA / low-rank in the training loop: frozen weights, restarts, exact resume across a restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from lowrank_jax.config import ConfigError, load_config, replace
from lowrank_jax.models import count_bytes, count_params, param_labels
from lowrank_jax.train.checkpoint import checkpoint_steps
from lowrank_jax.train.loop import train
from lowrank_jax.train.metrics import read_metrics
from lowrank_jax.train.relora import switch_to_lora, warm_start_config
from lowrank_jax.train.step import make_trainer

LORA = ["model.dense=lora", "model.lora_rank=4", "model.lora_alpha=8", "optim.warmup_ratio=0.1"]


@pytest.fixture
def lora_cfg(small_overrides, tmp_path):
    return replace(load_config("tiny", [*small_overrides, *LORA, f"out_dir={tmp_path / 'run'}"]), model__vocab_size=512)


def _q(params):
    return params["blocks"]["attn"]["q"]


def test_lora_state_excludes_frozen_weights_and_kernel_stays_frozen(lora_cfg):
    trainer = make_trainer(lora_cfg)
    labels = jax.tree.leaves(param_labels(lora_cfg.model))
    params = trainer.abstract_state.params
    trainable = count_params(params) - sum(
        x.size for x, lab in zip(jax.tree.leaves(params), labels, strict=True) if lab == "FrozenWeight"
    )
    # AdamW: two float32 moments per trainable parameter, plus scalar counters.
    assert count_bytes(trainer.abstract_state.opt_state) - 2 * 4 * trainable < 64
    state = trainer.init_state()
    w0 = np.asarray(_q(state.params)["kernel"])
    batch = trainer.put_batch(np.random.default_rng(0).integers(0, 512, (8, 33)))
    for _ in range(4):
        state, m = trainer.train_step(state, batch)
    np.testing.assert_array_equal(np.asarray(_q(state.params)["kernel"]), w0)
    assert np.abs(np.asarray(_q(state.params)["lora_b"])).max() > 0


@pytest.mark.slow  # 12 s on 2 cores
def test_restarts_merge_at_the_jagged_schedule_zeros(lora_cfg):
    cfg = replace(lora_cfg, steps=12, relora__every=4, relora__restart_warmup=2, relora__reset="zero")
    trainer = make_trainer(cfg)
    state = trainer.init_state()
    batch = trainer.put_batch(np.random.default_rng(0).integers(0, 512, (8, 33)))
    kernels, lrs = [np.asarray(_q(state.params)["kernel"])], []
    for _ in range(12):
        state, m = trainer.train_step(state, batch)
        kernels.append(np.asarray(_q(state.params)["kernel"]))
        lrs.append(float(m["lr"]))
        new_step = int(state.step)
        if new_step in (5, 9):  # merged right after the update taken at lr 0
            assert np.abs(np.asarray(_q(state.params)["lora_b"])).max() == 0
            mu = [x for x in jax.tree.leaves(state.opt_state) if x.shape == _q(state.params)["lora_b"].shape]
            assert mu and all(np.abs(np.asarray(x)).max() == 0 for x in mu)
    changed = [i for i in range(1, 13) if not np.array_equal(kernels[i], kernels[i - 1])]
    assert changed == [5, 9]
    assert lrs[4] == 0.0 and lrs[8] == 0.0 and lrs[5] > 0


@pytest.mark.slow  # 26 s; exact resume after SIGKILL is in the default suite (test_train)
def test_resume_is_exact_across_a_restart(lora_cfg, tmp_path):
    args = dict(steps=12, checkpoint_every=4, keep_checkpoints=5, relora__every=4, relora__restart_warmup=2)
    ref = replace(lora_cfg, out_dir=str(tmp_path / "ref"), **args)
    train(ref, log=lambda *_: None)
    run = replace(lora_cfg, out_dir=str(tmp_path / "run"), **args)
    train(run, log=lambda *_: None)
    ckpts = Path(run.out_dir) / "checkpoints"
    for step in (8, 12):  # as if the run had died after its step-4 checkpoint
        shutil.rmtree(ckpts / str(step))
    assert checkpoint_steps(ckpts) == [4]
    train(replace(run, resume=True), log=lambda *_: None)

    def losses(out):
        return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r}

    got, want = losses(run.out_dir), losses(ref.out_dir)
    assert sorted(got) == list(range(1, 13)) and all(got[s] == want[s] for s in range(5, 13))


def _adam(opt_state):
    """The ScaleByAdamState inside a (clip, adamw) chain, partitioned or not."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))]
    found = [x for x in found if isinstance(x, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0]


@pytest.mark.slow  # 21 s on 2 cores
def test_warm_start_switch_preserves_function_and_carries_state(lora_cfg):
    cfg = replace(lora_cfg, steps=20, relora__warm_start=5, relora__every=5, relora__restart_warmup=2)
    lora, warm = make_trainer(cfg), make_trainer(warm_start_config(cfg))
    assert "lora_a" not in warm.abstract_state.params["blocks"]["attn"]["q"]
    rng = np.random.default_rng(1)
    state = warm.init_state()
    for _ in range(5):
        state, m = warm.train_step(state, warm.put_batch(rng.integers(0, 512, (8, 33))))
    assert float(m["lr"]) > 0  # the full-rank phase follows the plain warmup + cosine
    batch = lora.put_batch(rng.integers(0, 512, (8, 33)))
    dense_loss, _ = warm.eval_step(state.params, batch)
    dense_adam = _adam(state.opt_state)
    new = switch_to_lora(state, lora)
    assert jax.tree.structure(new) == jax.tree.structure(lora.abstract_state)
    lora_loss, _ = lora.eval_step(new.params, batch)
    np.testing.assert_allclose(float(lora_loss), float(dense_loss), rtol=1e-6)  # B = 0: same function
    q_dense, q_lora = _q(state.params), _q(new.params)
    np.testing.assert_array_equal(q_lora["kernel"], q_dense["kernel"])
    assert np.abs(np.asarray(q_lora["lora_a"])).max() > 0 and not np.any(np.asarray(q_lora["lora_b"]))
    adam = _adam(new.opt_state)
    assert int(adam.count) == int(dense_adam.count) == 5
    assert all(int(x) == 5 for x in jax.tree.leaves(new.opt_state) if np.ndim(x) == 0 and "int" in str(x.dtype))
    for field in ("mu", "nu"):
        old, cur = getattr(dense_adam, field), getattr(adam, field)
        np.testing.assert_array_equal(cur["embed"], old["embed"])  # dense leaves keep their moments
        np.testing.assert_array_equal(cur["lm_head"]["kernel"], old["lm_head"]["kernel"])
        assert np.abs(np.asarray(old["embed"])).max() > 0
        assert isinstance(cur["blocks"]["attn"]["q"]["kernel"], optax.MaskedNode)  # frozen W: no state
        assert not np.any(np.asarray(cur["blocks"]["attn"]["q"]["lora_a"]))  # fresh factors: zero moments
    # the LoRA phase starts at the switch with lr 0 (the jagged re-warm), then learns
    new, m = lora.train_step(new, batch)
    assert float(m["lr"]) == 0.0
    new, m = lora.train_step(new, batch)
    assert float(m["lr"]) > 0


@pytest.mark.slow  # 43 s; exact resume after SIGKILL is in the default suite (test_train)
def test_warm_start_run_resumes_exactly_across_the_switch(lora_cfg, tmp_path):
    args = dict(steps=10, checkpoint_every=2, keep_checkpoints=6, relora__warm_start=4, relora__every=3)
    args.update(relora__restart_warmup=1)
    ref = replace(lora_cfg, out_dir=str(tmp_path / "ref"), **args)
    res = train(ref, log=lambda *_: None)
    assert res["trainable_params"] < res["params"]
    run = replace(lora_cfg, out_dir=str(tmp_path / "run"), **args)
    train(run, log=lambda *_: None)
    ckpts = Path(run.out_dir) / "checkpoints"
    for step in (6, 8, 10):  # died right after the full-rank phase's last checkpoint (step 4 = the switch)
        shutil.rmtree(ckpts / str(step))
    train(replace(run, resume=True), log=lambda *_: None)
    for step in (8, 10):  # and once inside the LoRA phase
        shutil.rmtree(ckpts / str(step))
    train(replace(run, resume=True), log=lambda *_: None)

    def losses(out):
        return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r}

    got, want = losses(run.out_dir), losses(ref.out_dir)
    assert sorted(got) == list(range(1, 11)) and all(got[s] == want[s] for s in range(1, 11))
    lrs = {r["step"]: r["lr"] for r in read_metrics(Path(ref.out_dir) / "metrics.jsonl") if "lr" in r}
    assert lrs[5] == 0.0 and lrs[8] == 0.0 and lrs[4] > 0  # the switch (step index 4) and a restart (7)


def test_lowrank_kind_trains(small_overrides, tmp_path):
    cfg = replace(
        load_config("tiny", [*small_overrides, "model.dense=lowrank", "model.lora_rank=8", f"out_dir={tmp_path}"]),
        model__vocab_size=512,
    )
    trainer = make_trainer(cfg)
    state = trainer.init_state()
    batch = trainer.put_batch(np.random.default_rng(0).integers(0, 512, (8, 33)))
    first = None
    for _ in range(6):
        state, m = trainer.train_step(state, batch)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < first


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["relora.every=10"], "relora.every"),  # restarts need lora
        (["model.dense=lora", "relora.every=10", "relora.restart_warmup=10"], "relora.restart_warmup"),
        (["model.dense=lora", "optim.name=galore_adamw"], "optim.name"),
        (["relora.reset=cosine"], "relora.reset"),
        (["relora.warm_start=10"], "relora.warm_start"),  # a warm start switches to lora
        (["model.dense=lora", "relora.warm_start=300"], "relora.warm_start"),  # not before the end
        (["model.dense=lora", "relora.warm_start=-1"], "relora.warm_start"),
        (["model.dense=lora", "relora.warm_start=10"], "optim.warmup_ratio"),  # warmup 20 > switch at 10
        (["model.lora_rank=0"], "model.lora_rank"),
    ],
)
def test_bad_relora_config(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        load_config("tiny", overrides)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["galore.rank=0"], "galore.rank"),
        (["galore.update_proj_gap=-1"], "galore.update_proj_gap"),
        (["galore.proj_type=left"], "galore.proj_type"),
        (["galore.svd=lanczos"], "galore.svd"),
        (["galore.refresh=never"], "galore.refresh"),
        (["galore.moments=rotate"], "galore.moments"),
    ],
)
def test_bad_galore_config(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        load_config("tiny", overrides)
