"""End-to-end training: determinism, exact resume after SIGKILL, checkpoint fallback, skipping."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.config import load_config, replace
from lowrank_jax.train.checkpoint import Checkpointer, checkpoint_steps
from lowrank_jax.train.loop import train
from lowrank_jax.train.metrics import read_metrics
from lowrank_jax.train.optimizer import make_schedule
from lowrank_jax.train.step import make_trainer


def _losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in r}


def _cfg(small_overrides, out_dir, *extra):
    return load_config("tiny", [*small_overrides, f"out_dir={out_dir}", *extra])


def test_train_end_to_end_and_determinism(small_overrides, tmp_path):
    res = train(_cfg(small_overrides, tmp_path / "a", "steps=80", "eval_every=40"), log=lambda *_: None)
    out = tmp_path / "a"
    for name in ("results.json", "metrics.jsonl", "loss.png", "config.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    for key in (
        "final_val_loss",
        "final_val_ppl",
        "tokens",
        "steps",
        "params",
        "optimizer_state_bytes",
        "wall_time_s",
        "tokens_per_s",
        "jax_version",
        "device_kind",
        "git_commit",
        "unigram_val_ppl",
    ):
        assert key in saved, key
    assert saved["tokens"] == 80 * 8 * 32
    assert math.isfinite(res["final_val_loss"])
    # The model learns: validation loss falls below the unigram baseline of the same tokenizer.
    assert res["final_val_loss"] < res["unigram_val_loss"]
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 81))
    assert np.mean([losses[s] for s in range(71, 81)]) < np.mean([losses[s] for s in range(1, 11)]) - 0.5
    vals = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in vals] == [40, 80]
    for r in vals:  # the health signal: embedding and per-block residual-stream RMS at every evaluation
        assert r["embed_rms"] > 0 and len(r["block_rms"]) == 2
        assert r["max_block_rms_ratio"] == pytest.approx(max(r["block_rms"]) / r["embed_rms"])
    # Same config and seed: identical losses.
    train(_cfg(small_overrides, tmp_path / "b", "steps=80", "eval_every=40"), log=lambda *_: None)
    assert _losses(tmp_path / "b") == losses
    # A different seed changes them.
    train(_cfg(small_overrides, tmp_path / "c", "steps=80", "seed=1"), log=lambda *_: None)
    assert _losses(tmp_path / "c") != losses


def test_only_the_primary_process_writes_run_files(small_overrides, tmp_path, monkeypatch):
    """A non-primary process of a multi-host run trains and checkpoints but writes no records or logs."""
    from lowrank_jax.train import loop

    monkeypatch.setattr(loop, "is_primary", lambda: False)
    logged = []
    res = train(_cfg(small_overrides, tmp_path / "w1", "steps=4"), log=logged.append)
    out = tmp_path / "w1"
    assert math.isfinite(res["final_val_loss"]) and res["steps"] == 4
    assert logged == []
    assert not any((out / name).exists() for name in ("results.json", "metrics.jsonl", "loss.png", "config.json"))
    assert checkpoint_steps(out / "checkpoints") == [4]


def _cli_cmd(small_overrides, out_dir, *extra):
    return [
        sys.executable,
        "-m",
        "lowrank_jax.train.cli",
        "train",
        "tiny",
        *small_overrides,
        f"out_dir={out_dir}",
        *extra,
    ]


@pytest.mark.slow  # 40 s; the SIGTERM and gs:// kill-and-resume tests resume bitwise too
def test_exact_resume_after_sigkill(small_overrides, tmp_path):
    """Kill a run with SIGKILL after a checkpoint, resume it: losses after the resume point are bitwise equal."""
    args = ["steps=300", "checkpoint_every=40", "keep_checkpoints=3", "log_every=1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ref = tmp_path / "ref"
    subprocess.run(_cli_cmd(small_overrides, ref, *args), check=True, env=env, cwd=tmp_path, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli_cmd(small_overrides, killed, *args),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint_steps(killed / "checkpoints"):
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed")
        time.sleep(0.05)
    # Let it run on past the checkpoint, then kill it without warning.
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = checkpoint_steps(killed / "checkpoints")
    assert steps and max(steps) < 300, steps
    logged_before = max(_losses(killed))
    resumed = subprocess.run(
        _cli_cmd(small_overrides, killed, *args, "resume=true"), env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout
    resume_step = int(resumed.stdout.split("resumed from step ")[1].split()[0])
    assert resume_step in steps and resume_step < 300
    got, want = _losses(killed), _losses(ref)
    assert sorted(got) == list(range(1, 301))
    after = [s for s in want if s > resume_step]
    assert after and all(got[s] == want[s] for s in after), "losses after the resume point differ"
    assert logged_before >= resume_step  # the killed run had logged past its checkpoint, and those lines were redone


@pytest.mark.slow  # 14 s on 2 cores
def test_damaged_latest_checkpoint_falls_back(small_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _cfg(small_overrides, out, "steps=20", "checkpoint_every=10")
    train(cfg, log=lambda *_: None)
    assert checkpoint_steps(out / "checkpoints") == [10, 20]
    # Damage every data file of the newest checkpoint.
    for f in (out / "checkpoints" / "20").rglob("*"):
        if f.is_file() and "meta" not in str(f.relative_to(out / "checkpoints" / "20")):
            f.write_bytes(b"garbage")
    trainer = make_trainer(replace(cfg, model__vocab_size=512))
    state, meta = Checkpointer(out / "checkpoints", keep=2).restore_latest(trainer.abstract_state)
    assert int(state.step) == 10 and meta["step"] == 10
    assert "unreadable" in capsys.readouterr().err
    # And the CLI resumes from the older one to finish the run.
    cfg2 = replace(cfg, steps=25, resume=True)
    res = train(cfg2, log=lambda *_: None)
    assert res["steps_this_run"] == 15


def test_non_finite_step_is_skipped(small_overrides, tmp_path):
    cfg = replace(_cfg(small_overrides, tmp_path), model__vocab_size=512)
    trainer = make_trainer(cfg)
    state = trainer.init_state()
    batch = trainer.put_batch(np.random.default_rng(0).integers(0, 512, (8, 33)))
    state, m = trainer.train_step(state, batch)
    assert int(m["skipped"]) == 0
    before = jax.device_get(state)
    poisoned = state._replace(params=jax.tree.map(lambda x: x, state.params))
    poisoned.params["final_norm"]["scale"] = poisoned.params["final_norm"]["scale"].at[0].set(jnp.nan)
    poisoned_host = jax.device_get(poisoned)
    new, m = trainer.train_step(poisoned, batch)
    assert int(m["skipped"]) == 1 and int(new.skipped) == 1 and int(new.step) == 2
    # Params and optimizer state are left exactly as they were.
    for a, b in zip(jax.tree.leaves(jax.device_get(new.params)), jax.tree.leaves(poisoned_host.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(jax.device_get(new.opt_state)), jax.tree.leaves(before.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # 13 s on 2 cores
def test_grad_accumulation_matches_full_batch(small_overrides, tmp_path):
    base = replace(_cfg(small_overrides, tmp_path), model__vocab_size=512)
    batch = np.random.default_rng(1).integers(0, 512, (8, 33))
    results = []
    for accum in (1, 4):
        trainer = make_trainer(replace(base, grad_accum=accum))
        state = trainer.init_state()
        for _ in range(3):
            state, m = trainer.train_step(state, trainer.put_batch(batch))
        results.append((float(m["loss"]), jax.device_get(state.params)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_schedule_is_warmup_then_cosine_to_ten_percent(small_overrides, tmp_path):
    cfg = _cfg(small_overrides, tmp_path, "steps=1000", "optim.lr=0.01")
    s = make_schedule(cfg)
    assert float(s(0)) == 0.0
    assert float(s(50)) == pytest.approx(0.005)
    assert float(s(100)) == pytest.approx(0.01)
    mid = 100 + 450
    assert float(s(mid)) == pytest.approx(0.001 + 0.009 * 0.5, rel=1e-4)
    assert float(s(1000)) == pytest.approx(0.001)


def test_out_dir_with_checkpoints_needs_resume(small_overrides, tmp_path):
    out = tmp_path / "x"
    train(_cfg(small_overrides, out, "steps=5"), log=lambda *_: None)
    from lowrank_jax.config import ConfigError

    with pytest.raises(ConfigError, match="resume=true"):
        train(_cfg(small_overrides, out, "steps=5"), log=lambda *_: None)
    shutil.rmtree(out)
