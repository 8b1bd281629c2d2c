"""The GaLore-gap study (experiments/galore_gap.py): its study protocols, a study sweep, its table and figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lowrank_jax.config import load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture()
def gap(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import galore_gap

    return galore_gap


def test_the_studies_keep_the_comparisons_protocol_and_tokens(gap):
    """Every study run: the comparison's shared settings and learning rates, its long budget's tokens, and 8
    projectors at every batch size (the refresh study: T = 25 ... 200)."""
    sweep = gap.sweep
    main = sweep.load_protocol(sweep.RECIPES / "protocol.yaml")
    tokens = main.long_steps * load_config(main.preset, []).batch_size * load_config(main.preset, []).seq_len
    gaps = {}
    for study in gap.STUDIES:
        protocol = sweep.load_protocol(gap.RECIPES / study / "protocol.yaml")
        assert protocol.seeds == () and protocol.preset == main.preset and protocol.grid_seed == 0
        assert {k: v for k, v in protocol.overrides.items() if k != "batch_size"} == main.overrides
        for name in sweep.recipe_names(gap.RECIPES / study):
            r = sweep.load_recipe(gap.RECIPES / study / f"{name}.yaml", protocol)
            (run,) = sweep.Sweep(protocol, {name: r}, [], Path("unused"), Path("unused")).grid(r)
            cfg = load_config(protocol.preset, sweep.run_overrides(run, protocol, []))
            assert cfg.steps * cfg.batch_size * cfg.seq_len == tokens
            assert cfg.optim.lr == {"adamw": 1e-3, "galore_adamw": 1.41421e-2}[cfg.optim.name]
            if cfg.optim.name == "galore_adamw":
                gaps[(study, name)] = cfg.galore.update_proj_gap
                assert cfg.galore.rank == 32 and cfg.galore.scale == 0.25
                if study != "refresh":
                    assert math.ceil(cfg.steps / cfg.galore.update_proj_gap) == 8
    refresh = sorted(t for (study, _), t in gaps.items() if study == "refresh")
    assert refresh == [25, 50, 200] and len(gaps) == 5  # T = 100 is the comparison's own run


def test_a_study_protocol_runs_its_grid_only(gap, tmp_path, monkeypatch, capsys):
    """``seeds: []``: one run per recipe at its listed lr, canaries recorded, no long stage; lr_check and goals
    refused."""
    sweep = gap.sweep
    folder = tmp_path / "recipes"
    folder.mkdir()
    protocol = "preset: tiny\ngrid_size: 1\nshort_steps: 3\nlong_steps: 3\ngrid_seed: 0\nseeds: []\n"
    protocol += "baseline: a\ncanary_steps: 2\noverrides: {eval_tokens: 512}\n"
    (folder / "protocol.yaml").write_text(protocol)
    (folder / "a.yaml").write_text("description: a\noverrides: {optim.name: adamw}\nlrs: [1.0e-3]\n")
    (folder / "b.yaml").write_text("description: b\noverrides: {optim.name: adamw8bit}\nlrs: [2.0e-3]\n")
    calls = []

    def fake_train(cfg):
        calls.append((cfg.optim.name, cfg.optim.lr, cfg.steps, cfg.seed))
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in (1, 2, 3)))
        from lowrank_jax.config import to_dict

        loss = 4.0 if cfg.optim.name == "adamw" else 4.1
        return {
            "final_val_loss": loss,
            "config": to_dict(cfg),
            "git_commit": "c" * 40,
            "trainable_params": 1,
            "optimizer_state_bytes": 8,
        }

    monkeypatch.setattr(sweep, "train", fake_train)
    monkeypatch.setattr(sweep, "_dirty", lambda paths: False)
    argv = ["all", "--recipes-dir", str(folder), "--results", str(tmp_path / "res"), "--runs", str(tmp_path / "r")]
    assert sweep.main(argv) == 0
    assert calls == [("adamw", 1e-3, 3, 0), ("adamw8bit", 2e-3, 3, 0)]
    recs = json.loads((tmp_path / "res" / "results.json").read_text())["recipes"]
    assert recs["b"]["short_ppl"] == pytest.approx(math.exp(4.1)) and recs["b"]["long_ppl"] == []
    assert set(json.loads((tmp_path / "res" / "canaries.json").read_text())) == {"a", "b"}
    assert "Study protocol" in (tmp_path / "res" / "table.md").read_text()
    (folder / "protocol.yaml").write_text(protocol + "lr_check: 1.5\n")
    assert sweep.main(argv) == 2
    assert "seeds: [] (a study: the grid stage only) takes no lr_check, goals or comparisons" in capsys.readouterr().err


def _record(
    steps: int, batch: int, loss: float, name: str = "galore_adamw", gap: int | None = 25, curve: dict | None = None
) -> dict:
    config = {"steps": steps, "batch_size": batch, "seq_len": 256, "eval_tokens": 262144, "optim": {"name": name}}
    if gap is not None:
        config["galore"] = {"update_proj_gap": gap}
    metrics = [{"step": step, "val_loss": v} for step, v in (curve or {}).items()]
    return {"results": {"final_val_loss": loss, "git_commit": "a" * 40}, "metrics": metrics, "meta": {"config": config}}


def test_the_table_and_figure_from_records(gap, tmp_path, monkeypatch):
    """Ratios of GaLore's to AdamW's ppl per batch multiple (the 1x point from the comparison) and per T."""
    monkeypatch.setattr(gap, "RESULTS", tmp_path)
    put = lambda study, recipe, rec: gap.records.put_run(tmp_path / study, recipe, "short/x", rec)  # noqa: E731
    put("batch4", "adamw", _record(200, 64, 3.6, "adamw", None))
    put("batch4", "galore", _record(200, 64, 3.65))
    put("refresh", "galore_t50", _record(800, 16, 3.7, gap=50))
    adamw = _record(800, 16, 3.55, "adamw", None, curve={400: 3.7, 800: 3.55})
    comparison = {"adamw": adamw, "galore": _record(800, 16, 3.66, gap=100, curve={400: 3.8, 800: 3.66})}
    monkeypatch.setattr(gap, "_comparison_runs", lambda: comparison)
    res = gap.collect()
    assert res["batch"]["4"]["galore"]["tokens_per_step"] == 64 * 256 and res["batch"]["16"]["adamw"] is None
    md = gap.table(res)
    ppl = lambda a, g: f"{math.exp(a):.2f} | {math.exp(g):.2f} | {math.exp(g - a):.3f} | {g - a:+.4f} |"  # noqa: E731
    assert "| batch ×1 | 4,096 | 800 | 100 | " + ppl(3.55, 3.66) + " - |" in md
    # AdamW's x1 curve reaches 3.6 two thirds of the way from step 400 (3.7) to 800 (3.55), where the x1 gap
    # goes from 0.10 to 0.11: +0.1067 at step 667
    assert "| batch ×4 | 16,384 | 200 | 25 | " + ppl(3.6, 3.65) + " +0.1067 (step 667) |" in md
    assert res["batch"]["4"]["matched_1x"]["gap"] == pytest.approx(0.1 + 0.01 * 2 / 3)
    assert gap.matched_gap([(1, 4.0), (2, 3.9)], [(1, 4.1), (2, 4.0)], 3.0) is None  # never reached
    assert gap.matched_gap([(1, 4.0), (2, 3.9)], [(1, 4.1), (3, 4.0)], 3.95) is None  # not evaluated together
    assert "| batch ×16 | - | - | - | - | - | - | - | - | - |" in md
    assert f"| T = 50 | 4,096 | 800 | 50 | {math.exp(3.55):.2f} | {math.exp(3.7):.2f} | {math.exp(0.15):.3f} |" in md
    assert f"| T = 100 | 4,096 | 800 | 100 | {math.exp(3.55):.2f} | {math.exp(3.66):.2f} |" in md  # the comparison's
    png = gap.figure(res, tmp_path / "g.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
