"""``experiments/gpu_suite.py --smoke`` runs every section on CPU at tiny sizes, so the device suite never rots;
a section's failure is recorded in its row while the others still run and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import gpu_suite  # noqa: E402


def run_suite(out: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "experiments" / "gpu_suite.py"), "--smoke", "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.slow  # 65 s; the budget, error and timeout rows are tested below
def test_gpu_suite_smoke_writes_every_section(tmp_path, hermetic_cwd):
    out = tmp_path / "gpu"
    proc = run_suite(out, hermetic_cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    s = res["sections"]
    assert res["smoke"] and res["backend"] == "cpu" and "git_commit" in res
    assert res["section_order"] == list(gpu_suite.SMOKE)  # the order: ceilings, kernels, train steps, 7B memory
    assert not [name for name, sec in s.items() if "error" in sec or "skipped" in sec]
    rows = {name: gpu_suite.rows_of(s, name) for name in s}
    copy, *gemms = rows["ceilings"]
    assert copy["bytes_per_s"] > 0 and all(r["tflops_per_s"] > 0 for r in gemms)
    assert all(r["timing"] == "host wall" for r in rows["ceilings"])  # no device trace on CPU
    assert {r["kernel"] for r in rows["correctness"]} == {"sl_matmul", "ternary_matmul"}
    assert all(r["ok"] for r in rows["correctness"]), rows["correctness"]
    assert [r["variant"] for r in rows["sl_matmul"]] == ["xla", "bf16w", "pallas"]
    assert all(r["ok"] and max(r["max_rel_err_vs_f32_reference"].values()) < 5e-2 for r in rows["sl_matmul"])
    assert rows["sl_matmul"][1]["fwd_bwd_vs_bf16w"] == 1.0
    (gemv,) = rows["ternary"]
    assert gemv["ok"] and gemv["max_rel_err_vs_f64"] < 1e-5 and gemv["speedup_vs_bf16"] > 0
    assert gemv["ternary"]["rotated_copies"] == 2 and gemv["pct_of_copy_bandwidth"] > 0
    assert gemv["mosaic_gpu_max_rel_err_vs_f64"] < 1e-5 and gemv["mosaic_gpu"]["rotated_copies"] == 2
    train = [r for name in s if name.startswith("train_") for r in rows[name]]
    assert {(r["config"], r["method"]) for r in train} == {("tiny", "adamw"), ("tiny", "sl")}
    assert all(r["tokens_per_s"] > 0 and r["pct_of_gemm_ceiling"] > 0 for r in train)
    assert rows["memory_7b"][0]["loss"] > 0
    assert set(res["goals"]) == set(gpu_suite.GOALS) and all(v is None for v in res["goals"].values())
    kinds = {(c["kernel"], c["implementation"]) for c in res["kernel_implementations"]}
    assert ("sl_matmul", "pallas") in kinds and ("sl_matmul", "xla") in kinds
    assert set(res["planned_seconds_h100"]) == set(gpu_suite.FULL)
    assert sum(res["planned_seconds_h100"].values()) <= 7 * 60
    for name in ("table.md", "sl_matmul.png", "train_step.png", "logs/sl_matmul.log"):
        assert (out / name).stat().st_size > 0


def test_a_section_past_the_budget_is_skipped_and_says_so(tmp_path, hermetic_cwd):
    out = tmp_path / "gpu"
    # 12 s fits the ceilings' planned 10 s but never the correctness section's 20 s, however fast the machine
    proc = run_suite(out, hermetic_cwd, "--only", "ceilings", "correctness", "--budget", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]  # skipped is not an error
    s = json.loads((out / "results.json").read_text())["sections"]
    assert set(s) == {"ceilings", "correctness"} and gpu_suite.rows_of(s, "ceilings")
    assert "planned 20 s" in s["correctness"]["skipped"]
    assert "correctness: time budget" in (out / "table.md").read_text()


def test_child_error_and_timeout_are_rows(tmp_path, monkeypatch):
    spec = {"estimate_s": 1}
    monkeypatch.setattr(gpu_suite, "__file__", str(tmp_path / "missing.py"))  # the child cannot start
    rec = gpu_suite.run_child("ceilings", spec, True, gpu_suite.Budget(60), tmp_path, None)
    assert rec["error"].startswith("exit 2") and "missing.py" in rec["error"]
    rec = gpu_suite.run_child("memory_7b", {**spec, "gpu_only": True}, False, gpu_suite.Budget(60), tmp_path, "tpu")
    assert rec["skipped"].startswith("GPU only")


def test_guarded_records_the_error():
    row = gpu_suite.guarded(lambda: {"x": 1 / 0}, kind="k")
    assert row["kind"] == "k" and row["error"].startswith("ZeroDivisionError")
    assert gpu_suite.guarded(lambda: {"x": 1}, kind="k") == {"kind": "k", "x": 1}


def test_device_trace_parser_reads_a_cpu_trace_as_no_device(tmp_path):
    """On CPU the profile has host planes only: the parser says so (None) and timing falls back to the wall."""
    import jax.numpy as jnp

    row = gpu_suite.timed(lambda x: x + 1, [(jnp.ones(8),)], 3)
    assert row["timing"] == "host wall" and row["seconds"] == row["wall_s"] > 0


def test_unknown_section_is_a_usage_error(tmp_path, capsys):
    assert gpu_suite.main(["--smoke", "--out", str(tmp_path), "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--only" in err and "nope" in err and not any(tmp_path.iterdir())


def test_sections_in_priority_order_within_seven_minutes():
    assert sum(s["estimate_s"] for s in gpu_suite.FULL.values()) <= 7 * 60
    for spec in (gpu_suite.FULL, gpu_suite.SMOKE):
        names = list(spec)
        assert names[:4] == ["ceilings", "correctness", "sl_matmul", "ternary"] and names[-1] == "memory_7b"
        assert all(n.startswith("train_") for n in names[4:-1])
