"""One accelerator suite: ceilings, kernels against their references, kernel times, the 1B train step, 7B memory.

    python experiments/gpu_suite.py --out DIR                        # one H100 / H200 (or a TPU): ≤ 7 minutes
    python experiments/gpu_suite.py --smoke --out /tmp/gpu_suite     # CPU, tiny sizes (run by the default tests)
    python experiments/gpu_suite.py --tables-from DIR                # table.md and plots again from results.json

``experiments/device_run.sh`` is the whole device command around it (installs what the image lacks,
prints versions, runs this with ``--out`` under ``$OUT``). Every section runs in its own child process
with a time limit, so a crash, a hang or an out-of-memory error costs that section only: its error
(the log's last lines) goes into its row and the suite goes on. ``results.json`` and ``table.md`` are
rewritten after every section, so a run cut short still leaves everything measured until then. This
process never starts the accelerator's backend (each child owns the device alone and frees it).

Sections, in this order (most important first), with the time each is planned to take on one H100
(``FULL[...]["estimate_s"]``: the child's start included; they total 415 s, under the 420 s budget):

1. ``ceilings`` (25 s) — what this device does at all: device copy bandwidth (read + write of 1 GiB)
   and bf16 GEMM TFLOP/s at the shapes the other sections use. Other sections report a % of these.
2. ``correctness`` (40 s) — the Pallas kernels against their references on random shapes (mostly not
   multiples of any block), every output poisoned with NaN before the kernel writes it, float32 matmuls.
3. ``sl_matmul`` (65 s) — forward and forward + backward at the 1B MLP shapes 2048×5461 and 5461×2048,
   r = 512, δ = 0.03, bf16 x, 2048 tokens: the paper's path (W materialised in float32, ``xla``), W
   materialised in bf16 and multiplied by the default GEMM (``bf16w``, the official SLTrain code's
   path), the fused Triton kernels (``pallas``) and their Mosaic GPU port (``mosaic_gpu``, GPU only; not
   in the ``--smoke`` rehearsal, where it would run Mosaic GPU's slow interpreter); each variant's
   error against the reference at these shapes.
4. ``ternary`` (35 s) — the packed ternary GEMV (1 token) and GEMM (256 tokens) vs a bf16 matmul at
   4096×11008, the Triton kernel and its Mosaic GPU port timed side by side; bandwidth as % of the in-run
   copy bandwidth and of the datasheet HBM peak; error vs float64.
5. ``train_llama_1b_adamw`` (75 s), ``train_llama_1b_sl`` (75 s) — tokens/s and MFU of llama_1b
   (32 × 256 tokens, bf16 compute, random tokens; :func:`bench_step.bench`), and the achieved TFLOP/s
   as % of the in-run GEMM ceiling.
6. ``memory_7b`` (100 s, GPU only) — llama_7b, 8-bit GaLore r = 1024 with the per-layer update, bf16
   params, 1 × 256 tokens, two steps, GoLore's random projector (the same state shapes as GaLore's
   SVD projector without 224 exact SVDs of up to 4096 × 11008), device memory capped at 24 GiB
   (``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the child). Reports the allocator's peak and XLA's estimate.

Kernel times are device-side: each timed function runs under ``jax.profiler`` and its time is the sum
of the device's kernel (GPU: CUPTI stream events) or module (TPU) durations per call; on a backend
without a device trace (CPU) the host wall clock is used and the row says ``timing: host wall``. The
operands rotate through copies totalling ≥ 3× the 50 MiB L2 of an H100 / H200, so every call reads
its weights from HBM. A section that does not fit the remaining ``--budget`` is skipped and says so.
``--smoke`` runs every section at tiny sizes (Pallas interpreted on CPU: its times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _report import markdown_table, save_figure, step_seconds, subplots, write_record, write_table
from bench_sl_matmul import operands as sl_operands

from lowrank_jax.train.metrics import provenance

HERE = Path(__file__).resolve().parent
GIB = 2**30
L2_BYTES = 50 * 2**20  # H100 / H200 L2; operands rotate through ≥ 3× this
TINY = ["model.vocab_size=256", "model.hidden=64", "model.ffn=160", "model.heads=2", "model.layers=2"]
TINY += ["model.max_seq_len=32", "seq_len=16", "batch_size=4", "model.dtype=bfloat16"]
METHODS = {
    "adamw": [],
    "galore": ["optim.name=galore_adamw"],
    "sl": ["model.dense=sl", "model.sl_implementation=auto"],
}
_7B = ["optim.name=galore_adamw8bit", "galore.rank=1024", "galore.projector=random", "layerwise_update=true"]
_1B = ["batch_size=32", "seq_len=256", "model.remat=false", "model.sl_rank=512", "model.sl_alpha=8"]
FULL: dict[str, dict[str, Any]] = {
    "ceilings": {"estimate_s": 25, "copy_bytes": GIB, "gemms": [(2048, 2048, 5461), (2048, 5461, 2048)]}
    | {"gemm_train": (8192, 2048, 5461), "reps": 20},
    "correctness": {"estimate_s": 40, "cases": 6, "hi": 700},
    "sl_matmul": {"estimate_s": 65, "shapes": [(2048, 5461), (5461, 2048)], "rank": 512, "density": 0.03}
    | {"tokens": 2048, "reps": 10, "variants": ["xla", "bf16w", "pallas", "mosaic_gpu"]},
    "ternary": {"estimate_s": 35, "k": 4096, "n": 11008, "tokens": [1, 256], "reps": 50},
    "train_llama_1b_adamw": {"estimate_s": 75, "config": "llama_1b", "method": "adamw", "overrides": _1B}
    | {"steps": 5, "warmup": 2},
    "train_llama_1b_sl": {"estimate_s": 75, "config": "llama_1b", "method": "sl", "overrides": _1B}
    | {"steps": 5, "warmup": 2},
    "memory_7b": {"estimate_s": 100, "config": "llama_7b", "cap_gib": 24, "gpu_only": True}
    | {"overrides": [*_7B, "model.param_dtype=bfloat16", "batch_size=1", "seq_len=256"]},
}
SMOKE: dict[str, dict[str, Any]] = {
    "ceilings": {"estimate_s": 10, "copy_bytes": 2**22, "gemms": [(32, 64, 96)], "gemm_train": (64, 64, 160)}
    | {"reps": 2},
    "correctness": {"estimate_s": 20, "cases": 2, "hi": 40},
    "sl_matmul": {"estimate_s": 20, "shapes": [(64, 96)], "rank": 8, "density": 0.03, "tokens": 32, "reps": 1}
    | {"variants": ["xla", "bf16w", "pallas"]},
    "ternary": {"estimate_s": 10, "k": 64, "n": 96, "tokens": [1], "reps": 2},
    "train_tiny_adamw": {"estimate_s": 15, "config": "tiny", "method": "adamw", "overrides": TINY}
    | {"steps": 1, "warmup": 0},
    "train_tiny_sl": {"estimate_s": 15, "config": "tiny", "method": "sl", "overrides": [*TINY, "model.sl_rank=8"]}
    | {"steps": 1, "warmup": 0},
    "memory_7b": {"estimate_s": 20, "config": "tiny", "cap_gib": 24, "gpu_only": True}
    | {"overrides": [*TINY, "optim.name=galore_adamw8bit", "galore.rank=8", "galore.projector=random"]},
}
SMOKE["memory_7b"]["overrides"].append("layerwise_update=true")
# HBM bandwidth (bytes/s) by lower-case device-kind substrings, first match wins (vendor datasheets)
PEAK_HBM = ((("h200",), 4.8e12), (("h100", "pcie"), 2.0e12), (("h100",), 3.35e12), (("a100",), 2.0e12))
GOALS = (
    "sl_fwd_bwd_le_bf16w",
    "sl_memory_lt_bf16w",
    "ternary_gemv_2.5x_bf16",
    "ternary_gemv_50pct_hbm",
    "llama_1b_adamw_mfu_40pct",
    "llama_7b_peak_le_22gib",
)


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


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def peak_hbm(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((bw for needles, bw in PEAK_HBM if all(s in kind for s in needles)), None)


def guarded(fn: Callable[[], dict], **row: Any) -> dict:
    """``row | fn()``, or ``row`` with the error (type, message, where) if ``fn`` raises: one failing
    variant must not cost the section's other rows."""
    try:
        return row | fn()
    except Exception as e:  # recorded in the row; the suite goes on
        where = traceback.extract_tb(e.__traceback__)[-1]
        return row | {"error": f"{type(e).__name__}: {str(e)[:400]} ({Path(where.filename).name}:{where.lineno})"}


