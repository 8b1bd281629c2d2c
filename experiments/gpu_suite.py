"""One GPU suite: kernels against their references, kernel time and memory, train-step MFU, 7B memory.

    python experiments/gpu_suite.py                                   # one H100 / H200: at most ~8 minutes
    python experiments/gpu_suite.py --smoke --out /tmp/gpu_suite      # CPU, tiny sizes (run by the default tests)

Sections, in this order (each row records its seconds; a section that would overrun ``--budget``
seconds is skipped and says so in results.json):

1. ``memory_7b`` — llama_7b, 8-bit GaLore r = 1024 with the per-layer weight update, bf16 params,
   1 × 256 tokens, two steps, in a child process whose device memory is capped at 24 GiB
   (``XLA_PYTHON_CLIENT_MEM_FRACTION``, set before its backend starts; run first, before this process
   touches the GPU). Reports the allocator's peak bytes in use and XLA's estimate. Goal: fits (paper: 22 GB).
2. ``correctness`` — the Pallas kernels against their references on random shapes (mostly not
   multiples of any block), every output poisoned with NaN before the kernel writes it, at float32
   matmul precision.
3. ``sl_matmul`` — forward + backward time and XLA peak memory of the fused kernels vs
   materialise-then-matmul (the paper's recompute-W backward) at the 1B MLP shapes 2048×5461 and
   5461×2048, r = 512, δ = 0.03, bf16. Goal: ≤ 1.0× the time and less memory.
4. ``ternary`` — the packed ternary GEMV (and a 256-token GEMM) vs a bf16 matmul at 4096×11008, and
   the GEMV's share of the HBM bandwidth (bytes moved / time / peak). Goal: ≥ 4× faster, ≥ 70 %.
5. ``train_step`` — tokens/s and MFU of llama_60m and llama_1b under adamw / galore / sl
   (``experiments/bench_step.py``'s timing; bf16 compute, random tokens). Goal: 1B full-rank ≥ 45 % MFU.

Writes ``experiments/results/gpu/<device>/`` (``--out``): ``results.json`` (every row, the goals,
the kernel implementations that ran and why, provenance), ``table.md``, ``sl_matmul.png``,
``train_step.png``. ``--smoke`` runs every section at tiny sizes (Pallas interpreted on CPU: its
times mean nothing) so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _report import markdown_table, median_seconds, save_figure, step_seconds, subplots, write_results, write_table
from bench_sl_matmul import operands as sl_operands
from bench_step import bench as bench_step

from lowrank_jax.config import load_config
from lowrank_jax.train.step import compile_train_step, compiled_memory, make_trainer
from pallas_kernels.platforms import GPU, TPU, Target
from pallas_kernels.selection import implementation_record
from pallas_kernels.sl_matmul.api import sl_matmul
from pallas_kernels.sl_matmul.kernel import KernelConfig, sl_matmul_pallas
from pallas_kernels.sl_matmul.reference import sl_matmul_reference
from pallas_kernels.ternary_matmul import pack_ternary, packed_rows, ternary_matmul
from pallas_kernels.ternary_matmul.api import choose_blocks, pad_operands
from pallas_kernels.ternary_matmul.kernel import ternary_matmul_pallas_padded

HERE = Path(__file__).resolve().parent
GIB = 2**30
TINY = ["model.vocab_size=256", "model.hidden=64", "model.ffn=160", "model.heads=2", "model.layers=2"]
TINY += ["model.max_seq_len=32", "seq_len=16", "batch_size=4", "model.dtype=bfloat16"]
METHODS = {
    "adamw": [],
    "galore": ["optim.name=galore_adamw"],
    "sl": ["model.dense=sl", "model.sl_implementation=auto"],
}
FULL: dict[str, Any] = {
    "memory_7b": {
        "config": "llama_7b",
        "overrides": ["optim.name=galore_adamw8bit", "galore.rank=1024", "layerwise_update=true"]
        + ["model.param_dtype=bfloat16", "batch_size=1", "seq_len=256"],
        "cap_gib": 24,
        "timeout_s": 200,
    },
    "correctness": {"cases": 8, "hi": 700},
    "sl_matmul": {"shapes": [(2048, 5461), (5461, 2048)], "rank": 512, "density": 0.03, "tokens": [2048], "reps": 10},
    "ternary": {"k": 4096, "n": 11008, "tokens": [1, 256], "reps": 50},
    "train_step": {
        "configs": {
            "llama_60m": ["batch_size=64", "model.remat=false", "galore.rank=128", "model.sl_rank=128"],
            "llama_1b": ["batch_size=32", "model.remat=false", "galore.rank=512", "model.sl_rank=512"]
            + ["model.sl_alpha=8"],
        },
        "steps": 5,
        "warmup": 2,
    },
}
SMOKE: dict[str, Any] = {
    "memory_7b": {
        "config": "tiny",
        "overrides": [*TINY, "optim.name=galore_adamw8bit", "galore.rank=8", "layerwise_update=true"],
        "cap_gib": 24,
        "timeout_s": 120,
    },
    "correctness": {"cases": 2, "hi": 40},
    "sl_matmul": {"shapes": [(64, 96)], "rank": 8, "density": 0.03, "tokens": [32], "reps": 1},
    "ternary": {"k": 64, "n": 96, "tokens": [1], "reps": 1},
    "train_step": {"configs": {"tiny": [*TINY, "galore.rank=8", "model.sl_rank=8"]}, "steps": 1, "warmup": 0},
}
SMOKE["train_step"]["methods"] = ["adamw", "sl"]
# HBM bandwidth (bytes/s) by lower-case device-kind substrings, first match wins (vendor datasheets)
PEAK_HBM = ((("h200",), 4.8e12), (("h100", "pcie"), 2.0e12), (("h100",), 3.35e12), (("a100",), 2.0e12))


class Budget:
    """Wall-clock budget of the whole suite: :meth:`allows` says whether ``need`` more seconds fit."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)

    def allows(self, need: float) -> bool:
        return self.left() >= need


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def device_target() -> Target:
    """The kernel target of this process's backend (CPU: the GPU structure, interpreted)."""
    backend = jax.default_backend()
    return {"gpu": GPU, "tpu": TPU}.get(backend, Target("gpu", interpret=True))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


