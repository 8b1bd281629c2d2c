"""The comparison harness (experiments/sweep.py): recipes, best of grid, resume, packed records, canaries and
staleness, the table."""

from __future__ import annotations

import json
import lzma
import math
from pathlib import Path

import numpy as np
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
canary_steps: 2
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


def _fake_loss(cfg, step: int | None = None, shape=lambda lr: abs(math.log(lr / 2e-3))) -> float:
    """The fake runs' validation loss, or their training loss at ``step`` (1-based): a function of the config."""
    loss = 5.0 + shape(cfg.optim.lr) + 0.01 * cfg.seed - 0.1 * (cfg.steps > 2) + 0.5 * (cfg.optim.name != "adamw")
    return loss + (1.0 / step if step else 0.0)


class FakeTrain:
    """Stands in for ``train``: a loss per learning rate (best at 2e-3), results.json-shaped output and a
    training loss at every step in metrics.jsonl."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int, int]] = []

    def __call__(self, cfg):
        self.calls.append((cfg.optim.lr, cfg.seed, cfg.steps))
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shape = getattr(self, "loss_at", lambda lr: abs(math.log(lr / 2e-3)))
        lines = [{"step": s, "loss": _fake_loss(cfg, s, shape)} for s in range(1, cfg.steps + 1)]
        lines.append({"step": cfg.steps, "max_block_rms_ratio": 3.0})
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        from lowrank_jax.config import to_dict

        return {
            "final_val_loss": _fake_loss(cfg, None, shape),
            "config": to_dict(cfg),
            "git_commit": "c0ffee00" * 5,
            "trainable_params": 1000,
            "optimizer_state_bytes": 8000,
        }


class FakeRunner:
    """Stands in for the canary runner: the fake runs' first losses, plus ``shift`` from ``from_step`` on."""

    shift, from_step = 0.0, 1

    def __init__(self, log=None) -> None:
        pass

    def losses(self, cfg, steps):
        return [
            _fake_loss(cfg, s) + (FakeRunner.shift if s >= FakeRunner.from_step else 0.0) for s in range(1, steps + 1)
        ]


MACHINE = {"cpu": "Fake CPU", "cpu_flags": "0123456789ab", "cpu_count": 2, "platform": "Linux-x86_64"}