# --- timing -----------------------------------------------------------------------------------------


def rotations(arg_bytes: int, smoke: bool) -> int:
    """Copies of the operands to cycle through so that consecutive calls never find them in L2."""
    return 2 if smoke else max(2, min(32, math.ceil(3 * L2_BYTES / max(arg_bytes, 1))))


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def _device_trace_seconds(trace_dir: str, calls: int) -> dict | None:
    """Device seconds per call from the profile in ``trace_dir``: the summed durations of device 0's
    kernels (GPU: its ``Stream`` lines, CUPTI) or modules (TPU: ``XLA Modules``); None without a device plane."""
    files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    if not files:
        return None
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    for plane in data.planes:
        if not re.fullmatch(r"/device:(GPU|TPU):0", plane.name):
            continue
        lines = {line.name: list(line.events) for line in plane.lines}
        streams = [ev for name, evs in lines.items() if name.startswith("Stream") for ev in evs]
        events, source = (streams, "kernels") if streams else (lines.get("XLA Modules", []), "modules")
        if not events:
            continue
        per_name: dict[str, float] = {}
        for ev in events:
            per_name[ev.name] = per_name.get(ev.name, 0.0) + ev.duration_ns
        top = sorted(per_name.items(), key=lambda kv: -kv[1])[:4]
        return {
            "device_s": sum(per_name.values()) * 1e-9 / calls,
            "device_source": f"{plane.name} {source}",
            "device_top": {name[:80]: ns * 1e-9 / calls for name, ns in top},
        }
    return None


