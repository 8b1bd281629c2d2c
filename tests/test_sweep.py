"""The comparison harness (experiments/sweep.py): recipes, best of grid, resume, staleness, the table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_jax.config import ConfigError, load_config
from lowrank_jax.train.optimizer import lr_groups
from lowrank_jax.train.relora import warm_start_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TOY = ["model.layers=1", "model.hidden=32", "model.ffn=64", "batch_size=2", "seq_len=16", "model.max_seq_len=16"]
TOY += ["eval_tokens=256", "eval_every=0", "data.source=pydoc", "data.vocab_size=512"]
TOY += ["data.tokenizer_train_chars=200000"]


@pytest.fixture()
def sweep(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import sweep

    return sweep


def test_every_recipe_follows_the_protocol_and_builds(sweep):
    """The shipped recipes: the same grid size, log-spaced, and every run's config is valid."""
    protocol = sweep.load_protocol(sweep.RECIPES / "protocol.yaml")
    assert protocol.grid_size >= 4 and protocol.long_steps >= 4 * protocol.short_steps and len(protocol.seeds) >= 3
    names = sweep.recipe_names()
    assert {"adamw", "frozen_blocks", "galore", "galore8bit", "lora", "lowrank", "relora", "relora_warm"} <= set(names)
    assert {"sl", "sl_d005", "bitlinear", "apollo", "apollo_mini", "fira", "golore", "relora_warm_split"} <= set(names)
    recipes = {n: sweep.load_recipe(sweep.RECIPES / f"{n}.yaml", protocol) for n in names}
    s = sweep.Sweep(protocol, recipes, [], Path("unused"), Path("unused"))
    for r in recipes.values():
        runs = s.grid(r) if not r.lr_from else [sweep.Run(r, "long", 1e-3, 0)]
        for run in [*runs, sweep.Run(r, "long", runs[0].lr, 1)]:
            cfg = load_config(protocol.preset, sweep.run_overrides(run, protocol, []))
            assert cfg.optim.eps == 1e-6 and cfg.optim.grad_clip == 1.0 and cfg.optim.lr_embed == 0.01
            assert cfg.steps == (protocol.short_steps if run.stage == "short" else protocol.long_steps)
    relora = sweep.Run(recipes["relora_warm"], "long", 1e-3, 0)
    cfg = load_config(protocol.preset, sweep.run_overrides(relora, protocol, []))
    assert cfg.relora.warm_start == 4 * 50 and cfg.relora.every == 4 * 50  # step-valued settings scale
    for run in s.grid(recipes["relora_warm_split"]):  # the full-rank phase stays at 1e-3 whatever the grid lr
        groups = lr_groups(warm_start_config(load_config(protocol.preset, sweep.run_overrides(run, protocol, []))))
        assert groups["blocks"] == 1e-3 and groups["factors"] == run.lr, (run.lr, groups)


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    return folder / f"{name}.yaml"


PROTOCOL = """preset: tiny
grid_size: 2
short_steps: 2
long_steps: 4
grid_seed: 0
seeds: [0, 1]
baseline: base
overrides: {optim.eps: 1.0e-6, optim.lr_embed: 0.01}
"""


@pytest.mark.parametrize(
    "body,message",
    [
        ("description: x\noverrides: {}\nlrs: [1.0e-3, 2.0e-3, 3.0e-3]\n", "grid_size is 2"),
        ("description: x\noverrides: {}\nlrs: [1.0e-3, 1.0e-3]\n", "log-spaced"),
        ("description: x\noverrides: {optim.lr: 0.1}\nlrs: [1.0e-3, 2.0e-3]\n", "optim.lr comes from the grid"),
        ("description: x\noverrides: {}\nlrs: [1.0e-3, 2.0e-3]\nlr_from: y\n", "exclude each other"),
        ("description: x\noverrides: {a: 1.5}\nscale_with_steps: [a]\nlrs: [1.0e-3, 2.0e-3]\n", "not an integer"),
        ("overrides: {}\nlrs: [1.0e-3, 2.0e-3]\n", "missing keys \\['description'\\]"),
    ],
)
def test_a_bad_recipe_is_one_line(sweep, tmp_path, body, message):
    protocol = sweep.load_protocol(_write(tmp_path, "protocol", PROTOCOL))
    with pytest.raises(ConfigError, match=message):
        sweep.load_recipe(_write(tmp_path, "bad", body), protocol)


