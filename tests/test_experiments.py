"""The CPU benchmark scripts run end to end at toy sizes (so they never rot) and write what they claim."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TOY = ["model.layers=1", "model.hidden=32", "model.ffn=64", "batch_size=2", "seq_len=16", "model.vocab_size=64"]


@pytest.fixture(autouse=True)
def _scripts_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))


@pytest.mark.slow  # 10 s on 2 cores
def test_bench_frameworks_jax_side(tmp_path):
    import bench_frameworks

    argv = ["--shapes", "tiny", "--optimizers", "adamw", "galore", "--no-torch", "--steps", "2", "--warmup", "1"]
    assert bench_frameworks.main([*argv, "--rounds", "2", "--set", *TOY, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["optimizer"] for r in res["rows"]] == ["adamw", "galore"]
    for row in res["rows"]:
        assert row["framework"] == "lowrank-jax" and row["jax_over_this"] == 1.0
        assert len(row["round_medians_ms"]) == 2 and row["step_ms"] > 0
        assert "model.vocab_size=64" in row["config_overrides"]
    assert "| tiny | galore | lowrank-jax |" in (tmp_path / "table.md").read_text()


@pytest.mark.slow  # 13 s: four compiled variants
def test_cpu_ablation_restores_the_library(tmp_path):
    import cpu_ablation

    from lowrank_jax.models import llama
    from lowrank_jax.train import step

    before = (llama.Block.__call__, llama.Llama.head, step.cross_entropy, llama.causal_attention)
    argv = ["tiny", *TOY, "--steps", "1", "--warmup", "0", "--rounds", "1", "--out", str(tmp_path)]
    assert cpu_ablation.main(argv) == 0
    assert (llama.Block.__call__, llama.Llama.head, step.cross_entropy, llama.causal_attention) == before
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["before", *(f"+ {c}" for c in cpu_ablation.CHANGES)]
    # every variant trains the same model: the losses agree to float32 rounding
    losses = [r["last_loss"] for r in rows]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), losses


def test_overtraining_pretrains_each_method_at_the_sweeps_chosen_lr(monkeypatch):
    """The study runs the harness recipes (protocol included) at the best grid lr on record, lr kept constant."""
    import overtraining
    import sweep

    done = ("done", None)

    def status(run, *_):  # every grid point on record; the lowest loss at lr 2e-3
        return done[0], {"final_val_loss": 3.9 + math.log(run.lr / 2e-3) ** 2, "git_commit": "0" * 8}

    monkeypatch.setattr(sweep, "run_status", status)
    monkeypatch.setattr(overtraining, "method_overrides", overtraining.method_overrides.__wrapped__)
    cfg = overtraining.method_config("full")
    assert cfg.optim.lr == 2e-3 and cfg.optim.min_lr_ratio == 1.0 and cfg.eval_every == 25
    assert cfg.optim.eps == 1e-6 and cfg.optim.grad_clip == 1.0 and cfg.optim.lr_embed == 0.01 and cfg.steps == 200
    assert overtraining.method_config("relora").model.dense == "lora"
    done = ("missing", None)  # no valid records at HEAD: no untuned fallback
    with pytest.raises(LookupError, match=r"adamw: grid incomplete at HEAD: run `python experiments/sweep.py adamw"):
        overtraining.method_config("full")


def test_relora_ablation_table_comes_from_the_sweep_records(tmp_path, monkeypatch):
    import make_tables

    def rec(short, long, stale=()):
        return {"chosen_lr": 2e-3, "short_ppl": short, "long_ppl": long, "stale": list(stale), "commits": ["abc12345"]}

    recipes = {"adamw": {**rec(40.0, [30.0, 32.0, 31.0]), "ratio": 1.0, "eval_tokens": [262144]}}
    recipes["lora"] = {**rec(50.0, [45.0, 45.0, 48.0]), "ratio": 1.484}  # the sweep's, paired on the same tokens
    recipes["relora"] = rec(44.0, [], stale=["code or recipe changed since abc12345"])
    recipes["relora_warm"] = {**rec(55.0, [22.0]), "pending_runs": 2}  # 1 of 3 seeds: no mean ± std yet
    (tmp_path / "results" / "sweep").mkdir(parents=True)
    (tmp_path / "results" / "sweep" / "results.json").write_text(json.dumps({"recipes": recipes}))
    monkeypatch.setattr(make_tables, "HERE", tmp_path)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in make_tables.relora_ablation_table().splitlines()}
    assert "| 0.002 | 50.00 | 1.250 | 46.00 ± 1.73 | 1.484 | - | 34.17 | abc12345 |" in rows["lora"]
    assert rows["relora"].endswith("| 29.77 | STALE: code or recipe changed since abc12345 |")
    assert "| 55.00 | 1.375 | 2 runs pending | - | - | 25.04 | abc12345 |" in rows["relora_warm"]
    assert rows["lora_warm"].endswith("| 25.46 | not run |")
    assert "| 31.00 ± 1.00 | 1.000 | 262,144 | 23.65 |" in rows["adamw"]


def test_sweep_headline_table_from_the_sweep_records(tmp_path, monkeypatch):
    import make_tables

    def rec(long, state=2**21, stale=(), ratio=None, evals=(32768,)):
        return {
            "long_ppl": long,
            "optimizer_state_bytes": state,
            "stale": list(stale),
            "pending_runs": 0,
            "ratio": ratio,
            "eval_tokens": list(evals),
        }

    recipes = {"adamw": rec([30.0, 32.0, 31.0], ratio=1.0, evals=(262144,))}
    recipes["galore"] = rec([33.0, 33.0, 36.0], 2**20, ratio=1.097)  # ÷ adamw on the same 32,768 tokens
    recipes["lora"] = rec([40.0], stale=["canary differs from step 3 at abc12345"])
    recipes["relora"] = {**rec([20.0, 22.0], ratio=0.677), "pending_runs": 2, "long_lr": 0.002, "long_ppl_lr": 0.001}
    recipes["sl"] = {**rec([]), "pending_runs": 3}
    recipes["fira"] = rec([31.0, 31.0], evals=(262144,))  # no adamw runs shared with it: no ratio
    (tmp_path / "results" / "sweep").mkdir(parents=True)
    (tmp_path / "results" / "sweep" / "results.json").write_text(json.dumps({"recipes": recipes}))
    monkeypatch.setattr(make_tables, "HERE", tmp_path)
    rows = {line.split(" | ")[1]: line for line in make_tables.sweep_headline_table().splitlines()[2:]}
    assert rows["`adamw`"] == "| AdamW (full rank) | `adamw` | 31.00 ± 1.00 | 1.000 | 262,144 | 2.00 MiB |"
    assert rows["`galore`"] == "| GaLore | `galore` | 34.00 ± 1.73 | 1.097 | 32,768 | 1.00 MiB |"
    assert rows["`lora`"].endswith("| STALE | - | - | - |") and rows["`sl`"].endswith("| runs pending | - | - | - |")
    assert rows["`relora`"].endswith("| 21.00 ± 1.41 (lr 0.001; at 0.002: pending) | 0.677 | 32,768 | 2.00 MiB |")
    assert rows["`fira`"].endswith("| 31.00 ± 0.00 | - | 262,144 | 2.00 MiB |")
    assert rows["`bitlinear`"].endswith("| not run | - | - | - |") and len(rows) == len(make_tables.HEADLINE)


def test_sweep_comparisons_table_from_the_sweep_records(tmp_path, monkeypatch):
    import make_tables

    paired = {"n": 3, "pairs": [[s, 262144, "d"] for s in range(3)], "mean_diff": -0.0138, "ci": [-0.05, 0.0224]}
    paired |= {"ratio": 0.9863, "ratio_ci": [0.9512, 1.0227], "p": 0.2481}
    recipes = {"q_galore": {"compared": {"galore": paired, "galore8bit": None}}, "adamw": {"compared": {}}}
    (tmp_path / "results" / "sweep").mkdir(parents=True)
    (tmp_path / "results" / "sweep" / "results.json").write_text(json.dumps({"recipes": recipes}))
    monkeypatch.setattr(make_tables, "HERE", tmp_path)
    lines = make_tables.sweep_comparisons_table().splitlines()
    assert lines[2] == "| `q_galore` | `galore` | 3 | 262,144 | -0.0138 ± 0.0362 | 0.986 (0.951–1.023) | 0.248 |"
    assert lines[3] == "| `q_galore` | `galore8bit` | - | - | not both on record | - | - |" and len(lines) == 4


def test_make_tables_fills_the_readme_and_every_docs_page_with_markers(tmp_path, monkeypatch):
    import make_tables

    readme, docs = tmp_path / "README.md", tmp_path / "docs"
    docs.mkdir()
    readme.write_text("# x\n<!-- table:sweep_headline -->\nold\n<!-- /table:sweep_headline -->\nend\n")
    (docs / "results.md").write_text("a\n<!-- table:relora_ablation -->\n<!-- /table:relora_ablation -->\nb\n")
    (docs / "other.md").write_text("no tables here\n")
    monkeypatch.setattr(make_tables, "README", readme)
    monkeypatch.setattr(make_tables, "DOCS", docs)
    monkeypatch.setattr(make_tables, "HERE", tmp_path / "experiments")
    make_tables.main()
    text = readme.read_text()
    assert text.startswith("# x\n<!-- table:sweep_headline -->\n| method | recipe |") and text.endswith("-->\nend\n")
    assert "| adamw | full-rank AdamW |" in (docs / "results.md").read_text()
    assert (docs / "other.md").read_text() == "no tables here\n"
    written = tmp_path / "experiments" / "results"
    assert (written / "sweep_headline.md").is_file() and (written / "relora_ablation.md").is_file()


def test_every_memory_7b_row_is_a_valid_config():
    """Each row of experiments/memory_7b.py loads as the config its child process compiles (a bad optimizer name
    would otherwise surface as an error row after a long run)."""
    import memory_7b

    from lowrank_jax.config import load_config
    from lowrank_jax.train.memory import expand_method

    for label, overrides in memory_7b.ROWS:
        for mesh in memory_7b.MESHES.values():
            cfg = load_config("llama_7b", expand_method([*memory_7b.COMMON, *overrides, *mesh]))
            assert cfg.model.param_dtype == "bfloat16", label


@pytest.mark.slow  # 29 s on 2 cores
def test_noise_step_mnist_selects_on_validation_and_tests_once_per_seed(tmp_path):
    """Each seed's model is chosen on the validation split; the test set is scored once, for that model."""
    import noise_step_mnist

    argv = ["--dataset", "digits", "--steps", "6", "--batch", "32", "--n", "4", "--chunk", "2", "--seeds", "0", "1"]
    assert noise_step_mnist.main([*argv, "--eval-every", "2", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())["datasets"]["digits"]
    c = r["config"]
    assert set(r["seeds"]) == {"0", "1"} and c["train_size"] + c["validation_size"] + c["test_size"] == 1797
    assert c["validation_size"] == 179 and c["test_size"] == 359  # 1/8 of the rest and 20% of each class, rounded
    for run in r["seeds"].values():
        for method in ("noise_step", "adam_ste"):
            m = run[method]
            assert [e["step"] for e in m["curve"]] == [2, 4, 6] and all("test_acc" not in e for e in m["curve"])
            assert m["selected_val_acc"] == max(e["val_acc"] for e in m["curve"]) and 0 <= m["test_acc"] <= 1
        assert run["noise_step"]["replay_bit_exact"]
    assert r["seeds"]["0"]["noise_step"]["curve"] != r["seeds"]["1"]["noise_step"]["curve"]  # seeds differ
    assert "| digits | 6 × 32 | 4 | 0, 1 |" in (tmp_path / "table.md").read_text()
    assert noise_step_mnist._selected([{"step": 2, "val_acc": 0.5}, {"step": 4, "val_acc": 0.5}])["step"] == 2