def timed(fn: Callable, arg_sets: list[tuple], reps: int) -> dict:
    """Per-call time of ``fn`` over ``reps`` calls cycling through ``arg_sets`` (each compiled and warmed
    first): ``seconds`` is the device time when the backend records a device trace, else the host wall
    median; both are kept (``wall_s``, ``device_s``) with the ``timing`` used."""
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    wall = []
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            for i in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
                wall.append(time.perf_counter() - t0)
        finally:
            jax.profiler.stop_trace()
        try:
            dev = _device_trace_seconds(trace_dir, reps)
        except Exception as e:  # an unreadable trace leaves the wall time
            dev = {"device_trace_error": f"{type(e).__name__}: {e}"[:300]}
    row = {"wall_s": statistics.median(wall), "rotated_copies": len(arg_sets)} | (dev or {})
    row["seconds"] = row.get("device_s", row["wall_s"])
    row["timing"] = "device trace" if "device_s" in row else "host wall"
    return row


def rotated(make: Callable[[int], tuple], smoke: bool) -> list[tuple]:
    """Operand sets ``make(i)`` (distinct buffers), as many as :func:`rotations` asks for."""
    first = make(0)
    return [first] + [make(i) for i in range(1, rotations(_nbytes(first), smoke))]


# --- sections ---------------------------------------------------------------------------------------


def ceilings(spec: dict, smoke: bool) -> list[dict]:
    rows = []
    n = spec["copy_bytes"] // 2
    copy = jax.jit(lambda x: x + jnp.bfloat16(1))
    copy_sets = [(jnp.full((n,), i, jnp.bfloat16),) for i in range(2)]
    rows.append(
        guarded(
            lambda: (t := timed(copy, copy_sets, spec["reps"])) | {"bytes_per_s": 4 * n / t["seconds"]},
            kind="copy",
            shape=[n],
            bytes=4 * n,
        )
    )
    gemm = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    for role, (m, k, n) in [("sl", s) for s in spec["gemms"]] + [("train", spec["gemm_train"])]:

        def run(m=m, k=k, n=n):
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            make = lambda i: (x, jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16))
            t = timed(gemm, rotated(make, smoke), spec["reps"])
            return t | {"tflops_per_s": 2 * m * k * n / t["seconds"] / 1e12}

        rows.append(guarded(run, kind="gemm_bf16", role=role, shape=[m, k, n]))
    return rows


