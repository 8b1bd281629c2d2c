"""Packed ternary matmul vs a bf16 dense matmul: GEMV (1 token) and prefill (2048 tokens).

    python experiments/bench_ternary.py                      # on a GPU: the full table
    python experiments/bench_ternary.py --scale 16 --reps 3 --out /tmp/bench_ternary   # CPU smoke run

For each weight shape ``(in, out)`` in 4096×4096 and 4096×11008 (LLaMA-7B attention and MLP-up)
and each token count M (1 and 2048), times side by side in one process (median of ``--reps`` runs
after warm-up, every call jitted and blocked on):

* ``bf16``: ``x_bf16 @ W_bf16`` (XLA), the baseline;
* ``ternary_pallas_bf16`` / ``ternary_pallas_int8``: the Pallas kernel on the 2-bit packed weights
  (:mod:`pallas_kernels.ternary_matmul`) with bf16 or int8 (per-row scaled) activations;
* ``ternary_xla_bf16``: the XLA reference (unpack to int8, then a dense matmul).

Ratios are ``time(bf16) / time(method)`` (> 1: faster than bf16). Weight bytes read: bf16 2 B per
weight, packed 0.25 B. The goal on a GPU is GEMV ≥ 4× faster than bf16 (memory bound: 8× fewer
bytes). On CPU the Pallas kernel runs interpreted (``--scale`` shrinks the shapes): those timings
check that the script works and mean nothing about kernel speed.

Writes ``results.json`` (timings, ratios, config, provenance), ``table.md`` and ``ratios.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _report import markdown_table, median_seconds, save_figure, subplots, write_record, write_table

from lowrank_jax.train.metrics import provenance
from pallas_kernels.ternary_matmul import pack_ternary, ternary_matmul

HERE = Path(__file__).resolve().parent
SHAPES = ((4096, 4096), (4096, 11008))
TOKENS = (1, 2048)
METHODS = ("ternary_pallas_bf16", "ternary_pallas_int8", "ternary_xla_bf16")  # each timed against bf16


def block_candidates(m: int, tune: bool) -> list[tuple[int, int, int] | None]:
    """Pallas tile sizes tried (``None``: the api default); the fastest is reported."""
    if not tune:
        return [None]
    if m <= 16:
        return [None, (16, 32, 128), (16, 64, 64), (16, 64, 128), (16, 128, 128)]
    return [None, (64, 64, 64), (64, 128, 32), (128, 64, 32), (128, 128, 32)]


def bench_case(k: int, n: int, m: int, reps: int, interpret: bool, key: jax.Array, tune: bool = False) -> dict:
    kw, kx = jax.random.split(key)
    w_t = jax.random.randint(kw, (k, n), -1, 2, jnp.int32).astype(jnp.int8)
    packed = pack_ternary(w_t)
    scale = jnp.float32(0.02)
    w_bf16 = (w_t.astype(jnp.float32) * scale).astype(jnp.bfloat16)
    x = jax.random.normal(kx, (m, k), jnp.float32)
    x_bf16 = x.astype(jnp.bfloat16)
    amax = jnp.max(jnp.abs(x), axis=-1)
    x_int8 = jnp.clip(jnp.round(x * (127.0 / amax[:, None])), -128, 127).astype(jnp.int8)
    x_scale = amax / 127.0

    dense = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32))
    xla_bf16 = jax.jit(lambda x, p: ternary_matmul(x, p, scale, k=k, implementation="xla"))

    def pallas_bf16_with(blocks):
        return jax.jit(
            lambda x, p: ternary_matmul(x, p, scale, k=k, implementation="pallas", interpret=interpret, blocks=blocks)
        )

    tiles = {}
    for blocks in block_candidates(m, tune):
        tiles[str(blocks)] = median_seconds(pallas_bf16_with(blocks), x_bf16, packed, repeats=reps)
    best = min(tiles, key=tiles.get)
    best_blocks = None if best == "None" else tuple(int(v) for v in best.strip("()").split(","))
    pallas_bf16 = pallas_bf16_with(best_blocks)
    pallas_int8 = jax.jit(
        lambda x, s, p: ternary_matmul(
            x, p, scale, k=k, x_scale=s, implementation="pallas", interpret=interpret, blocks=best_blocks
        )
    )

    # correctness on this very input before timing (bf16 products are exact, sums in f32)
    y_ref = np.asarray(xla_bf16(x_bf16, packed))
    y_pal = np.asarray(pallas_bf16(x_bf16, packed))
    y_i8 = np.asarray(pallas_int8(x_int8, x_scale, packed))
    y_i8_ref = np.asarray(ternary_matmul(x_int8, packed, scale, k=k, x_scale=x_scale, implementation="xla"))
    err = float(np.max(np.abs(y_pal - y_ref)) / (np.max(np.abs(y_ref)) + 1e-30))
    err = max(err, float(np.max(np.abs(y_i8 - y_i8_ref)) / (np.max(np.abs(y_i8_ref)) + 1e-30)))
    if not err < 1e-3:
        raise RuntimeError(f"kernel mismatch at k={k} n={n} m={m}: relative error {err}")
    t = {
        "bf16": median_seconds(dense, x_bf16, w_bf16, repeats=reps),
        "ternary_pallas_bf16": median_seconds(pallas_bf16, x_bf16, packed, repeats=reps),
        "ternary_pallas_int8": median_seconds(pallas_int8, x_int8, x_scale, packed, repeats=reps),
        "ternary_xla_bf16": median_seconds(xla_bf16, x_bf16, packed, repeats=reps),
    }
    return {
        "k": k,
        "n": n,
        "tokens": m,
        "seconds": t,
        "speedup_vs_bf16": {name: t["bf16"] / v for name, v in t.items() if name != "bf16"},
        "weight_bytes": {"bf16": 2 * k * n, "packed": int(packed.nbytes)},
        "max_rel_err_vs_reference": err,
        "pallas_blocks_seconds": tiles,
        "pallas_blocks": best,
    }


def table(rows: list[dict], device: str) -> str:
    header = "in × out | tokens | bf16 ms | pallas bf16 ms (×) | pallas int8 ms (×) | XLA unpack ms (×)"
    cells = [
        [
            f"{r['k']}×{r['n']}",
            r["tokens"],
            f"{1e3 * r['seconds']['bf16']:.3f}",
            *(f"{1e3 * r['seconds'][q]:.3f} ({r['speedup_vs_bf16'][q]:.2f}×)" for q in METHODS),
        ]
        for r in rows
    ]
    caption = f"Device: {device}. Median seconds; speed-up = time(bf16) / time(method)."
    return caption + "\n\n" + markdown_table(header, cells)


def plot(rows: list[dict], path: Path, device: str) -> None:
    labels = [f"{r['k']}×{r['n']}\nM={r['tokens']}" for r in rows]
    xs = np.arange(len(rows))
    fig, ax = subplots(figsize=(8, 4), dpi=110)
    for i, name in enumerate(METHODS):
        ax.bar(xs + (i - 1) * 0.27, [r["speedup_vs_bf16"][name] for r in rows], 0.27, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(xs, labels)
    ax.set_ylabel("speed-up vs bf16 matmul")
    ax.set_title(device)
    save_figure(fig, path, [ax], legend=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=1, help="divide every dimension (and the 2048 tokens) by this")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=str(HERE / "results" / "bench_ternary"))
    p.add_argument("--no-tune", action="store_true", help="GPU/TPU: use the default tiles only (no tile sweep)")
    a = p.parse_args(argv)
    if a.scale < 1 or a.reps < 1:
        print("error: --scale and --reps must be >= 1", file=sys.stderr)
        return 2
    # compiled on an accelerator (Triton on GPU, Mosaic on TPU); interpreted only where Pallas cannot compile
    interpret = jax.default_backend() not in ("gpu", "tpu")
    prov = provenance()
    device = f"{prov['device_kind']} ({prov['backend']}{', Pallas interpreted' if interpret else ''})"
    rows = []
    key = jax.random.key(0)
    for k, n in SHAPES:
        for m in TOKENS:
            kk, nn, mm = k // a.scale, n // a.scale, max(1, m // a.scale)
            tune = not (interpret or a.no_tune)
            r = bench_case(kk, nn, mm, a.reps, interpret, jax.random.fold_in(key, len(rows)), tune)
            rows.append(r)
            print(f"{kk}x{nn} M={mm}: " + ", ".join(f"{q} {v:.2f}x" for q, v in r["speedup_vs_bf16"].items()))
    out = Path(a.out)
    md = table(rows, device)
    write_table(out, md)
    plot(rows, out / "ratios.png", device)
    write_record(
        out / "results.json",
        {"rows": rows, "config": {"scale": a.scale, "reps": a.reps, "interpret": interpret}, "provenance": prov},
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