# --- 1. llama_7b memory in a capped child process ------------------------------------------------


def device_memory_bytes() -> int | None:
    """Total memory of GPU 0 from ``nvidia-smi`` (without starting JAX's backend), None if unknown."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return int(out.stdout.split()[0]) * 2**20 if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def memory_7b(spec: dict, smoke: bool) -> dict:
    total = device_memory_bytes()
    env = dict(os.environ)
    row: dict[str, Any] = {"config": spec["config"], "overrides": spec["overrides"], "cap_gib": spec["cap_gib"]}
    if total:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"  # the whole capped pool up front: the cap is exact
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(1.0, spec['cap_gib'] * GIB / total):.4f}"
        row.update(device_memory_bytes=total, mem_fraction=float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]))
    else:
        row["note"] = "no GPU memory total (nvidia-smi): the cap is not applied"
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        child_out = Path(tmp) / "memory_7b.json"
        cmd = [sys.executable, __file__, "--child-7b", str(child_out)] + (["--smoke"] if smoke else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=spec["timeout_s"])
        except subprocess.TimeoutExpired:
            return {**row, "error": f"timeout after {spec['timeout_s']} s", "seconds": time.time() - t0}
        row["seconds"] = time.time() - t0
        if proc.returncode:
            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-3:]
            return {**row, "error": " | ".join(tail)[-600:] or f"exit {proc.returncode}"}
        row.update(json.loads(child_out.read_text()))
    peak = row.get("peak_bytes_in_use")
    row["fits_cap"] = None if peak is None or not total else bool(peak <= spec["cap_gib"] * GIB)
    return row


def child_7b(path: Path, smoke: bool) -> int:
    """In the capped child: compile, init and run two steps of the 7B per-layer 8-bit GaLore step."""
    spec = (SMOKE if smoke else FULL)["memory_7b"]
    cfg = load_config(spec["config"], spec["overrides"])
    trainer = make_trainer(cfg)
    compiled = compile_train_step(trainer)
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    batches = [trainer.put_batch(rng.integers(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1)))]
    times, state, m = step_seconds(compiled, state, batches * 2)
    stats = jax.devices()[0].memory_stats() or {}
    path.write_text(
        json.dumps(
            {
                "step_seconds": times,
                "loss": float(m["loss"]),
                "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
                "bytes_limit": stats.get("bytes_limit"),
                "xla_memory": compiled_memory(compiled),
                "device_kind": jax.devices()[0].device_kind,
            }
        )
    )
    return 0


# --- 2. kernels = references ---------------------------------------------------------------------


def _sl_case(rng, i: int, hi: int, target: Target) -> dict:
    m, k, n = (int(v) for v in rng.integers(3, hi, 3))
    r, density = int(rng.integers(1, min(k, n, 64) + 1)), float(rng.choice([0.01, 0.03, 0.1]))
    dtype, lowrank = (jnp.bfloat16, jnp.float32)[i % 2], ("factored", "tile")[(i // 2) % 2]
    x, a, b, values, idx, dy = sl_operands(k, n, r, m, density, int(rng.integers(1 << 30)))
    x, dy = x.astype(dtype), dy.astype(dtype)
    cfg = KernelConfig(lowrank=lowrank, poison=True, interpret=target.interpret)

    def fwd_vjp(fn):
        y, vjp = jax.vjp(lambda *p: fn(*p, idx, 0.5), x, a, b, values)
        return (y, *vjp(dy))

    got = jax.jit(lambda: fwd_vjp(lambda *p: sl_matmul_pallas(*p, cfg)))()
    want = jax.jit(lambda: fwd_vjp(sl_matmul_reference))()
    err = max(_rel_err(g, w) for g, w in zip(got, want, strict=True))
    finite = all(bool(np.all(np.isfinite(np.asarray(g, np.float32)))) for g in got)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    return {"kernel": "sl_matmul", "shape": [m, k, n, r], "dtype": jnp.dtype(dtype).name, "lowrank": lowrank} | {
        "max_rel_err": err,
        "finite": finite,
        "ok": finite and err < tol,
    }


def _ternary_case(rng, i: int, hi: int, target: Target) -> dict:
    m = int(rng.choice([1, 3, int(rng.integers(4, hi))]))
    k, n = (int(v) for v in rng.integers(1, hi, 2))
    dtype = ("bfloat16", "int8", "float32")[i % 3]
    w = rng.integers(-1, 2, (k, n)).astype(np.int8)
    x = jnp.asarray(rng.integers(-128, 128, (m, k)) if dtype == "int8" else rng.standard_normal((m, k)), dtype)
    rowscale = jnp.asarray(rng.uniform(0.01, 1.0, m), jnp.float32)
    packed = pack_ternary(jnp.asarray(w))
    blk = choose_blocks(target, m, packed.shape[0], n, x.dtype.itemsize)
    xp, wp, sp = pad_operands(x, packed, rowscale, k, blk)
    poison = jnp.full((xp.shape[0], wp.shape[1]), jnp.nan, jnp.float32)
    out = ternary_matmul_pallas_padded(
        xp, wp, sp, bm=blk.bm, bn=blk.bn, bkq=blk.bkq, out_dtype=jnp.float32, target=target, out_init=poison
    )
    out = np.asarray(out)
    finite = bool(np.all(np.isfinite(out)))
    want = np.asarray(x, np.float64) @ w * np.asarray(rowscale, np.float64)[:, None]
    err = _rel_err(out[:m, :n], want) if finite else float("nan")
    return {"kernel": "ternary_matmul", "shape": [m, k, n], "dtype": dtype, "lowrank": None} | {
        "max_rel_err": err,
        "finite": finite,
        "ok": finite and err < 1e-5,
    }


def correctness(spec: dict, seed: int) -> list[dict]:
    """Random shapes per kernel; outputs poisoned with NaN; max error relative to the largest reference entry."""
    rng, target = np.random.default_rng(seed), device_target()
    with jax.default_matmul_precision("float32"):  # TF32 would blur the float32 comparison on GPUs
        rows = [_sl_case(rng, i, spec["hi"], target) for i in range(spec["cases"])]
        return rows + [_ternary_case(rng, i, spec["hi"], target) for i in range(spec["cases"])]


# --- 3. SL fused vs materialise ------------------------------------------------------------------


def sl_matmul_rows(spec: dict) -> list[dict]:
    rows = []
    for k, n in spec["shapes"]:
        for m in spec["tokens"]:
            ops = sl_operands(k, n, spec["rank"], m, spec["density"])
            outs = {}
            for variant in ("xla", "pallas"):

                def fwd_bwd(x, a, b, values, idx, dy, variant=variant):
                    f = lambda *p: sl_matmul(*p, idx, 8.0 / spec["rank"], implementation=variant)
                    y, vjp = jax.vjp(f, x, a, b, values)
                    return y, *vjp(dy)

                t0 = time.time()
                compiled = jax.jit(fwd_bwd).lower(*ops).compile()
                compile_s = time.time() - t0
                mem = compiled_memory(compiled)
                outs[variant] = compiled(*ops)
                rows.append(
                    {"shape": f"{k}x{n}", "tokens": m, "variant": variant, "compile_s": compile_s}
                    | {"fwd_bwd_s": median_seconds(compiled, *ops, repeats=spec["reps"])}
                    | {"peak_bytes": mem.get("peak_estimate_bytes"), "xla_memory": mem}
                )
            xla, pallas = rows[-2], rows[-1]
            pallas["time_vs_xla"] = pallas["fwd_bwd_s"] / xla["fwd_bwd_s"]
            if xla["peak_bytes"] and pallas["peak_bytes"]:
                pallas["memory_vs_xla"] = pallas["peak_bytes"] / xla["peak_bytes"]
            names = ("y", "dx", "da", "db", "dvalues")
            pallas["max_rel_err_vs_xla"] = {
                name: _rel_err(g, w) for name, g, w in zip(names, outs["pallas"], outs["xla"], strict=True)
            }
    return rows


# --- 4. ternary GEMV ----------------------------------------------------------------------------


def peak_hbm(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((bw for needles, bw in PEAK_HBM if all(s in kind for s in needles)), None)


def ternary_rows(spec: dict) -> list[dict]:
    k, n, rows = spec["k"], spec["n"], []
    rng = np.random.default_rng(0)
    w = rng.integers(-1, 2, (k, n)).astype(np.int8)
    packed = pack_ternary(jnp.asarray(w))
    w_bf16 = jnp.asarray(w * 0.02, jnp.bfloat16)
    peak = peak_hbm(jax.devices()[0].device_kind)
    for m in spec["tokens"]:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        dense = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32))
        kernel = jax.jit(lambda x, p: ternary_matmul(x, p, 0.02, k=k, implementation="pallas"))
        err = _rel_err(kernel(x, packed), dense(x, w_bf16))
        t_dense = median_seconds(dense, x, w_bf16, repeats=spec["reps"])
        t_kernel = median_seconds(kernel, x, packed, repeats=spec["reps"])
        moved = packed_rows(k) * n + x.nbytes + 4 * m * n  # packed weights + activations + f32 output
        bw = moved / t_kernel
        rows.append(
            {
                "k": k,
                "n": n,
                "tokens": m,
                "bf16_s": t_dense,
                "ternary_s": t_kernel,
                "speedup_vs_bf16": t_dense / t_kernel,
            }
            | {"bytes_moved": moved, "bandwidth_bytes_per_s": bw, "hbm_fraction": bw / peak if peak else None}
            | {"max_rel_err_vs_bf16_dense": err}
        )
    return rows


# --- 5. train steps ------------------------------------------------------------------------------


def train_step_rows(spec: dict, budget: Budget, per_config_s: float) -> list[dict]:
    rows = []
    for name, overrides in spec["configs"].items():
        for method in spec.get("methods", list(METHODS)):
            row: dict[str, Any] = {"config": name, "method": method}
            if not budget.allows(per_config_s):
                rows.append({**row, "skipped": f"time budget ({budget.left():.0f} s left)"})
                continue
            cfg = load_config(name, [*overrides, *METHODS[method], "progress=false"])
            t0 = time.time()
            res = bench_step(cfg, spec["steps"], spec["warmup"])
            keep = ("tokens_per_s", "mfu", "step_time_median_s", "compile_time_s", "achieved_tflops_per_s", "params")
            rows.append({**row, **{key: res[key] for key in keep}, "seconds": time.time() - t0})
    return rows


# --- report ---------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _mib(v: int | None) -> str:
    return _fmt(v and v / 2**20, ".0f")


def _gib(v: int | None) -> str:
    return _fmt(v and v / GIB, ".2f")


# section -> (title, header, cells of one row)
TABLES = {
    "memory_7b": (
        "llama_7b, 8-bit GaLore per-layer step, device memory capped",
        "cap (GiB) | peak in use (GiB) | XLA peak estimate (GiB) | fits | error",
        lambda r: (
            [
                r.get("cap_gib"),
                _gib(r.get("peak_bytes_in_use")),
                _gib(r.get("xla_memory", {}).get("peak_estimate_bytes")),
            ]
            + [_fmt(r.get("fits_cap"), ""), r.get("error", "")]
        ),
    ),
    "correctness": (
        "Kernels vs references (outputs poisoned with NaN)",
        "kernel | shape | dtype | low-rank | max rel. err | ok",
        lambda r: [r["kernel"], r["shape"], r["dtype"], r["lowrank"] or "-", _fmt(r["max_rel_err"], ".1e"), r["ok"]],
    ),
    "sl_matmul": (
        "SL matmul forward + backward: fused kernels vs materialise-then-matmul (xla)",
        "shape | tokens | variant | ms | time vs xla | XLA peak (MiB) | memory vs xla",
        lambda r: (
            [r["shape"], r["tokens"], r["variant"], _fmt(1e3 * r["fwd_bwd_s"], ".2f")]
            + [_fmt(r.get("time_vs_xla"), ".2f"), _mib(r["peak_bytes"]), _fmt(r.get("memory_vs_xla"), ".2f")]
        ),
    ),
    "ternary": (
        "Packed ternary matmul vs bf16",
        "shape | tokens | bf16 µs | ternary µs | speed-up | % HBM",
        lambda r: (
            [f"{r['k']}x{r['n']}", r["tokens"], _fmt(1e6 * r["bf16_s"], ".1f"), _fmt(1e6 * r["ternary_s"], ".1f")]
            + [_fmt(r["speedup_vs_bf16"], ".2f"), _fmt(r["hbm_fraction"] and 100 * r["hbm_fraction"], ".0f")]
        ),
    ),
    "train_step": (
        "Train step (random tokens, bf16 compute)",
        "config | method | tokens/s | MFU % | step ms | note",
        lambda r: (
            [
                r["config"],
                r["method"],
                _fmt(r.get("tokens_per_s"), ",.0f"),
                _fmt(r.get("mfu") and 100 * r["mfu"], ".1f"),
            ]
            + [_fmt(r.get("step_time_median_s") and 1e3 * r["step_time_median_s"], ".1f"), r.get("skipped", "")]
        ),
    ),
}


def tables(results: dict) -> str:
    """table.md: one table per section (a skipped section says why), then the goals."""
    parts = [f"GPU suite on {results['device_kind']} ({results['backend']}); smoke={results['smoke']}."]
    for name, (title, header, cells) in TABLES.items():
        rows = results["sections"].get(name)
        if isinstance(rows, dict) and "skipped" in rows:
            parts.append(f"## {title}\n\nskipped: {rows['skipped']}")
        elif rows:
            parts.append(
                f"## {title}\n\n"
                + markdown_table(header, [cells(r) for r in ([rows] if isinstance(rows, dict) else rows)])
            )
    goal_rows = [[k, "-" if v is None else v] for k, v in results["goals"].items()]
    return "\n\n".join([*parts, "## Goals\n\n" + markdown_table("goal | met", goal_rows)])


def measured(sections: dict, name: str) -> list[dict]:
    """The rows of a section (none if it was skipped)."""
    rows = sections.get(name)
    return rows if isinstance(rows, list) else []


GOALS = (
    "sl_time_le_xla",
    "sl_memory_lt_xla",
    "ternary_gemv_4x",
    "ternary_gemv_70pct_hbm",
    "llama_1b_adamw_mfu_45pct",
    "llama_7b_fits_24gib",
)


def goals(sections: dict, smoke: bool) -> dict[str, bool | None]:
    """Each goal of the suite: met (True/False), or None where not measured (smoke runs measure none)."""
    if smoke:
        return dict.fromkeys(GOALS)
    sl = [r for r in measured(sections, "sl_matmul") if r["variant"] == "pallas"]
    gemv = [r for r in measured(sections, "ternary") if r["tokens"] == 1]
    mfu_1b = [
        r.get("mfu") for r in measured(sections, "train_step") if r["config"] == "llama_1b" and r["method"] == "adamw"
    ]
    m7 = sections.get("memory_7b") or {}
    return {
        "sl_time_le_xla": all(r["time_vs_xla"] <= 1.0 for r in sl) if sl else None,
        "sl_memory_lt_xla": all(r.get("memory_vs_xla", 2) < 1.0 for r in sl) if sl else None,
        "ternary_gemv_4x": all(r["speedup_vs_bf16"] >= 4 for r in gemv) if gemv else None,
        "ternary_gemv_70pct_hbm": all((r["hbm_fraction"] or 0) >= 0.7 for r in gemv) if gemv else None,
        "llama_1b_adamw_mfu_45pct": (mfu_1b[0] >= 0.45) if mfu_1b and mfu_1b[0] is not None else None,
        "llama_7b_fits_24gib": m7.get("fits_cap"),
    }


def plot(results: dict, out: Path) -> None:
    sl = measured(results["sections"], "sl_matmul")
    fig, axes = subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{r['shape']}\nM={r['tokens']}\n{r['variant']}" for r in sl]
    axes[0].bar(labels, [1e3 * r["fwd_bwd_s"] for r in sl], color="tab:blue", label="fwd+bwd ms")
    axes[1].bar(labels, [(r["peak_bytes"] or 0) / 2**20 for r in sl], color="tab:orange", label="XLA peak MiB")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=6)
    save_figure(fig, out / "sl_matmul.png", axes, grid=True, legend=True)
    steps = [r for r in measured(results["sections"], "train_step") if r.get("tokens_per_s")]
    fig, ax = subplots(figsize=(6, 3.5))
    ax.bar([f"{r['config']}\n{r['method']}" for r in steps], [r["tokens_per_s"] for r in steps], label="tokens/s")
    ax.tick_params(axis="x", labelsize=7)
    save_figure(fig, out / "train_step.png", [ax], grid=True, legend=True)


def run_section(name: str, fn, budget: Budget, need_s: float, sections: dict, timings: dict) -> None:
    if not budget.allows(need_s):
        sections[name] = {"skipped": f"time budget ({budget.left():.0f} s left, needs ~{need_s:.0f} s)"}
        return
    t0 = time.time()
    sections[name] = fn()
    timings[name] = time.time() - t0
    print(f"{name}: {timings[name]:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, Pallas interpreted)")
    p.add_argument("--out", default=None, help="output directory (default experiments/results/gpu/<device>)")
    p.add_argument("--budget", type=float, default=480.0, help="wall-clock seconds for the whole suite (480)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child-7b", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_7b:
        return child_7b(Path(args.child_7b), args.smoke)
    spec = SMOKE if args.smoke else FULL
    budget, sections, timings = Budget(args.budget), {}, {}
    # first: the capped child, while this process has not started its backend (so holds no device memory)
    run_section("memory_7b", lambda: memory_7b(spec["memory_7b"], args.smoke), budget, 30, sections, timings)
    run_section("correctness", lambda: correctness(spec["correctness"], args.seed), budget, 20, sections, timings)
    run_section("sl_matmul", lambda: sl_matmul_rows(spec["sl_matmul"]), budget, 40, sections, timings)
    run_section("ternary", lambda: ternary_rows(spec["ternary"]), budget, 15, sections, timings)
    per_config = 5 if args.smoke else 40
    sections["train_step"] = train_step_rows(spec["train_step"], budget, per_config)
    device_kind = jax.devices()[0].device_kind
    out = (
        Path(args.out)
        if args.out
        else HERE / "results" / "gpu" / (slug(device_kind) + ("_smoke" if args.smoke else ""))
    )
    results = {
        "smoke": args.smoke,
        "device_kind": device_kind,
        "backend": jax.default_backend(),
        "sections": sections,
        "goals": goals(sections, args.smoke),
        "section_seconds": timings,
        "total_seconds": time.time() - budget.t0,
        "kernel_implementations": implementation_record(),
        "spec": spec,
    }
    md = tables(results)
    write_table(out, md)
    plot(results, out)
    write_results(out, results)
    print(md)
    failed = [r for r in measured(sections, "correctness") if not r["ok"]]
    if failed:
        print(f"gpu_suite: {len(failed)} kernel/reference mismatches: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