def _sl_case(rng, i: int, hi: int, target) -> dict:
    from pallas_kernels.sl_matmul.kernel import KernelConfig, sl_matmul_pallas  # lazy: section child
    from pallas_kernels.sl_matmul.reference import sl_matmul_reference  # lazy: section child

    m, k, n = (int(v) for v in rng.integers(3, hi, 3))
    r, density = int(rng.integers(1, min(k, n, 64) + 1)), float(rng.choice([0.01, 0.03, 0.1]))
    dtype, lowrank = (jnp.bfloat16, jnp.float32)[i % 2], ("factored", "tile")[(i // 2) % 2]
    row = {"kernel": "sl_matmul", "shape": [m, k, n, r], "dtype": jnp.dtype(dtype).name, "lowrank": lowrank}

    def run():
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
        return {"max_rel_err": err, "finite": finite, "ok": finite and err < tol}

    return guarded(run, **row)


def _ternary_case(rng, i: int, hi: int, target) -> dict:
    from pallas_kernels.ternary_matmul import pack_ternary  # lazy: section child
    from pallas_kernels.ternary_matmul.api import choose_blocks, pad_operands  # lazy: section child
    from pallas_kernels.ternary_matmul.kernel import ternary_matmul_pallas_padded  # lazy: section child

    m = int(rng.choice([1, 3, int(rng.integers(4, hi))]))
    k, n = (int(v) for v in rng.integers(1, hi, 2))
    dtype = ("bfloat16", "int8", "float32")[i % 3]
    row = {"kernel": "ternary_matmul", "shape": [m, k, n], "dtype": dtype, "lowrank": None, "ptx_decode": target.ptx}

    def run():
        w = rng.integers(-1, 2, (k, n)).astype(np.int8)
        x = jnp.asarray(rng.integers(-128, 128, (m, k)) if dtype == "int8" else rng.standard_normal((m, k)), dtype)
        rowscale = jnp.asarray(rng.uniform(0.01, 1.0, m), jnp.float32)
        packed = pack_ternary(jnp.asarray(w))
        blk = choose_blocks(target, m, packed.shape[0], n, x.dtype.itemsize)
        if not target.tpu and m <= 16:  # a GEMV: split-K whenever the reduction divides (as at 4096×11008)
            n_red = -(-packed.shape[0] // blk.bkq)
            blk = blk._replace(splits=max(s for s in (1, 2, 4) if n_red % s == 0))
        xp, wp, sp = pad_operands(x, packed, rowscale, k, blk)
        shape = (xp.shape[0], wp.shape[1]) if blk.splits == 1 else (blk.splits, xp.shape[0], wp.shape[1])
        kw = dict(bm=blk.bm, bn=blk.bn, bkq=blk.bkq, num_warps=blk.num_warps, splits=blk.splits)
        poison = jnp.full(shape, jnp.nan, jnp.float32)
        out = ternary_matmul_pallas_padded(xp, wp, sp, **kw, out_dtype=jnp.float32, target=target, out_init=poison)
        out = np.asarray(out) if blk.splits == 1 else np.asarray(out).sum(axis=0)
        finite = bool(np.all(np.isfinite(out)))
        want = np.asarray(x, np.float64) @ w * np.asarray(rowscale, np.float64)[:, None]
        err = _rel_err(out[:m, :n], want) if finite else float("nan")
        return {"max_rel_err": err, "finite": finite, "ok": finite and err < 1e-5, "splits": blk.splits}

    return guarded(run, **row)


def device_target():
    """The kernel target of this process's backend, as ``per_platform`` picks it (CUDA: Triton with the
    inline-PTX decode; ROCm: plain Triton; CPU: the GPU structure, interpreted)."""
    from pallas_kernels.platforms import CUDA, GPU, TPU, Target  # lazy: section child

    backend = jax.default_backend()
    if backend == "gpu":
        return CUDA if "cuda" in jax.devices()[0].client.platform_version.lower() else GPU
    return {"tpu": TPU}.get(backend, Target("gpu", interpret=True))


def correctness(spec: dict, smoke: bool, seed: int = 0) -> list[dict]:
    """Random shapes per kernel; outputs poisoned with NaN; max error relative to the largest reference entry."""
    rng, target = np.random.default_rng(seed), device_target()
    with jax.default_matmul_precision("float32"):  # TF32 would blur the float32 comparison on GPUs
        rows = [_sl_case(rng, i, spec["hi"], target) for i in range(spec["cases"])]
        return rows + [_ternary_case(rng, i, spec["hi"], target) for i in range(spec["cases"])]


def sl_variant(name: str, scale: float) -> Callable:
    """``f(x, a, b, values, idx) -> y`` of an SL matmul variant (see the module docstring)."""
    from pallas_kernels.sl_matmul.api import sl_matmul  # lazy: section child
    from pallas_kernels.sl_matmul.xla import sl_matmul_bf16w  # lazy: section child

    if name == "bf16w":
        return lambda x, a, b, v, i: sl_matmul_bf16w(x, a, b, v, i, scale)
    return lambda x, a, b, v, i: sl_matmul(x, a, b, v, i, scale, implementation=name)


def _fwd_bwd(f: Callable) -> Callable:
    """``(x, a, b, values, idx, dy) -> (y, dx, da, db, dvalues)`` of an SL matmul ``f(x, a, b, values, idx)``."""

    def fb(x, a, b, values, idx, dy):
        y, vjp = jax.vjp(lambda *p: f(*p, idx), x, a, b, values)
        return y, *vjp(dy)

    return fb


def _sl_variant_row(variant: str, scale: float, sets: list[tuple], want: tuple, reps: int) -> dict:
    from lowrank_jax.train.step import compiled_memory  # lazy: section child

    f = sl_variant(variant, scale)
    fwd = jax.jit(lambda x, a, b, v, i, dy: f(x, a, b, v, i))
    t0 = time.time()
    compiled = jax.jit(_fwd_bwd(f)).lower(*sets[0]).compile()
    compile_s = time.time() - t0
    mem = compiled_memory(compiled)
    names = ("y", "dx", "da", "db", "dvalues")
    errs = {nm: _rel_err(g, w) for nm, g, w in zip(names, compiled(*sets[0]), want, strict=True)}
    t_fwd, t_both = timed(fwd, sets, reps), timed(compiled, sets, reps)
    return {
        "fwd_s": t_fwd["seconds"],
        "fwd_bwd_s": t_both["seconds"],
        "timing": t_both["timing"],
        "fwd_timing": t_fwd,
        "fwd_bwd_timing": t_both,
        "compile_s": compile_s,
        "peak_bytes": mem.get("peak_estimate_bytes"),
        "xla_memory": mem,
        "max_rel_err_vs_f32_reference": errs,
        "ok": max(errs.values()) < 5e-2,
    }


def sl_matmul_rows(spec: dict, smoke: bool) -> list[dict]:
    from pallas_kernels.sl_matmul.reference import sl_matmul_reference  # lazy: section child

    rows, m, rank, scale = [], spec["tokens"], spec["rank"], 8.0 / spec["rank"]
    f32 = _fwd_bwd(lambda x, a, b, v, i: sl_matmul_reference(x, a, b, v, i, scale))
    for k, n in spec["shapes"]:
        sets = rotated(lambda i, k=k, n=n: sl_operands(k, n, rank, m, spec["density"], seed=i), smoke)
        x, a, b, values, idx, dy = sets[0]
        with jax.default_matmul_precision("float32"):  # the reference: float32 operands, float32 matmuls
            want = jax.jit(f32)(x.astype(jnp.float32), a, b, values, idx, dy.astype(jnp.float32))
        for variant in spec["variants"]:
            row = {"shape": [k, n], "tokens": m, "rank": rank, "variant": variant}
            if variant == "mosaic_gpu" and jax.default_backend() == "tpu":
                rows.append(row | {"skipped": "GPU only"})
                continue
            run = lambda v=variant, s=sets, w=want: _sl_variant_row(v, scale, s, w, spec["reps"])
            rows.append(guarded(run, **row))
    return rows


def ternary_rows(spec: dict, smoke: bool) -> list[dict]:
    from pallas_kernels.ternary_matmul import pack_ternary, packed_rows, ternary_matmul  # lazy: section child

    k, n, rows = spec["k"], spec["n"], []
    rng = np.random.default_rng(0)
    ws = [rng.integers(-1, 2, (k, n)).astype(np.int8) for _ in range(2)]
    dense = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32))
    kernel = jax.jit(lambda x, p: ternary_matmul(x, p, 0.02, k=k, implementation="pallas"))
    mosaic = jax.jit(lambda x, p: ternary_matmul(x, p, 0.02, k=k, implementation="mosaic_gpu"))
    on_tpu = jax.default_backend() == "tpu"
    for m in spec["tokens"]:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        moved = packed_rows(k) * n + x.nbytes + 4 * m * n  # packed weights + activations + f32 output
        row: dict[str, Any] = {"k": k, "n": n, "tokens": m, "bytes_moved": moved, "bf16_bytes_moved": 2 * k * n}

        def bf16(x=x):
            sets = rotated(lambda i: (x, jnp.asarray(ws[i % 2] * 0.02, jnp.bfloat16)), smoke)
            return {"bf16": timed(dense, sets, spec["reps"])}

        def packed_kernel(fn, x=x):  # timed over rotated packed weights; its error vs float64
            sets = rotated(lambda i: (x, pack_ternary(jnp.asarray(ws[i % 2]))), smoke)
            want = np.asarray(x, np.float64) @ ws[0].astype(np.float64) * 0.02
            return timed(fn, sets, spec["reps"]), _rel_err(np.asarray(fn(*sets[0]), np.float64), want)

        def ternary():
            t, err = packed_kernel(kernel)
            return {"ternary": t, "max_rel_err_vs_f64": err, "ok": err < 1e-4}

        def mosaic_gpu():  # the Mosaic GPU port, timed beside the Triton kernel that 'auto' runs
            if on_tpu:
                return {"mosaic_gpu_skipped": "GPU only"}
            t, err = packed_kernel(mosaic)
            return {"mosaic_gpu": t, "mosaic_gpu_max_rel_err_vs_f64": err}

        row = guarded(bf16, **row)
        row = guarded(ternary, **row)
        row = guarded(mosaic_gpu, **row)
        rows.append(row)
    return rows


def train_step_rows(spec: dict, smoke: bool) -> list[dict]:
    from bench_step import bench as bench_step  # lazy: section child

    from lowrank_jax.config import load_config  # lazy: section child

    cfg = load_config(spec["config"], [*spec["overrides"], *METHODS[spec["method"]], "progress=false"])
    res = bench_step(cfg, spec["steps"], spec["warmup"])
    keep = ("tokens_per_s", "mfu", "step_time_median_s", "compile_time_s", "achieved_tflops_per_s", "params")
    keep += ("peak_tflops_per_s", "last_loss", "tokens_per_step")
    stats = jax.devices()[0].memory_stats() or {}
    row = {"config": spec["config"], "method": spec["method"]} | {key: res[key] for key in keep}
    return [row | {"peak_bytes_in_use": stats.get("peak_bytes_in_use"), "xla_memory": res["xla_memory"]}]


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


def memory_7b_rows(spec: dict, smoke: bool) -> list[dict]:
    """In the capped child: compile, init and run two steps of the 7B per-layer 8-bit GaLore step."""
    from lowrank_jax.config import load_config  # lazy: section child
    from lowrank_jax.train.step import compile_train_step, compiled_memory, make_trainer  # lazy: section child

    cfg = load_config(spec["config"], spec["overrides"])
    trainer = make_trainer(cfg)
    compiled = compile_train_step(trainer)
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    batches = [trainer.put_batch(rng.integers(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1)))]
    times, state, m = step_seconds(compiled, state, batches * 2)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return [
        {"config": spec["config"], "cap_gib": spec["cap_gib"], "step_seconds": times, "loss": float(m["loss"])}
        | {"peak_bytes_in_use": peak, "bytes_limit": stats.get("bytes_limit"), "xla_memory": compiled_memory(compiled)}
        | {"within_cap": None if peak is None else bool(peak <= spec["cap_gib"] * GIB)}
    ]


