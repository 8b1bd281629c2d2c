"""Exact parameter and optimizer-state bytes for llama_60m … llama_7b (jax.eval_shape, nothing allocated).

    python experiments/optim_memory.py [--out DIR]

Parameters in BF16 (as in the GaLore paper's memory estimate); optimizers built exactly as the
training loop builds them (`optim.name` = adamw, adamw8bit, galore_adamw, galore_adamw8bit) with
the paper's GaLore ranks, applied to the attention/MLP kernels only. Printed next to the paper's
Table 2 figures (params + optimizer state, and optimizer state alone, in GB = 1e9 bytes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
from _report import markdown_table, write_results, write_table

from lowrank_jax.config import load_config, replace
from lowrank_jax.models import abstract_params, count_bytes, count_params
from lowrank_jax.train.optimizer import make_optimizer

HERE = Path(__file__).resolve().parent
CONFIGS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}
OPTIMIZERS = ("adamw", "adamw8bit", "galore_adamw", "galore_adamw8bit")
# GaLore paper, Table 2 (BF16 estimate): params + optimizer state, and optimizer state alone (GB).
PAPER_TOTAL = {
    "adamw": {"llama_60m": 0.36, "llama_130m": 0.76, "llama_350m": 2.06, "llama_1b": 7.80},
    "galore_adamw": {"llama_60m": 0.24, "llama_130m": 0.52, "llama_350m": 1.22, "llama_1b": 4.38},
}
PAPER_STATE = {
    "adamw": {"llama_60m": 0.23, "llama_130m": 0.51, "llama_350m": 1.37, "llama_1b": 5.20},
    "galore_adamw": {"llama_60m": 0.13, "llama_130m": 0.28, "llama_350m": 0.54, "llama_1b": 1.78},
}


def measure(name: str, rank: int, optimizer: str) -> dict:
    cfg = load_config(name)
    cfg = replace(cfg, model__param_dtype="bfloat16", optim__name=optimizer, galore__rank=rank)
    _, params = abstract_params(cfg.model)
    tx, _ = make_optimizer(cfg, params)
    state = jax.eval_shape(tx.init, params)
    return {
        "config": name,
        "optimizer": optimizer,
        "rank": rank if optimizer.startswith("galore") else None,
        "params": count_params(params),
        "param_bytes": count_bytes(params),
        "state_bytes": count_bytes(state),
    }


def table(rows: list[dict]) -> str:
    header = (
        "config | optimizer | params | param bytes (bf16) | optimizer state | params + state"
        " | paper params + state | paper state"
    )
    cells = []
    for r in rows:
        total = (r["param_bytes"] + r["state_bytes"]) / 1e9
        paper_total = PAPER_TOTAL.get(r["optimizer"], {}).get(r["config"])
        paper_state = PAPER_STATE.get(r["optimizer"], {}).get(r["config"])
        rank = f" (r={r['rank']})" if r["rank"] else ""
        cells.append(
            [
                r["config"],
                f"{r['optimizer']}{rank}",
                f"{r['params'] / 1e6:,.1f}M",
                f"{r['param_bytes'] / 1e9:.2f} GB",
                f"{r['state_bytes'] / 1e9:.2f} GB",
                f"{total:.2f} GB",
                f"{paper_total:.2f} GB" if paper_total else "-",
                f"{paper_state:.2f} GB" if paper_state else "-",
            ]
        )
    return markdown_table(header, cells)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--out", default=str(HERE / "results" / "optim_memory"))
    args = p.parse_args(argv)
    rows = [measure(c, CONFIGS[c], o) for c in args.configs for o in OPTIMIZERS]
    md = table(rows)
    print(md)
    out = Path(args.out)
    write_table(out, md)
    write_results(out, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