def _fake_sweep(sweep, tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    _write(folder, "protocol", PROTOCOL)
    _write(folder, "base", "description: base\noverrides: {optim.name: adamw}\nlrs: [1.0e-3, 2.0e-3]\n")
    _write(folder, "other", "description: o\noverrides: {optim.name: adamw8bit}\nlr_from: base\n")
    fake = FakeTrain()
    monkeypatch.setattr(sweep, "train", fake)
    monkeypatch.setattr(sweep, "_dirty", lambda paths: False)
    monkeypatch.setattr(sweep.canary_lib, "Runner", FakeRunner)
    monkeypatch.setattr(FakeRunner, "shift", 0.0)
    monkeypatch.setattr(FakeRunner, "from_step", 1)
    machine = dict(MACHINE)
    monkeypatch.setattr(sweep.canary_lib, "fingerprint", lambda: dict(machine))
    monkeypatch.setattr(sweep, "git_commit", lambda: "abcdef12" * 5)
    argv = ["all", "--recipes-dir", str(folder), "--results", str(tmp_path / "res"), "--runs", str(tmp_path / "runs")]
    return fake, machine, argv


def test_best_of_grid_then_seeds_resume_and_staleness(sweep, tmp_path, monkeypatch, capsys):
    records = sweep.records
    fake, machine, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
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
    assert f"| {mean([5.4, 5.41]) / mean([4.9, 4.91]):.3f} | +0.5000 ± 0.0000 |" in table  # other's over base's

    fake.calls.clear()
    assert sweep.main(argv) == 0  # everything on record: nothing trains
    assert fake.calls == [] and "on record" in capsys.readouterr().out

    pack = tmp_path / "res" / "runs" / "base.json.xz"
    kept = records.read_pack(pack)
    del kept["long/lr0.002_seed1"]  # a run killed before it finished is not in its recipe's pack
    records.write_pack(pack, kept)
    assert sweep.main([*argv, "--table-only"]) == 0
    out = capsys.readouterr().out
    assert "1 runs pending" in out and "STALE" not in out  # missing is pending, not stale
    assert sweep.main(argv) == 0
    assert fake.calls == [(2e-3, 1, 4)]

    # each recipe's canary: the first canary_steps losses of its first stage's seed-0 run at the chosen lr
    canaries = json.loads((tmp_path / "res" / "canaries.json").read_text())
    assert canaries["base"]["run"] == "short/lr0.002_seed0" and canaries["other"]["run"] == "long/lr0.002_seed0"
    rec = records.run_record(tmp_path / "res", "base", "short/lr0.002_seed0")
    assert canaries["base"]["losses"] == [m["loss"] for m in rec["metrics"] if "loss" in m][:2]
    assert canaries["base"]["commit"] == "c0ffee00" * 5 and canaries["base"]["machine"] == MACHINE

    fake.calls.clear()
    assert sweep.main(["--check", *argv[1:]]) == 0  # the library reproduces every canary: no row is stale
    out = capsys.readouterr().out
    assert "base: bitwise on this machine" in out and "STALE" not in out and fake.calls == []
    check = json.loads((tmp_path / "res" / "canaries.json").read_text())["base"]["check"]
    assert check["verdict"] == "bitwise" and check["commit"] == "abcdef12" * 5 and check["max_abs_diff"] == 0.0

    FakeRunner.shift, FakeRunner.from_step = 1e-7, 2  # the same machine computes something else from step 2 on
    assert sweep.main(["--check", *argv[1:]]) == 1
    out = capsys.readouterr().out
    assert "base: differs on this machine, max abs diff 1e-07, first at step 2" in out
    assert "| base | 0.001, 0.002 | - |" in out and "STALE: canary differs from step 2 at abcdef12" in out
    table = (tmp_path / "res" / "table.md").read_text()
    assert table.count("STALE: canary differs from step 2 at abcdef12") == 2
    check = json.loads((tmp_path / "res" / "canaries.json").read_text())["base"]["check"]
    assert check["first_differing_step"] == 2 and check["verdict"] == "differs"
    assert sweep.main([*argv, "--table-only"]) == 0 and fake.calls == []
    assert "STALE: canary differs" in capsys.readouterr().out
    assert sweep.main(argv) == 0
    assert len(fake.calls) == 7  # the harness re-runs them, and records the canaries from the new runs
    canaries = json.loads((tmp_path / "res" / "canaries.json").read_text())
    assert "check" not in canaries["base"] and "check" not in canaries["other"]
    assert "STALE" not in (tmp_path / "res" / "table.md").read_text()


def test_a_canary_on_another_machine_is_judged_within_the_tolerance(sweep, tmp_path, monkeypatch, capsys):
    fake, machine, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    assert sweep.main(argv) == 0
    machine["cpu"] = "Another CPU"  # other code from XLA: rounding differs, a little
    FakeRunner.shift = 0.5 * sweep.canary_lib.TOLERANCE
    assert sweep.main(["--check", *argv[1:]]) == 0
    out = capsys.readouterr().out
    assert "base: within tolerance on another machine" in out and "STALE" not in out
    check = json.loads((tmp_path / "res" / "canaries.json").read_text())["base"]["check"]
    assert check["verdict"] == "within tolerance" and not check["same_machine"] and check["first_differing_step"] == 1
    FakeRunner.shift = 2 * sweep.canary_lib.TOLERANCE  # beyond what another CPU explains
    assert sweep.main(["--check", *argv[1:]]) == 1
    assert "base: differs on another machine" in capsys.readouterr().out
    assert "STALE: canary differs from step 1" in (tmp_path / "res" / "table.md").read_text()


def test_canary_comparison(sweep):
    compare = sweep.canary_lib.compare
    assert compare([1.0, 2.0], [1.0, 2.0], same_machine=True).kind == "bitwise"
    v = compare([1.0, 2.0], [1.0, 2.0 + 1e-9], same_machine=True)
    assert (v.kind, v.first_differing_step, v.passed) == ("differs", 2, False)
    assert compare([1.0, 2.0], [1.0, 2.0 + 1e-9], same_machine=False).kind == "within tolerance"
    assert not compare([1.0, 2.0], [1.0], same_machine=False).passed  # a canary that stopped early
    assert not compare([1.0, 2.0], [1.0, math.nan], same_machine=False).passed
    assert compare([1.0], [1.0 + 1e-9], same_machine=False).to_dict()["tolerance"] == sweep.canary_lib.TOLERANCE
    fp = sweep.canary_lib.fingerprint()
    assert set(fp) == {"cpu", "cpu_flags", "cpu_count", "platform", "jax", "jaxlib"} and len(fp["cpu_flags"]) == 12


def test_runs_without_a_canary_fail_the_check(sweep, tmp_path, monkeypatch, capsys):
    fake, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    assert sweep.main(argv) == 0
    (tmp_path / "res" / "canaries.json").unlink()
    assert sweep.main([*argv, "--table-only"]) == 0 and "STALE" not in capsys.readouterr().out
    assert sweep.main(["--check", *argv[1:]]) == 1
    assert "base: runs on record but no canary" in capsys.readouterr().out
    assert sweep.main(["--record-canaries", *argv]) == 0  # with the runner, checked against the runs
    out = capsys.readouterr().out
    assert "base: recorded from short/lr0.002_seed0" in out and "against the run: bitwise" in out
    assert json.loads((tmp_path / "res" / "canaries.json").read_text())["base"]["commit"] == "abcdef12" * 5


def test_the_table_from_packed_records(sweep, tmp_path, monkeypatch):
    records = sweep.records
    """The table is a function of the packs alone: fake records filed without training give the rows."""
    _, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    monkeypatch.setattr(sweep, "train", lambda cfg: pytest.fail("nothing trains"))
    protocol = sweep.load_protocol(tmp_path / "recipes" / "protocol.yaml")
    base = sweep.load_recipe(tmp_path / "recipes" / "base.yaml", protocol)
    results = tmp_path / "res"
    for stage, lr, seed, loss in [("short", 1e-3, 0, 3.5), ("short", 2e-3, 0, 4.0), ("long", 1e-3, 0, 3.0)]:
        run = sweep.Run(base, stage, lr, seed)
        meta = {"config": sweep._requested(run, protocol, []), "commit": "f" * 40, "dirty": False, "command": "x"}
        res = {"final_val_loss": loss, "git_commit": "f" * 40, "trainable_params": 2e6, "optimizer_state_bytes": 2**21}
        records.put_run(
            results, "base", run.key, {"results": res, "metrics": [{"max_block_rms_ratio": 2.5}], "meta": meta}
        )
    assert records.runs(results, "base") == ["long/lr0.001_seed0", "short/lr0.001_seed0", "short/lr0.002_seed0"]
    # the grid's best is its lower edge: the edge rule asks for 5e-4, and the long runs wait for it
    assert sweep.main(["base", *argv[1:], "--table-only"]) == 0
    table = (results / "table.md").read_text()
    assert "| base | 0.0005, 0.001, 0.002 |" + " - |" * 13 + " ffffffff, 1 runs pending |" in table
    run = sweep.Run(base, "short", 5e-4, 0)
    meta = {"config": sweep._requested(run, protocol, []), "commit": "e" * 40}
    res = {"final_val_loss": 3.8, "git_commit": "e" * 40, "trainable_params": 2e6, "optimizer_state_bytes": 2**21}
    records.put_run(results, "base", run.key, {"results": res, "metrics": [], "meta": meta})
    assert sweep.main(["base", *argv[1:], "--table-only", "--stage", "short"]) == 0
    row = next(line for line in (results / "table.md").read_text().splitlines() if line.startswith("| base |"))
    assert row == (
        f"| base | 0.0005, 0.001, 0.002 | 0.001 | {math.exp(3.5):.2f} | - | - | 2.00M | 2.00 MiB |"
        + " - |" * 6
        + " 2.5 | eeeeeeee, ffffffff |"
    )


def test_packs_are_deterministic_and_round_trip(sweep, tmp_path):
    records = sweep.records
    a = {"b": {"x": [1.5, math.nan, -math.inf, 0.1 + 0.2]}, "a": {"results": {"y": "ü"}, "metrics": [], "meta": {}}}
    b = dict(reversed(list(a.items())))
    assert records.encode(a) == records.encode(b)  # key order does not matter: same records, same bytes
    path = records.write_pack(tmp_path / "p" / "x.json.xz", a)
    back = records.read_pack(path)
    assert back["b"]["x"][3] == 0.1 + 0.2 and math.isnan(back["b"]["x"][1]) and back["a"] == a["a"]
    before = path.stat().st_mtime_ns
    records.write_pack(path, b)  # unchanged records: the file is left alone
    assert path.stat().st_mtime_ns == before and path.read_bytes() == records.encode(a)
    records.put(path, "c", {"z": 1})
    assert sorted(records.read_pack(path)) == ["a", "b", "c"] and records.read_pack(tmp_path / "none.json.xz") == {}
    with pytest.raises(ValueError, match="meta"):
        records.put_run(tmp_path, "r", "short/x", {"results": {}, "metrics": []})
    records.put_run(tmp_path, "r", "short/x", {"results": {"v": 1}, "metrics": [{"step": 1}], "meta": {}})
    assert records.runs(tmp_path, "r") == ["short/x"] and records.run_record(tmp_path, "r", "long/x") is None
    assert records.run_record(tmp_path, "r", "short/x")["metrics"] == [{"step": 1}]
    assert (tmp_path / "runs" / "r.json.xz").is_file()


def test_float32_metrics_are_packed_short_and_read_back_exactly(rng, sweep):
    """Metrics that are float32 values are written in float32's shortest text and read back bit for bit;
    float64 values (a validation loss, a perplexity) and non-finite ones keep their full text."""
    records = sweep.records
    losses = [float(np.float32(x)) for x in rng.uniform(2.0, 9.0, 40)]
    metrics = [{"step": i + 1, "loss": v, "lr": float(np.float32(1e-3 * (i + 1) / 40))} for i, v in enumerate(losses)]
    metrics.append({"step": 40, "val_loss": float(rng.uniform(3.0, 4.0)), "loss": math.nan})
    run = {"results": {"final": float(rng.uniform())}, "metrics": metrics, "meta": {}}
    data = records.encode({"short/x": run})
    back = records.decode(data)["short/x"]
    assert json.dumps(back, sort_keys=True) == json.dumps(run, sort_keys=True)  # every float exactly (repr)
    assert set(back) == {"results", "metrics", "meta"}
    text = lzma.decompress(data).decode()
    assert '"metrics_float32":["lr"]' in text  # loss holds a NaN: kept in full, like val_loss
    assert str(np.float32(metrics[5]["lr"])) in text and repr(metrics[5]["lr"]) not in text
    assert repr(metrics[-1]["val_loss"]) in text
    packed = records.encode({"short/x": {**run, "metrics": metrics[:-1]}})
    assert '"metrics_float32":["loss","lr"]' in lzma.decompress(packed).decode()
    assert records.decode(packed)["short/x"]["metrics"] == metrics[:-1]


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


@pytest.mark.slow  # 26 s on 2 cores
def test_one_real_run_is_filed_with_its_command_and_its_canary_repeats(sweep, tmp_path, monkeypatch, data_cache):
    records = sweep.records
    folder = tmp_path / "recipes"
    _write(folder, "protocol", PROTOCOL.replace("grid_size: 2", "grid_size: 1").replace("seeds: [0, 1]", "seeds: [0]"))
    _write(folder, "base", "description: base\noverrides: {optim.name: adamw}\nlrs: [3.0e-3]\n")
    monkeypatch.setattr(sweep, "_dirty", lambda paths: False)
    sets = [f"--set={o}" for o in [*TOY, f"data.cache_dir={data_cache}"]]
    argv = ["base", "--recipes-dir", str(folder), "--results", str(tmp_path / "res"), "--runs", str(tmp_path / "runs")]
    assert sweep.main([*argv, *sets, "--stage", "short"]) == 0
    rec = records.run_record(tmp_path / "res", "base", "short/lr0.003_seed0")
    res = rec["results"]
    assert res["config"]["optim"]["lr_embed"] == 0.01 and res["lr_groups"]["blocks"]["lr"] == 3e-3
    meta = rec["meta"]
    assert meta["command"].startswith("lowrank-jax train tiny optim.eps=1e-06 optim.lr_embed=0.01 optim.name=adamw")
    assert any("max_block_rms_ratio" in m for m in rec["metrics"])
    canary = json.loads((tmp_path / "res" / "canaries.json").read_text())["base"]
    assert canary["losses"] == [m["loss"] for m in rec["metrics"] if "loss" in m][:2]
    # the canary runner trains those steps again, in this process, without train(): bit for bit
    assert sweep.main(["--check", *argv, *sets]) == 0
    check = json.loads((tmp_path / "res" / "canaries.json").read_text())["base"]["check"]
    assert check["verdict"] == "bitwise" and check["same_machine"]
    assert sweep.main([*argv, *sets, "--stage", "short", "--set=optim.b2=0.9"]) == 0  # another config: redone
    assert sweep.main([*argv, *sets, "--stage", "short"]) == 0


def test_lock_is_held_while_each_run_trains(sweep, tmp_path, monkeypatch):
    import fcntl

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


def _t975_df2() -> float:
    """Student's t 0.975 quantile for 2 degrees of freedom, in closed form: F(t) = 1/2 + t / (2 sqrt(t^2 + 2))."""
    return 0.95 * math.sqrt(2.0 / (1.0 - 0.95**2))


def test_paired_statistics_and_goals_from_packed_records(sweep, tmp_path, monkeypatch):
    """The paired columns of a known small record, against the hand computation: the method's final losses
    (3.05, 3.03, 3.10) against the baseline's (3.00, 3.01, 3.02) over seeds 0-2 give d = (0.05, 0.02, 0.08),
    mean 0.05, sd 0.03, 95% CI 0.05 -+ t(0.975, 2) 0.03 / sqrt(3) and p = 1 - t / sqrt(t^2 + 2) at t = 2.887."""
    records = sweep.records
    _, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    monkeypatch.setattr(sweep, "train", lambda cfg: pytest.fail("nothing trains"))
    folder = tmp_path / "recipes"
    protocol_text = PROTOCOL.replace("seeds: [0, 1]", "seeds: [0, 1, 2]") + "goals: {other: 1.1, base: 1.01}\n"
    protocol = sweep.load_protocol(_write(folder, "protocol", protocol_text))
    base, other = (sweep.load_recipe(folder / f"{n}.yaml", protocol) for n in ("base", "other"))
    results = tmp_path / "res"
    runs = [(base, "short", 1e-3, 0, 3.5), (base, "short", 2e-3, 0, 4.0), (base, "short", 5e-4, 0, 3.9)]
    runs += [(base, "long", 1e-3, s, v) for s, v in enumerate([3.00, 3.01, 3.02])]
    runs += [(other, "long", 1e-3, s, v) for s, v in enumerate([3.05, 3.03, 3.10])]
    for recipe, stage, lr, seed, loss in runs:
        run = sweep.Run(recipe, stage, lr, seed)
        meta = {"config": sweep._requested(run, protocol, []), "commit": "f" * 40}
        res = {"final_val_loss": loss, "git_commit": "f" * 40, "trainable_params": 2e6, "optimizer_state_bytes": 2**21}
        res |= {"config": {"seed": seed, "eval_tokens": 32768}, "data_digest": "abc"}
        records.put_run(results, recipe.name, run.key, {"results": res, "metrics": [], "meta": meta})
    assert sweep.main([*argv, "--table-only"]) == 0
    recs = json.loads((results / "results.json").read_text())["recipes"]
    se = 0.03 / math.sqrt(3.0)
    half = _t975_df2() * se
    p_value = 1.0 - (0.05 / se) / math.sqrt((0.05 / se) ** 2 + 2.0)
    paired = recs["other"]["paired"]
    assert paired["n"] == 3 and paired["pairs"] == [[s, 32768, "abc"] for s in range(3)]
    assert paired["mean_diff"] == pytest.approx(0.05) and paired["sd_diff"] == pytest.approx(0.03)
    assert paired["ci"] == pytest.approx([0.05 - half, 0.05 + half]) and paired["p"] == pytest.approx(p_value)
    assert paired["ratio_ci"] == pytest.approx([math.exp(0.05 - half), math.exp(0.05 + half)])
    assert (round(half, 4), round(p_value, 3)) == (0.0745, 0.102)
    assert recs["other"]["goal"] == 1.1 and recs["other"]["goal_verdict"] == "undecided"  # CI 0.976-1.133
    assert recs["base"]["paired"] is None and recs["base"]["goal_verdict"] == "undecided"
    assert recs["other"]["eval_tokens"] == [32768]
    row = next(line for line in (results / "table.md").read_text().splitlines() if line.startswith("| other |"))
    assert "| +0.0500 ± 0.0745 | 0.976–1.133 | 0.102 | ≤ 1.10: undecided | 32,768 |" in row
    # a goal is met only when the CI's upper end is under it, missed when its lower end is above it
    _write(folder, "protocol", protocol_text.replace("other: 1.1", "other: 1.14"))
    assert sweep.main([*argv, "--table-only"]) == 0
    assert json.loads((results / "results.json").read_text())["recipes"]["other"]["goal_verdict"] == "met"
    _write(folder, "protocol", protocol_text.replace("other: 1.1", "other: 0.97"))
    assert sweep.main([*argv, "--table-only"]) == 0
    assert "| ≤ 0.97: missed |" in (results / "table.md").read_text()


LR_CHECK = "lr_check: 1.4142135623730951\n"


def test_the_lr_check_moves_the_long_runs_and_is_planned_by_a_dry_run(sweep, tmp_path, monkeypatch, capsys):
    fake, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    _write(tmp_path / "recipes", "protocol", PROTOCOL + LR_CHECK)
    monkeypatch.setattr(fake, "loss_at", lambda lr: abs(math.log(lr / 2.6e-3)), raising=False)  # best at 2.6e-3
    assert sweep.main([*argv, "--dry-run"]) == 0  # nothing on record: the grid first
    out = capsys.readouterr().out
    assert "base short lr0.001_seed0: missing, would train" in out and "plan: 2 runs to train (2 short, 0 long)" in out
    assert fake.calls == [] and not (tmp_path / "res").exists()
    assert sweep.main(argv) == 0
    # the grid chooses 2e-3 (4e-3 from the edge rule is worse); at 4 steps 2e-3 x sqrt(2) beats 2e-3 and 2e-3 / sqrt(2):
    # the long runs move there, their seed 0 being the check's run; `other` (lr_from base) follows
    grid = [(1e-3, 0, 2), (2e-3, 0, 2), (4e-3, 0, 2)]
    check = [(2e-3, 0, 4), (0.00141421, 0, 4), (0.00282843, 0, 4)]
    assert fake.calls == [*grid, *check, (0.00282843, 1, 4), (0.00282843, 0, 4), (0.00282843, 1, 4)]
    recs = json.loads((tmp_path / "res" / "results.json").read_text())["recipes"]
    assert recs["base"]["chosen_lr"] == 2e-3 and recs["base"]["long_lr"] == recs["other"]["long_lr"] == 0.00282843
    assert recs["base"]["lr_check"]["moved"] and recs["base"]["lr_check"]["lrs"] == [2e-3, 0.00141421, 0.00282843]
    table = (tmp_path / "res" / "table.md").read_text()
    losses = [5.0 + abs(math.log(lr / 2.6e-3)) - 0.1 for lr in (0.00141421, 2e-3, 0.00282843)]
    assert f"| 0.002 → 0.00282843 | {math.exp(5.0 + abs(math.log(2 / 2.6))):.2f} |" in table
    assert "| " + " / ".join(f"{v:.4f}" for v in losses) + ": moved to 0.00282843 |" in table
    assert "| other | from base | 0.002 → 0.00282843 | - | - |" in table
    # `other` takes base's lr and has no check of its own
    assert table.endswith("lr checks (1 row): kept 0; moved up 1 (`base`); moved down 0; not finished 0.\n")
    fake.calls.clear()
    assert sweep.main([*argv, "--stage", "lrcheck", "--dry-run"]) == 0 and fake.calls == []
    assert "plan: nothing to train" in capsys.readouterr().out
    pack = sweep.records.pack_path(tmp_path / "res", "base")
    kept = sweep.records.read_pack(pack)
    kept["long/lr0.002_seed0"]["results"]["config"]["eval_tokens"] = 64  # not comparable with its neighbours
    sweep.records.write_pack(pack, kept)
    assert sweep.main([*argv, "--table-only"]) == 0
    short = math.exp(5.0 + abs(math.log(2 / 2.6)))
    table = (tmp_path / "res" / "table.md").read_text()
    assert f"| 0.002 | {short:.2f} | evaluated on different tokens |" in table
    assert "moved up 0; moved down 0; not finished 1 (`base`)." in table


def test_the_line_under_the_table_sorts_the_rows_by_their_lr_check(sweep):
    def rec(lrs, long_lr, moved):
        return {"lr_check": {"lrs": lrs, "val_loss": [4.0, 4.1, 3.9], "long_lr": long_lr, "moved": moved}}

    recs = {
        "a": rec([2e-3, 1.4e-3, 2.8e-3], 2e-3, False),
        "b": rec([2e-3, 1.4e-3, 2.8e-3], 1.4e-3, True),
        "c": rec([2e-3, 1.4e-3, 2.8e-3], 2.8e-3, True),
        "d": rec([2e-3, 1.4e-3, 2.8e-3], None, None),
        "e": {"lr_check": None},  # lr_from, or no lr at all
        "f": rec([1e-3, 7e-4, 1.4e-3], 1.4e-3, True),
    }
    line = "lr checks (5 rows): kept 1 (`a`); moved up 2 (`c`, `f`); moved down 1 (`b`); not finished 1 (`d`)."
    assert sweep.lr_check_line(recs) == line
    assert sweep.lr_check_line({"e": {"lr_check": None}}) == ""


def test_a_moved_row_keeps_its_long_runs_at_the_grids_lr_until_the_new_ones_ran(sweep, tmp_path, monkeypatch):
    """Long runs at the grid's lr on record, then an lr check that moves the optimum: until every seed has run at
    the new lr, the row's statistics are those of the grid's lr, and it says so."""
    fake, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    monkeypatch.setattr(fake, "loss_at", lambda lr: abs(math.log(lr / 2.6e-3)), raising=False)
    assert sweep.main(argv) == 0  # no lr check in the protocol: the long runs at the grid's 2e-3
    before = json.loads((tmp_path / "res" / "results.json").read_text())["recipes"]
    assert "lr checks" not in (tmp_path / "res" / "table.md").read_text()
    _write(tmp_path / "recipes", "protocol", PROTOCOL + LR_CHECK)
    fake.calls.clear()
    assert sweep.main([*argv, "--stage", "lrcheck"]) == 0
    assert fake.calls == [(0.00141421, 0, 4), (0.00282843, 0, 4)]  # the chosen lr's seed-0 run is on record
    recs = json.loads((tmp_path / "res" / "results.json").read_text())["recipes"]
    for name in ("base", "other"):
        assert recs[name]["long_lr"] == 0.00282843 and recs[name]["long_ppl_lr"] == 2e-3
        assert recs[name]["long_ppl"] == before[name]["long_ppl"]
    assert recs["other"]["paired"]["mean_diff"] == before["other"]["paired"]["mean_diff"]
    table = (tmp_path / "res" / "table.md").read_text()
    assert "long runs at 0.002 until those at 0.00282843 have run" in table
    fake.calls.clear()
    assert sweep.main([*argv, "--stage", "long"]) == 0  # the moved runs train (the check is on record); the row moves
    assert fake.calls == [(0.00282843, 1, 4), (0.00282843, 0, 4), (0.00282843, 1, 4)]
    recs = json.loads((tmp_path / "res" / "results.json").read_text())["recipes"]
    assert recs["base"]["long_ppl_lr"] == 0.00282843 and recs["base"]["long_ppl"] != before["base"]["long_ppl"]
    assert "until those at" not in (tmp_path / "res" / "table.md").read_text()


def test_runs_evaluated_on_fewer_tokens_are_shown_and_re_run(sweep, tmp_path, monkeypatch, capsys):
    fake, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    assert sweep.main(argv) == 0
    more = ["--set", "eval_tokens=65536"]  # the fake runs were evaluated on the preset's 32,768 tokens
    assert sweep.main([*argv, *more, "--table-only"]) == 0
    out = capsys.readouterr().out
    assert "outdated: evaluated on 32,768 validation tokens, the protocol's 65,536" in out and "STALE" not in out
    row = next(line for line in out.splitlines() if line.startswith("| base |"))
    assert "| 1.000 | - | - | - | - | 32,768 |" in row  # shown, with the tokens it was evaluated on
    fake.calls.clear()
    assert sweep.main([*argv, *more, "--dry-run"]) == 0 and fake.calls == []
    assert "plan: 2 runs to train (2 short, 0 long)" in capsys.readouterr().out  # the edge point waits on them
    assert sweep.main([*argv, *more]) == 0
    assert len(fake.calls) == 7  # the grid, then the long runs of both recipes, evaluated on 65,536 tokens
    assert sweep.main([*argv, *more, "--dry-run"]) == 0 and "plan: nothing to train" in capsys.readouterr().out


def test_a_row_never_mixes_evaluations_while_its_seeds_are_re_run(sweep, tmp_path, monkeypatch, capsys):
    """A sweep re-running a row on more validation tokens is interrupted after one seed: the row's statistics
    stay on the evaluation every seed (and the baseline) shares, the replaced record is kept beside the new one,
    and once every seed has been re-run the row moves to the new count as a whole."""
    fake, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    assert sweep.main(argv) == 0
    pack_path = sweep.records.pack_path(tmp_path / "res", "base")
    pack = sweep.records.read_pack(pack_path)
    pack["long/lr0.002_seed0"]["results"]["git_commit"] = "01d00000" * 5  # the record the re-run will replace
    sweep.records.write_pack(pack_path, pack)
    assert sweep.main([*argv, "--table-only"]) == 0
    before = json.loads((tmp_path / "res" / "results.json").read_text())["recipes"]
    assert before["base"]["eval_tokens"] == [32768]
    more = ["--set", "eval_tokens=65536", "--stage", "long"]
    harder = lambda cfg: {**fake(cfg), **({"final_val_loss": 9.0} if cfg.eval_tokens > 32768 else {})}
    trained = []

    def interrupted(cfg):
        if trained:
            raise KeyboardInterrupt
        trained.append(cfg.seed)
        return harder(cfg) | {"git_commit": "5eed0000" * 5}

    monkeypatch.setattr(sweep, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.main([*argv, *more])
    pack = sweep.records.read_pack(pack_path)
    assert pack["long/lr0.002_seed0"]["results"]["final_val_loss"] == 9.0
    assert pack["long/lr0.002_seed0@32768"]["results"]["final_val_loss"] == pytest.approx(4.9)
    assert sweep.main([*argv, *more, "--table-only"]) == 0
    capsys.readouterr()
    mid = json.loads((tmp_path / "res" / "results.json").read_text())["recipes"]
    for name in ("base", "other"):  # the same statistics as before, on the evaluation all seeds share
        assert mid[name]["long_ppl"] == before[name]["long_ppl"] and mid[name]["eval_tokens"] == [32768]
    same = ("n", "pairs", "mean_diff", "ci", "ratio_ci")
    assert [mid["other"]["paired"][k] for k in same] == [before["other"]["paired"][k] for k in same]
    assert mid["base"]["outdated_runs"] == 3 + 1  # the grid and seed 1, still on 32,768 tokens
    assert mid["base"]["commits"] == ["01d00000", "5eed0000", "c0ffee00"]  # with the replaced record's, still read

    monkeypatch.setattr(sweep, "train", harder)
    assert sweep.main([*argv, *more]) == 0
    after = json.loads((tmp_path / "res" / "results.json").read_text())["recipes"]
    assert after["base"]["long_ppl"] == pytest.approx([math.exp(9.0)] * 2) and after["base"]["eval_tokens"] == [65536]
    assert after["other"]["paired"]["pairs"] == [[s, 65536, ""] for s in (0, 1)]
    assert after["other"]["paired"]["mean_diff"] == 0.0  # both at 9.0 on the new evaluation, none mixed in


def test_a_row_keeps_its_ratio_on_the_evaluation_it_shares_with_a_re_run_baseline(sweep, tmp_path, monkeypatch):
    """Only the baseline is re-run on more validation tokens: it moves to the new count, and every other row's
    recorded ratio (the headline and ablation tables read it) still divides by the baseline on the old one."""
    fake, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    assert sweep.main(argv) == 0
    monkeypatch.setattr(sweep, "train", lambda cfg: {**fake(cfg), "final_val_loss": 9.0})
    base_only = ["base", *argv[1:], "--set", "eval_tokens=65536", "--stage", "long"]
    assert sweep.main(base_only) == 0 and sweep.main([*argv, "--set", "eval_tokens=65536", "--table-only"]) == 0
    res = json.loads((tmp_path / "res" / "results.json").read_text())["recipes"]
    assert res["base"]["eval_tokens"] == [65536] and res["base"]["ratio"] == 1.0
    mean = lambda losses: sum(map(math.exp, losses)) / len(losses)
    assert res["other"]["eval_tokens"] == [32768]
    assert res["other"]["ratio"] == pytest.approx(mean([5.4, 5.41]) / mean([4.9, 4.91]))


def test_comparisons_pair_rows_beyond_the_baseline(sweep, tmp_path, monkeypatch, capsys):
    """A recipe listed under the protocol's ``comparisons`` is paired with each named recipe's long runs exactly
    as with the baseline's: pairing ``other`` with ``base`` (the baseline) repeats its paired statistics."""
    _, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    _write(tmp_path / "recipes", "protocol", PROTOCOL + "comparisons: {other: [base], base: [other]}\n")
    assert sweep.main(argv) == 0
    res = json.loads((tmp_path / "res" / "results.json").read_text())["recipes"]
    assert res["other"]["compared"] == {"base": res["other"]["paired"]}
    flipped = res["base"]["compared"]["other"]
    assert flipped["mean_diff"] == pytest.approx(-res["other"]["paired"]["mean_diff"]) and flipped["n"] == 2
    assert "(other with base; base with other) is recorded as each row's `compared`" in capsys.readouterr().out


def test_a_setting_the_record_lacks_matches_only_at_the_presets_value(sweep, tmp_path, monkeypatch, capsys):
    records = sweep.records
    _, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    assert sweep.main(argv) == 0
    for name in ("base", "other"):
        pack = records.pack_path(tmp_path / "res", name)
        kept = records.read_pack(pack)
        for rec in kept.values():
            del rec["meta"]["config"]["keep_checkpoints"]  # a record from a library without the setting
        records.write_pack(pack, kept)
    assert sweep.main([*argv, "--table-only"]) == 0
    assert "STALE" not in capsys.readouterr().out
    _write(
        tmp_path / "recipes",
        "base",
        "description: b\noverrides: {optim.name: adamw, keep_checkpoints: 7}\nlrs: [1.0e-3, 2.0e-3]\n",
    )
    assert sweep.main([*argv, "--table-only"]) == 0
    assert "stale: its config differs from the recipe's" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        ("lr_check: 1.0\n", "lr_check must be a factor > 1"),
        ("lr_check: fast\n", "lr_check must be a factor > 1"),
        ("goals: {base: -1}\n", "goals must map recipes to positive perplexity ratios"),
        ("goals: {nope: 1.1}\n", "goals name unknown recipes \\['nope'\\]"),
        ("comparisons: {other: base}\n", "comparisons must map recipes to lists of other recipes"),
        ("comparisons: {other: [other]}\n", "comparisons must map recipes to lists of other recipes"),
        ("comparisons: {other: [nope]}\n", "comparisons name unknown recipes \\['nope'\\]"),
        ("lr_checks: 1.5\n", "unknown keys \\['lr_checks'\\]"),
    ],
)
def test_a_bad_protocol_is_one_line(sweep, tmp_path, monkeypatch, capsys, extra, message):
    _, _, argv = _fake_sweep(sweep, tmp_path, monkeypatch)
    _write(tmp_path / "recipes", "protocol", PROTOCOL + extra)
    assert sweep.main([*argv, "--table-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and __import__("re").search(message, err)
    assert not (tmp_path / "res").exists()


def test_eval_cost_times_one_evaluation(sweep, tmp_path, monkeypatch, data_cache, capsys):
    folder = tmp_path / "recipes"
    _write(folder, "protocol", PROTOCOL.replace("grid_size: 2", "grid_size: 1"))
    _write(folder, "base", "description: base\noverrides: {optim.name: adamw}\nlrs: [3.0e-3]\n")
    sets = [f"--set={o}" for o in [*TOY, f"data.cache_dir={data_cache}", "eval_tokens=512"]]
    assert sweep.main(["--eval-cost", "--recipes-dir", str(folder), *sets, "--lock", str(tmp_path / "lock")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "validation tokens" in line]
    assert len(lines) == 2 and lines[0].startswith("512 validation tokens (2 batches): ")  # 32 windows of 16 tokens
    assert "1 evaluations in a 2-step run" in lines[0] and "per evaluation" in lines[1]