SECTIONS: dict[str, Callable[[dict, bool], list[dict]]] = {
    "ceilings": ceilings,
    "correctness": correctness,
    "sl_matmul": sl_matmul_rows,
    "ternary": ternary_rows,
    "memory_7b": memory_7b_rows,
}


def section_fn(name: str) -> Callable[[dict, bool], list[dict]]:
    return train_step_rows if name.startswith("train_") else SECTIONS[name]


def child(name: str, out: Path, smoke: bool) -> int:
    """Run one section in this (child) process and write its rows, provenance and kernel choices to ``out``."""
    from pallas_kernels.selection import implementation_record  # lazy: section child

    spec = (SMOKE if smoke else FULL)[name]
    t0 = time.time()
    rows = section_fn(name)(spec, smoke)
    record = {"rows": rows, "seconds": time.time() - t0, "provenance": provenance()}
    errors = [r["error"] for r in rows if "error" in r]
    print(f"[{name}] {len(rows)} rows in {record['seconds']:.1f} s; row errors: {errors or 'none'}", flush=True)
    out.write_text(json.dumps(record | {"kernel_implementations": implementation_record()}, default=str))
    return 0


# --- the parent: one child per section --------------------------------------------------------------


def _tail(path: Path, lines: int = 4) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return " | ".join([ln for ln in text.strip().splitlines() if ln.strip()][-lines:])[-800:]