class FakeTrain:
    """Stands in for ``train``: a loss per learning rate (best at 2e-3), results.json-shaped output."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int, int]] = []

    def __call__(self, cfg):
        self.calls.append((cfg.optim.lr, cfg.seed, cfg.steps))
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text(json.dumps({"step": cfg.steps, "max_block_rms_ratio": 3.0}) + "\n")
        from lowrank_jax.config import to_dict

        shape = getattr(self, "loss_at", lambda lr: abs(math.log(lr / 2e-3)))
        loss = 5.0 + shape(cfg.optim.lr) + 0.01 * cfg.seed - 0.1 * (cfg.steps > 2)
        loss += 0.5 * (cfg.optim.name != "adamw")
        return {
            "final_val_loss": loss,
            "config": to_dict(cfg),
            "git_commit": "c0ffee00" * 5,
            "trainable_params": 1000,
            "optimizer_state_bytes": 8000,
        }


def _fake_sweep(sweep, tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    _write(folder, "protocol", PROTOCOL)
    _write(folder, "base", "description: base\noverrides: {optim.name: adamw}\nlrs: [1.0e-3, 2.0e-3]\n")
    _write(folder, "other", "description: o\noverrides: {optim.name: adamw8bit}\nlr_from: base\n")
    fake = FakeTrain()
    monkeypatch.setattr(sweep, "train", fake)
    monkeypatch.setattr(sweep, "_dirty", lambda paths: False)
    changed = {"value": False}
    monkeypatch.setattr(sweep, "_changed_since", lambda commit, paths: changed["value"])
    argv = ["all", "--recipes-dir", str(folder), "--results", str(tmp_path / "res"), "--runs", str(tmp_path / "runs")]
    return fake, changed, argv


def test_best_of_grid_then_seeds_resume_and_staleness(sweep, tmp_path, monkeypatch, capsys):
    fake, changed, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    assert sweep.main(argv) == 0
    # base's grid (2 lrs, seed 0, 2 steps); its best (2e-3) is the top edge, so the edge rule adds 4e-3, which is
    # worse; then base's and other's winners (2e-3) at 4 steps with seeds 0, 1
    grid = [(1e-3, 0, 2), (2e-3, 0, 2), (4e-3, 0, 2)]
    assert fake.calls == [*grid, (2e-3, 0, 4), (2e-3, 1, 4), (2e-3, 0, 4), (2e-3, 1, 4)]
    res = json.loads((tmp_path / "res" / "results.json").read_text())["recipes"]
    assert res["base"]["chosen_lr"] == res["other"]["chosen_lr"] == 2e-3
    assert res["base"]["long_ppl"] == pytest.approx([math.exp(4.9), math.exp(4.91)])
    assert res["base"]["max_block_rms_ratio"] == 3.0 and not res["base"]["stale"]
    table = (tmp_path / "res" / "table.md").read_text()
    assert "| base | 0.001, 0.002, 0.004 | 0.002 |" in table and "| other | from base | 0.002 |" in table
    mean = lambda losses: sum(map(math.exp, losses)) / len(losses)
    assert f"| {mean([5.4, 5.41]) / mean([4.9, 4.91]):.3f} | 3.0 |" in table  # other's long ppl over base's

    fake.calls.clear()
    assert sweep.main(argv) == 0  # everything on record: nothing trains
    assert fake.calls == [] and "on record" in capsys.readouterr().out

    killed = tmp_path / "res" / "base" / "long" / "lr0.002_seed1" / "results.json"
    killed.unlink()  # a run killed before it finished has no results.json
    assert sweep.main([*argv, "--table-only"]) == 0
    out = capsys.readouterr().out
    assert "1 runs pending" in out and "STALE" not in out  # missing is pending, not stale
    assert sweep.main(argv) == 0
    assert fake.calls == [(2e-3, 1, 4)]

    fake.calls.clear()
    changed["value"] = True  # the code changed since the runs' commit: every row is stale
    assert sweep.main([*argv, "--table-only"]) == 0
    assert fake.calls == [] and "STALE: code or recipe changed since c0ffee00" in capsys.readouterr().out
    assert sweep.main(argv) == 0
    assert len(fake.calls) == 7  # and the harness re-runs them


def test_the_edge_rule_stops_after_three_steps_per_side(sweep, tmp_path, monkeypatch):
    fake, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    monkeypatch.setattr(fake, "loss_at", lambda lr: -math.log(lr), raising=False)  # always better at a higher lr
    _write(tmp_path / "recipes", "base", "description: b\noverrides: {optim.name: adamw}\nlrs: [1.0e-3, 2.0e-3]\n")
    assert sweep.main([*argv[:1], "--stage", "short", *argv[1:]]) == 0
    assert [lr for lr, _, _ in fake.calls] == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3, 16e-3])


def test_a_changed_recipe_makes_its_runs_stale(sweep, tmp_path, monkeypatch, capsys):
    fake, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    assert sweep.main(argv) == 0
    _write(
        tmp_path / "recipes",
        "base",
        "description: b\noverrides: {optim.name: adamw, optim.b2: 0.95}\nlrs: [1.0e-3, 2.0e-3]\n",
    )
    fake.calls.clear()
    assert sweep.main([*argv, "--table-only"]) == 0
    assert "its config differs from the recipe's" in capsys.readouterr().out


def test_runs_refuse_uncommitted_code(sweep, tmp_path, monkeypatch, capsys):
    _, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    monkeypatch.setattr(sweep, "_dirty", lambda paths: True)
    assert sweep.main(argv) == 2
    assert "uncommitted changes" in capsys.readouterr().err


def test_an_unknown_commit_is_stale(sweep):
    assert sweep._changed_since("0" * 40, list(sweep.CODE_PATHS))
    assert not sweep._changed_since("HEAD", list(sweep.CODE_PATHS))


def test_one_real_run_is_filed_with_its_command(sweep, tmp_path, monkeypatch, data_cache):
    folder = tmp_path / "recipes"
    _write(folder, "protocol", PROTOCOL.replace("grid_size: 2", "grid_size: 1").replace("seeds: [0, 1]", "seeds: [0]"))
    _write(folder, "base", "description: base\noverrides: {optim.name: adamw}\nlrs: [3.0e-3]\n")
    monkeypatch.setattr(sweep, "_dirty", lambda paths: False)
    sets = [f"--set={o}" for o in [*TOY, f"data.cache_dir={data_cache}"]]
    argv = ["base", "--recipes-dir", str(folder), "--results", str(tmp_path / "res"), "--runs", str(tmp_path / "runs")]
    assert sweep.main([*argv, *sets, "--stage", "short"]) == 0
    run = tmp_path / "res" / "base" / "short" / "lr0.003_seed0"
    res = json.loads((run / "results.json").read_text())
    assert res["config"]["optim"]["lr_embed"] == 0.01 and res["lr_groups"]["blocks"]["lr"] == 3e-3
    meta = json.loads((run / "sweep.json").read_text())
    assert meta["command"].startswith("lowrank-jax train tiny optim.eps=1e-06 optim.lr_embed=0.01 optim.name=adamw")
    assert any("max_block_rms_ratio" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    # the files it ran: the modules training imported and the presets, not the whole package
    assert {
        "lowrank_jax/train/loop.py",
        "lowrank_jax/optim/__init__.py",
        "lowrank_jax/config/presets/tiny.yaml",
    } <= set(meta["code_files"])
    # this worker may have imported more (other test modules); the harness's own process has not
    here = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, 'experiments'); import sweep; print(sweep.code_files())",
        ],
        cwd=sweep.ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "lowrank_jax/data/shards.py" in here and "lowrank_jax/train/launch.py" not in here
    assert all((sweep.ROOT / f).is_file() for f in meta["code_files"])
    seen = []
    monkeypatch.setattr(sweep, "_changed_since", lambda commit, paths: seen.append(paths) or True)
    assert sweep.main([*argv, *sets, "--stage", "short", "--table-only"]) == 0  # stale: judged on those files
    assert seen[0][: len(meta["code_files"])] == meta["code_files"] and "experiments/sweep.py" in seen[0]
    assert sweep.main([*argv, *sets, "--stage", "short"]) == 0  # stale: redone over its old out dir
    assert sweep.main([*argv, *sets, "--stage", "short"]) == 0


def test_lock_is_held_while_each_run_trains(sweep, tmp_path, monkeypatch):
    import fcntl  # noqa: PLC0415

    fake, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    lock = tmp_path / "heavy.lock"
    held = []

    def locked_train(cfg):
        with open(lock) as f:  # a second open file description: a flock on it fails while the sweep holds one
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return fake(cfg)

    monkeypatch.setattr(sweep, "train", locked_train)
    assert sweep.main([*argv, "--stage", "short", "--lock", str(lock)]) == 0
    assert held and all(held)
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after the sweep
