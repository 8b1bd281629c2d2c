"""SLTrain matmul benchmark: Pallas kernel vs materialise-then-matmul vs a dense matmul, side by side.

    python experiments/bench_sl_matmul.py [--reduced] [--tokens 4096 8192 16384] [--out DIR]

Shapes of LLaMA-1B's MLP (SLTrain, Han et al., NeurIPS 2024, arXiv 2406.02214): ``in × out`` =
2048 × 5461 (gate/up) and 5461 × 2048 (down), rank 512, density 0.03, bf16 activations, float32
parameters. For each token count M, in one process:

* ``dense``   — ``x @ W`` with a given dense bf16 W (the full-rank layer's cost; not an SL method);
* ``naive``   — materialise W, matmul, plain autodiff (keeps W for the backward);
* ``xla``     — materialise W, matmul, the paper's custom VJP (W recomputed in the backward);
* ``bf16w``   — the same with W built in the activations' dtype and default-precision GEMMs (the
  official SLTrain code's bf16 path; ``auto`` on GPUs);
* ``pallas``  — the fused kernels, low-rank part factored (``s·(x A) B`` plus sparse tiles built
  on chip: W never exists);
* ``pallas_tile`` — the fused kernels building every W tile ``A_t B_t s + S_t`` on chip.

Per variant: forward and forward+backward time (median of ``--repeats`` runs after warm-up) and
XLA ``memory_analysis`` of the compiled forward+backward (temp bytes and the peak estimate
arguments + outputs + temp − aliased). Ratios are relative to ``xla`` (the paper's method).
On CPU the Pallas kernels run in interpret mode: their times mean nothing, so ``--reduced``
(the default on CPU) shrinks the shapes and the run checks correctness (max relative error of
y and every gradient against the naive reference); GPU/TPU runs use the full shapes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _report import markdown_table, median_seconds, save_figure, subplots, write_results, write_table

from lowrank_jax.train.step import compiled_memory
from pallas_kernels.sl_matmul.api import sl_matmul
from pallas_kernels.sl_matmul.reference import materialize_w, sl_matmul_reference
from pallas_kernels.sl_matmul.xla import sl_matmul_bf16w

HERE = Path(__file__).resolve().parent
FULL = {"shapes": [(2048, 5461), (5461, 2048)], "rank": 512, "tokens": [4096, 8192, 16384]}
REDUCED = {"shapes": [(256, 683), (683, 256)], "rank": 64, "tokens": [256, 512]}
VARIANTS = ("dense", "naive", "xla", "bf16w", "pallas", "pallas_tile")


def operands(k: int, n: int, rank: int, m: int, density: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    nnz = round(density * k * n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    a = jnp.asarray(rng.uniform(-1, 1, (k, rank)) / np.sqrt(k), jnp.float32)
    b = jnp.asarray(rng.standard_normal((rank, n)) * 0.02, jnp.float32)
    idx = jnp.asarray(np.sort(rng.choice(k * n, nnz, replace=False)), jnp.int32)
    values = jnp.asarray(rng.uniform(-1, 1, nnz) / np.sqrt(k), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    return x, a, b, values, idx, dy


def variant_fn(name: str, scale: float, interpret: bool):
    """``f(x, a, b, values, idx) -> y`` for a variant (dense: ``a`` is the dense W, b/values unused)."""
    if name == "dense":
        return lambda x, w, b, v, i: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    if name == "naive":
        return lambda x, a, b, v, i: sl_matmul_reference(x, a, b, v, i, scale)
    if name == "xla":
        return lambda x, a, b, v, i: sl_matmul(x, a, b, v, i, scale, implementation="xla")
    if name == "bf16w":
        return lambda x, a, b, v, i: sl_matmul_bf16w(x, a, b, v, i, scale)
    lowrank = {"pallas": "factored", "pallas_tile": "tile"}[name]
    kw = dict(implementation="pallas", interpret=interpret, lowrank=lowrank)
    return lambda x, a, b, v, i: sl_matmul(x, a, b, v, i, scale, **kw)


def bench_shape(k: int, n: int, rank: int, m: int, density: float, repeats: int, interpret: bool) -> list[dict]:
    scale = 16.0 / rank  # any constant; the paper's alpha/r
    x, a, b, values, idx, dy = operands(k, n, rank, m, density)
    w_dense = materialize_w(a, b, values, idx, scale, jnp.bfloat16)
    rows, outs = [], {}
    for name in VARIANTS:
        f = variant_fn(name, scale, interpret)
        first = w_dense if name == "dense" else a

        def fwd_bwd(x, p, b, v, i, dy, f=f):
            y, vjp = jax.vjp(lambda x, p, b, v: f(x, p, b, v, i), x, p, b, v)
            return (y, *vjp(dy))

        args = (x, first, b, values, idx)
        fwd = jax.jit(f).lower(*args).compile()
        both = jax.jit(fwd_bwd).lower(*args, dy).compile()
        mem = compiled_memory(both)
        outs[name] = [np.asarray(o, np.float64) for o in both(*args, dy)]
        rows.append(
            {
                "shape": f"{k}x{n}",
                "tokens": m,
                "variant": name,
                "fwd_s": median_seconds(fwd, *args, repeats=repeats),
                "fwd_bwd_s": median_seconds(both, *args, dy, repeats=repeats),
                "fwd_bwd_temp_bytes": mem.get("temp_size_in_bytes"),
                "fwd_bwd_peak_bytes": mem.get("peak_estimate_bytes"),
                "fwd_memory": compiled_memory(fwd),
            }
        )
    ref = outs["naive"]
    for r in rows:
        if r["variant"] in ("xla", "bf16w", "pallas", "pallas_tile"):
            got = outs[r["variant"]]
            r["max_rel_err"] = {
                nm: float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
                for nm, g, w in zip(("y", "dx", "da", "db", "dvalues"), got, ref, strict=True)
            }
    return rows


def _mib(v: int | None) -> str:
    return f"{v / 2**20:,.1f} MiB" if v is not None else "-"


def table(rows: list[dict]) -> str:
    header = (
        "shape (in×out) | tokens | variant | fwd ms | fwd+bwd ms | fwd+bwd vs xla | temp (fwd+bwd) | peak est."
        " | max rel. err vs naive (y, dx, dA, dB, dvalues)"
    )
    base = {(r["shape"], r["tokens"]): r for r in rows if r["variant"] == "xla"}
    cells = []
    for r in rows:
        b = base[(r["shape"], r["tokens"])]
        err = r.get("max_rel_err")
        cells.append(
            [
                r["shape"],
                r["tokens"],
                r["variant"],
                f"{1e3 * r['fwd_s']:.2f}",
                f"{1e3 * r['fwd_bwd_s']:.2f}",
                f"{r['fwd_bwd_s'] / b['fwd_bwd_s']:.2f}×",
                _mib(r["fwd_bwd_temp_bytes"]),
                _mib(r["fwd_bwd_peak_bytes"]),
                ", ".join(f"{v:.1e}" for v in err.values()) if err else "-",
            ]
        )
    return markdown_table(header, cells)


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = subplots(1, 2, figsize=(10, 4))
    for v in VARIANTS:
        sel = [r for r in rows if r["variant"] == v]
        labels = [f"{r['shape']}\nM={r['tokens']}" for r in sel]
        axes[0].plot(labels, [1e3 * r["fwd_bwd_s"] for r in sel], marker="o", label=v)
        axes[1].plot(labels, [(r["fwd_bwd_peak_bytes"] or 0) / 2**20 for r in sel], marker="o", label=v)
    axes[0].set_ylabel("forward + backward (ms, median)")
    axes[1].set_ylabel("XLA peak estimate (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"SLTrain matmul on {jax.devices()[0].device_kind}")
    save_figure(fig, path, axes, legend=True, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reduced", action="store_true", help="small shapes (default on CPU, where Pallas interprets)")
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--density", type=float, default=0.03)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "bench_sl_matmul"))
    args = p.parse_args(argv)
    backend = jax.default_backend()
    interpret = backend == "cpu"
    setup = REDUCED if (args.reduced or interpret) else FULL
    tokens = args.tokens or setup["tokens"]
    rows = []
    for k, n in setup["shapes"]:
        for m in tokens:
            rows += bench_shape(k, n, setup["rank"], m, args.density, args.repeats, interpret)
    md = table(rows)
    note = f"{jax.devices()[0].device_kind} ({backend}); rank {setup['rank']}, density {args.density}, bf16 x; " + (
        "Pallas in interpret mode: its times are not kernel speed." if interpret else "compiled Pallas kernels."
    )
    print(note)
    print(md)
    out = Path(args.out)
    write_table(out, note + "\n\n" + md)
    plot(rows, out / "bench.png")
    write_results(out, {"rows": rows, "setup": setup, "density": args.density, "interpret": interpret})
    return 0


if __name__ == "__main__":
    sys.exit(main())