def run_child(name: str, spec: dict, smoke: bool, budget: Budget, out: Path, platform: str | None) -> dict:
    """One section in a child process, limited to the budget left: its record, or an error / skip."""
    est = spec["estimate_s"]
    if spec.get("gpu_only") and platform not in (None, "gpu") and not smoke:
        return {"skipped": f"GPU only (the device-memory cap is XLA_PYTHON_CLIENT_MEM_FRACTION); backend {platform}"}
    if not budget.allows(est):
        return {"skipped": f"time budget ({budget.left():.0f} s left, planned {est} s)"}
    env = dict(os.environ)
    if "cap_gib" in spec:
        total = device_memory_bytes()
        if total:
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"  # the whole capped pool up front: the cap is exact
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(1.0, spec['cap_gib'] * GIB / total):.4f}"
    limit = max(10.0, min(budget.left(), 2.5 * est))
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, open(log, "w") as fh:
        rec_path = Path(tmp) / "section.json"
        cmd = [sys.executable, __file__, "--section", name, "--section-out", str(rec_path)] + (["--smoke"] * smoke)
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=limit)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
        elapsed = time.time() - t0
        if code is None:
            return {"error": f"timeout after {limit:.0f} s (planned {est} s): {_tail(log)}", "wall_s": elapsed}
        if code or not rec_path.exists():
            return {"error": f"exit {code}: {_tail(log)}", "wall_s": elapsed}
        record = json.loads(rec_path.read_text())
    record["wall_s"] = elapsed
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" in env:
        record["mem_fraction"] = float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"])
    return record


def derive(results: dict) -> None:
    """Ratios across sections (to the in-run ceilings, to the baselines) and the goals, in place."""
    sec = results["sections"]
    kind = results.get("device_kind") or ""
    ceil = rows_of(sec, "ceilings")
    copy_bw = next((r.get("bytes_per_s") for r in ceil if r.get("kind") == "copy"), None)
    gemm_train = next((r.get("tflops_per_s") for r in ceil if r.get("role") == "train"), None)
    peak = peak_hbm(kind)
    for r in rows_of(sec, "ternary"):
        t, b = (r.get("ternary") or {}).get("seconds"), (r.get("bf16") or {}).get("seconds")
        if t:
            bw = r["bytes_moved"] / t
            r["bandwidth_bytes_per_s"] = bw
            r["pct_of_copy_bandwidth"] = 100 * bw / copy_bw if copy_bw else None
            r["pct_of_datasheet_hbm"] = 100 * bw / peak if peak else None
        if b:
            r["bf16_pct_of_copy_bandwidth"] = 100 * r["bf16_bytes_moved"] / b / copy_bw if copy_bw else None
        r["speedup_vs_bf16"] = b / t if t and b else None
    sl = rows_of(sec, "sl_matmul")
    for r in sl:
        base = next((s for s in sl if s["shape"] == r["shape"] and s["variant"] == "bf16w" and "fwd_bwd_s" in s), None)
        if base and "fwd_bwd_s" in r:
            r["fwd_bwd_vs_bf16w"] = r["fwd_bwd_s"] / base["fwd_bwd_s"]
            r["fwd_vs_bf16w"] = r["fwd_s"] / base["fwd_s"]
            if r.get("peak_bytes") and base.get("peak_bytes"):
                r["memory_vs_bf16w"] = r["peak_bytes"] / base["peak_bytes"]
    for name in sec:
        for r in rows_of(sec, name) if name.startswith("train_") else []:
            if r.get("achieved_tflops_per_s") and gemm_train:
                r["pct_of_gemm_ceiling"] = 100 * r["achieved_tflops_per_s"] / gemm_train
    results["goals"] = goals(sec, results["smoke"])


def rows_of(sections: dict, name: str) -> list[dict]:
    """The rows of a section (none if it was skipped or failed)."""
    rows = (sections.get(name) or {}).get("rows")
    return rows if isinstance(rows, list) else []


def goals(sec: dict, smoke: bool) -> dict[str, bool | None]:
    """Each goal of the issue: met (True/False), or None where not measured (smoke runs measure none)."""
    if smoke:
        return dict.fromkeys(GOALS)
    sl = [r for r in rows_of(sec, "sl_matmul") if r.get("variant") == "pallas" and "fwd_bwd_vs_bf16w" in r]
    gemv = [r for r in rows_of(sec, "ternary") if r.get("tokens") == 1 and r.get("speedup_vs_bf16")]
    mfu = [r.get("mfu") for r in rows_of(sec, "train_llama_1b_adamw") if r.get("mfu") is not None]
    m7 = rows_of(sec, "memory_7b")
    peak7 = m7[0].get("peak_bytes_in_use") if m7 else None
    return {
        "sl_fwd_bwd_le_bf16w": all(r["fwd_bwd_vs_bf16w"] <= 1.0 for r in sl) if sl else None,
        "sl_memory_lt_bf16w": all(r.get("memory_vs_bf16w", 2) < 1.0 for r in sl) if sl else None,
        "ternary_gemv_2.5x_bf16": all(r["speedup_vs_bf16"] >= 2.5 for r in gemv) if gemv else None,
        "ternary_gemv_50pct_hbm": all((r.get("pct_of_datasheet_hbm") or 0) >= 50 for r in gemv) if gemv else None,
        "llama_1b_adamw_mfu_40pct": mfu[0] >= 0.40 if mfu else None,
        "llama_7b_peak_le_22gib": None if peak7 is None else bool(peak7 <= 22 * GIB),
    }


