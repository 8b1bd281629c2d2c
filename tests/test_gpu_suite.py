"""``experiments/gpu_suite.py --smoke`` runs every section on CPU at tiny sizes, so the GPU suite never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_writes_every_section(tmp_path, hermetic_cwd):
    out = tmp_path / "gpu"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "experiments" / "gpu_suite.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=hermetic_cwd, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    s = res["sections"]
    assert res["smoke"] and res["backend"] == "cpu" and "git_commit" in res
    assert "error" not in s["memory_7b"] and s["memory_7b"]["loss"] > 0, s["memory_7b"]
    assert {r["kernel"] for r in s["correctness"]} == {"sl_matmul", "ternary_matmul"}
    assert all(r["ok"] for r in s["correctness"]), s["correctness"]
    assert [r["variant"] for r in s["sl_matmul"]] == ["xla", "pallas"]
    assert max(s["sl_matmul"][1]["max_rel_err_vs_xla"].values()) < 5e-2
    assert s["ternary"][0]["max_rel_err_vs_bf16_dense"] < 1e-2
    assert {(r["config"], r["method"]) for r in s["train_step"]} == {("tiny", "adamw"), ("tiny", "sl")}
    assert all(r["tokens_per_s"] > 0 for r in s["train_step"])
    assert set(res["goals"]) and all(v is None for v in res["goals"].values())  # a smoke run measures no goal
    kinds = {(c["kernel"], c["implementation"]) for c in res["kernel_implementations"]}
    assert ("sl_matmul", "pallas") in kinds and ("sl_matmul", "xla") in kinds
    for name in ("table.md", "sl_matmul.png", "train_step.png"):
        assert (out / name).stat().st_size > 0
