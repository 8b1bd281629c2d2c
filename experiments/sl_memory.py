"""SLTrain parameter and optimizer-state bytes for llama_60m … llama_7b (jax.eval_shape, nothing allocated).

    python experiments/sl_memory.py [--out DIR]

SLTrain (Han et al., NeurIPS 2024, arXiv 2406.02214) with the paper's rank / alpha per size
(r = 128/256/256/512/1024, alpha = 32/16/16/8/8) and density δ = 0.03 (7B: 0.05), next to the dense
AdamW baseline measured exactly as ``experiments/optim_memory.py`` does (its ``measure``: BF16
parameters, optimizer built by the training loop's ``make_optimizer``). The SL optimizer is the same
AdamW over the trainable (floating) leaves only: the int32 support (``SLSupport``) gets no state,
as with the frozen partition in the training loop; its bytes are counted as "index bytes".
Printed next to the paper's parameter counts and its Fig. 3 measured memory (one A100, which also
includes activations and gradients — not comparable one-to-one with params + state).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from _report import markdown_table, save_figure, subplots, write_results, write_table
from optim_memory import measure

from lowrank_jax.config import load_config, replace
from lowrank_jax.models import abstract_params, count_bytes, count_params
from lowrank_jax.train.optimizer import make_optimizer

HERE = Path(__file__).resolve().parent
# config: (rank, alpha, density) from the SLTrain paper
SL_SETTINGS = {
    "llama_60m": (128, 32.0, 0.03),
    "llama_130m": (256, 16.0, 0.03),
    "llama_350m": (256, 16.0, 0.03),
    "llama_1b": (512, 8.0, 0.03),
    "llama_7b": (1024, 8.0, 0.05),
}
# Paper: parameter counts (full-rank → SLTrain), millions.
PAPER_PARAMS = {
    "llama_60m": (58.1, 43.5),
    "llama_130m": (134.1, 96.5),
    "llama_350m": (368.0, 194.3),
    "llama_1b": (1339.0, 646.0),
    "llama_7b": (6738.0, 3145.0),
}
# Paper Fig. 3: measured memory (GB) Adam / 8-bit per-layer GaLore / SLTrain.
PAPER_FIG3 = {"llama_350m": (4.5, 3.1, 2.2), "llama_1b": (16.3, 10.3, 6.8), "llama_7b": (67.4, 22.0, 18.3)}


def measure_sl(name: str) -> dict:
    rank, alpha, density = SL_SETTINGS[name]
    cfg = load_config(name)
    cfg = replace(
        cfg,
        model__param_dtype="bfloat16",
        model__dense="sl",
        model__sl_rank=rank,
        model__sl_alpha=alpha,
        model__sl_density=density,
        optim__name="adamw",
    )
    _, params = abstract_params(cfg.model)
    is_float = lambda x: jnp.issubdtype(x.dtype, jnp.floating)
    trainable = [x for x in jax.tree.leaves(params) if is_float(x)]
    index = [x for x in jax.tree.leaves(params) if not is_float(x)]
    tx, _ = make_optimizer(cfg, params)
    # Optimizer state of the trainable leaves: floating arrays and scalar counters. Integer arrays
    # would be moments of the support, which the training loop does not keep (frozen partition).
    state = [x for x in jax.tree.leaves(jax.eval_shape(tx.init, params)) if is_float(x) or x.ndim == 0]
    return {
        "config": name,
        "rank": rank,
        "alpha": alpha,
        "density": density,
        "params": count_params(trainable),
        "param_bytes": count_bytes(trainable),
        "index_entries": count_params(index),
        "index_bytes": count_bytes(index),
        "state_bytes": count_bytes(state),
    }


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def table(rows: list[dict]) -> str:
    header = (
        "config | r / alpha / δ | params: full → SL (ours) | paper | param bytes (bf16): full → SL"
        " | SL index bytes (int32) | AdamW state: full → SL | params + state + index: full → SL (saving)"
        " | paper Fig. 3 measured: Adam / 8-bit GaLore / SLTrain"
    )
    cells = []
    for r in rows:
        f, s = r["full"], r["sl"]
        tot_f = f["param_bytes"] + f["state_bytes"]
        tot_s = s["param_bytes"] + s["state_bytes"] + s["index_bytes"]
        pp = PAPER_PARAMS[r["config"]]
        fig = PAPER_FIG3.get(r["config"])
        cells.append(
            [
                r["config"],
                f"{s['rank']} / {s['alpha']:g} / {s['density']:g}",
                f"{f['params'] / 1e6:,.1f}M → {s['params'] / 1e6:,.1f}M",
                f"{pp[0]:,.1f}M → {pp[1]:,.1f}M",
                f"{_gb(f['param_bytes'])} → {_gb(s['param_bytes'])}",
                f"{s['index_bytes'] / 1e6:,.1f} MB",
                f"{_gb(f['state_bytes'])} → {_gb(s['state_bytes'])}",
                f"{_gb(tot_f)} → {_gb(tot_s)} (−{100 * (1 - tot_s / tot_f):.0f}%)",
                " / ".join(f"{v:g}" for v in fig) + " GB" if fig else "-",
            ]
        )
    return markdown_table(header, cells)


def plot(rows: list[dict], path: Path) -> None:
    names = [r["config"].removeprefix("llama_") for r in rows]
    x = range(len(rows))
    full = [(r["full"]["param_bytes"] + r["full"]["state_bytes"]) / 1e9 for r in rows]
    sl = [(r["sl"]["param_bytes"] + r["sl"]["state_bytes"] + r["sl"]["index_bytes"]) / 1e9 for r in rows]
    fig, ax = subplots(figsize=(7, 4))
    ax.bar([i - 0.2 for i in x], full, 0.4, label="full-rank AdamW (params + state)")
    ax.bar([i + 0.2 for i in x], sl, 0.4, label="SLTrain AdamW (params + state + index)")
    ax.set_xticks(list(x), names)
    ax.set_yscale("log")
    ax.set_ylabel("GB (1e9 bytes), bf16 params")
    ax.set_title("SLTrain parameter + optimizer-state memory (jax.eval_shape)")
    save_figure(fig, path, [ax], legend=True, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(SL_SETTINGS))
    p.add_argument("--out", default=str(HERE / "results" / "sl_memory"))
    args = p.parse_args(argv)
    rows = []
    for name in args.configs:
        full = measure(name, SL_SETTINGS[name][0], "adamw")
        rows.append({"config": name, "full": full, "sl": measure_sl(name), "paper_params_m": PAPER_PARAMS[name]})
        if name in PAPER_FIG3:
            fig3 = zip(("adam", "galore8bit_per_layer", "sltrain"), PAPER_FIG3[name], strict=True)
            rows[-1]["paper_fig3_gb"] = dict(fig3)
    md = table(rows)
    print(md)
    out = Path(args.out)
    write_table(out, md)
    plot(rows, out / "memory.png")
    write_results(out, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