# --- report -----------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _us(t: dict | None) -> str:
    return _fmt(t and t.get("seconds") and 1e6 * t["seconds"], ".1f")


def _gib(v: int | None) -> str:
    return _fmt(v and v / GIB, ".2f")


def _err(r: dict) -> str:
    return str(r.get("error", ""))[:160].replace("|", "/")


TABLES: dict[str, tuple[str, str, Callable[[dict], list]]] = {
    "ceilings": (
        "In-run ceilings (device-side time)",
        "kind | shape | µs | GB/s | TFLOP/s | timing | error",
        lambda r: (
            [r.get("kind"), r.get("shape"), _us(r), _fmt(r.get("bytes_per_s") and r["bytes_per_s"] / 1e9, ".0f")]
            + [_fmt(r.get("tflops_per_s"), ".1f"), r.get("timing", "-"), _err(r)]
        ),
    ),
    "correctness": (
        "Kernels vs references (outputs poisoned with NaN)",
        "kernel | shape | dtype | low-rank | max rel. err | ok | error",
        lambda r: (
            [r["kernel"], r["shape"], r["dtype"], r["lowrank"] or "-", _fmt(r.get("max_rel_err"), ".1e")]
            + [r.get("ok", False), _err(r)]
        ),
    ),
    "sl_matmul": (
        "SL matmul (1B MLP shapes): f32-W paper path (xla), bf16-W materialise (bf16w), fused kernels (pallas)",
        "shape | tokens | variant | fwd ms | fwd+bwd ms | fwd+bwd vs bf16w | XLA peak (MiB) | memory vs bf16w"
        " | max rel. err | timing | error",
        lambda r: (
            [r["shape"], r["tokens"], r["variant"], _fmt(r.get("fwd_s") and 1e3 * r["fwd_s"], ".3f")]
            + [_fmt(r.get("fwd_bwd_s") and 1e3 * r["fwd_bwd_s"], ".3f"), _fmt(r.get("fwd_bwd_vs_bf16w"), ".2f")]
            + [_fmt(r.get("peak_bytes") and r["peak_bytes"] / 2**20, ".0f"), _fmt(r.get("memory_vs_bf16w"), ".2f")]
            + [_fmt(max((r.get("max_rel_err_vs_f32_reference") or {"": None}).values(), key=lambda v: v or 0), ".1e")]
            + [r.get("timing", "-"), _err(r)]
        ),
    ),
    "ternary": (
        "Packed ternary matmul vs bf16 (weights rotated past L2)",
        "shape | tokens | bf16 µs | ternary µs | Mosaic GPU µs | speed-up | % copy BW | % HBM (datasheet)"
        " | max rel. err | error",
        lambda r: (
            [f"{r['k']}x{r['n']}", r["tokens"], _us(r.get("bf16")), _us(r.get("ternary")), _us(r.get("mosaic_gpu"))]
            + [_fmt(r.get("speedup_vs_bf16"), ".2f"), _fmt(r.get("pct_of_copy_bandwidth"), ".0f")]
            + [_fmt(r.get("pct_of_datasheet_hbm"), ".0f"), _fmt(r.get("max_rel_err_vs_f64"), ".1e"), _err(r)]
        ),
    ),
    "train": (
        "Train step (random tokens, bf16 compute)",
        "config | method | tokens/s | MFU % | % of GEMM ceiling | step ms | compile s | error",
        lambda r: (
            [r.get("config"), r.get("method"), _fmt(r.get("tokens_per_s"), ",.0f")]
            + [_fmt(r.get("mfu") and 100 * r["mfu"], ".1f"), _fmt(r.get("pct_of_gemm_ceiling"), ".0f")]
            + [_fmt(r.get("step_time_median_s") and 1e3 * r["step_time_median_s"], ".1f")]
            + [_fmt(r.get("compile_time_s"), ".0f"), _err(r)]
        ),
    ),
    "memory_7b": (
        "llama_7b, 8-bit GaLore per-layer step (random projector), device memory capped",
        "cap (GiB) | peak in use (GiB) | XLA peak estimate (GiB) | within cap | error",
        lambda r: (
            [r.get("cap_gib"), _gib(r.get("peak_bytes_in_use"))]
            + [_gib((r.get("xla_memory") or {}).get("peak_estimate_bytes")), _fmt(r.get("within_cap"), ""), _err(r)]
        ),
    ),
}


def tables(results: dict) -> str:
    """table.md: one table per section (a skipped or failed section says why), then the goals."""
    parts = [
        f"Suite on {results.get('device_kind', '?')} ({results.get('backend', '?')}), jax {results.get('jax_version')};"
        f" smoke={results['smoke']}; {results.get('total_seconds', 0):.0f} s."
    ]
    sec = results["sections"]
    for key, (title, header, cells) in TABLES.items():
        names = [n for n in results.get("section_order", sec) if n.startswith("train_")] if key == "train" else [key]
        rows, notes = [], []
        for name in names:
            s = sec.get(name) or {}
            if "skipped" in s or "error" in s:
                notes.append(f"{name}: {s.get('skipped') or 'error: ' + s['error']}")
            rows += s.get("rows", [])
        body = [markdown_table(header, [cells(r) for r in rows])] if rows else []
        if rows or notes:
            parts.append("\n\n".join([f"## {title}", *body, *notes]))
    order = results.get("section_order", list(sec))
    seconds = [[n, sec[n].get("estimate_s"), _fmt(sec[n].get("wall_s"), ".0f")] for n in order]
    parts.append("## Section seconds\n\n" + markdown_table("section | planned (H100) | wall", seconds))
    goal_rows = [[k, "-" if v is None else v] for k, v in results["goals"].items()]
    return "\n\n".join([*parts, "## Goals\n\n" + markdown_table("goal | met", goal_rows)])


def plot(results: dict, out: Path) -> None:
    sl = [r for r in rows_of(results["sections"], "sl_matmul") if "fwd_bwd_s" in r]
    fig, axes = subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{r['shape'][0]}x{r['shape'][1]}\n{r['variant']}" for r in sl]
    axes[0].bar(labels, [1e3 * r["fwd_bwd_s"] for r in sl], color="tab:blue", label="fwd+bwd ms")
    axes[1].bar(labels, [(r["peak_bytes"] or 0) / 2**20 for r in sl], color="tab:orange", label="XLA peak MiB")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=6)
    save_figure(fig, out / "sl_matmul.png", axes, grid=True, legend=True)
    steps = [r for n in results["sections"] if n.startswith("train_") for r in rows_of(results["sections"], n)]
    steps = [r for r in steps if r.get("tokens_per_s")]
    fig, ax = subplots(figsize=(6, 3.5))
    ax.bar([f"{r['config']}\n{r['method']}" for r in steps], [r["tokens_per_s"] for r in steps], label="tokens/s")
    ax.tick_params(axis="x", labelsize=7)
    save_figure(fig, out / "train_step.png", [ax], grid=True, legend=True)


def write_all(results: dict, out: Path, plots: bool = False) -> str:
    """results.json and table.md (and, when asked and matplotlib is importable, the plots) into ``out``."""
    derive(results)
    md = tables(results)
    write_table(out, md)
    write_record(out / "results.json", results)
    if plots:
        try:
            plot(results, out)
        except ImportError as e:  # a device image without matplotlib: plot here later with --tables-from
            results["plots"] = f"not drawn: {e}"
            write_record(out / "results.json", results)
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, Pallas interpreted)")
    p.add_argument("--out", default=None, help="output directory (default experiments/results/gpu/<device>)")
    p.add_argument("--budget", type=float, default=420.0, help="wall-clock seconds for the whole suite (420)")
    p.add_argument("--only", nargs="+", default=None, help="run only these sections")
    p.add_argument("--tables-from", default=None, help="redo table.md and plots from DIR/results.json, run nothing")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--section-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section:
        return child(args.section, Path(args.section_out), args.smoke)
    if args.tables_from:
        out = Path(args.tables_from)
        print(write_all(json.loads((out / "results.json").read_text()), out, plots=True))
        return 0
    spec = SMOKE if args.smoke else FULL
    names = [n for n in spec if args.only is None or n in args.only]
    unknown = sorted(set(args.only or ()) - set(spec))
    if unknown:
        print(f"gpu_suite: --only: unknown sections {unknown}; known: {list(spec)}", file=sys.stderr)
        return 2
    budget = Budget(args.budget)
    out = Path(args.out) if args.out else HERE / "results" / "gpu" / ("smoke" if args.smoke else "device")
    results: dict[str, Any] = {"smoke": args.smoke, "sections": {}, "spec": spec, "kernel_implementations": []}
    results["planned_seconds_h100"] = {n: FULL[n]["estimate_s"] for n in FULL}
    platform = None
    for name in names:
        print(f"[gpu_suite] {name}: planned {spec[name]['estimate_s']} s, {budget.left():.0f} s left", flush=True)
        rec = run_child(name, spec[name], args.smoke, budget, out, platform)
        prov = rec.pop("provenance", None)
        if prov:
            results.update(prov)
            platform = prov["backend"]
        results["kernel_implementations"] += rec.pop("kernel_implementations", [])
        results["sections"][name] = {"estimate_s": spec[name]["estimate_s"]} | rec
        results["section_order"] = list(results["sections"])  # results.json's keys are sorted
        results["total_seconds"] = time.time() - budget.t0
        write_all(results, out)
        status = rec.get("error") or rec.get("skipped") or f"{len(rec.get('rows', []))} rows"
        print(f"[gpu_suite] {name}: {rec.get('wall_s', 0):.1f} s: {status}", flush=True)
    md = write_all(results, out, plots=True)
    print(md)
    failed = [r for r in rows_of(results["sections"], "correctness") if not r.get("ok")]
    broken = [n for n, s in results["sections"].items() if "error" in s]
    if failed or broken:
        print(f"gpu_suite: {len(failed)} kernel/reference mismatches; sections with errors: {broken}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
