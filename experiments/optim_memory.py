"""Exact parameter and optimizer-state bytes for llama_60m … llama_7b (jax.eval_shape, nothing allocated).

    python experiments/optim_memory.py [--out DIR]

Parameters in BF16 (as in the GaLore paper's memory estimate); optimizers built exactly as the
training loop builds them (`optim.name` = adamw, adamw8bit, galore_adamw, galore_adamw8bit,
golore_adamw, fira_adamw, apollo_adamw, apollo_mini_adamw, swan, ldadamw, q_galore_adamw8bit) with the
ranks of each method's official recipe
(:data:`RANKS`), applied to the attention/MLP kernels only. Printed next to the papers' figures where they
give one (GaLore Table 2: params + optimizer state, and optimizer state alone; the APOLLO paper: 7B state),
in GB = 1e9 bytes. APOLLO stores no projection (it is regenerated from its seed), GaLore and Fira store
theirs; every low-rank moment has the param dtype (BF16) unless 8-bit. "of which blocks" is the state of
the transformer blocks alone: the rest is the embedding's and lm_head's full-size Adam, which every method
keeps (the APOLLO paper's 7B figure counts the low-rank states only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import jax
from _report import markdown_table, write_results, write_table

from lowrank_jax.config import load_config, replace
from lowrank_jax.models import abstract_params, count_bytes, count_params
from lowrank_jax.train.optimizer import make_optimizer

HERE = Path(__file__).resolve().parent
CONFIGS = ("llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")
OPTIMIZERS = (
    "adamw",
    "adamw8bit",
    "galore_adamw",
    "galore_adamw8bit",
    "golore_adamw",
    "fira_adamw",
    "apollo_adamw",
    "apollo_mini_adamw",
    "swan",
    "ldadamw",
    "q_galore_adamw8bit",
)
_GALORE_RANKS = (128, 256, 256, 512, 1024)  # GaLore paper Table 2 / 7B recipe
# optimizer -> (the config section holding its rank, rank per config in CONFIGS order), from the official recipes:
# Fira pre_training_c4/scripts/llama_*.sh; APOLLO scripts/pretrain_c4/llama_*_apollo{,_mini}.sh
RANKS = {
    "galore_adamw": ("galore", _GALORE_RANKS),
    "galore_adamw8bit": ("galore", _GALORE_RANKS),
    "golore_adamw": ("golore", _GALORE_RANKS),
    "fira_adamw": ("fira", (128, 256, 256, 512, 512)),
    "apollo_adamw": ("apollo", (128, 192, 256, 256, 256)),
    "apollo_mini_adamw": ("apollo_mini", (1, 1, 1, 1, 1)),
    "ldadamw": ("ldadam", _GALORE_RANKS),
    "q_galore_adamw8bit": ("q_galore", _GALORE_RANKS),
}
# GaLore paper, Table 2 (BF16 estimate): params + optimizer state, and optimizer state alone (GB).
PAPER_TOTAL = {
    "adamw": {"llama_60m": 0.36, "llama_130m": 0.76, "llama_350m": 2.06, "llama_1b": 7.80},
    "galore_adamw": {"llama_60m": 0.24, "llama_130m": 0.52, "llama_350m": 1.22, "llama_1b": 4.38},
}
# and the APOLLO paper's 7B state figures (APOLLO r=256: 1.6 GB, 8-bit GaLore: 4.9 GB, 8-bit Adam: 13 GB).
PAPER_STATE = {
    "adamw": {"llama_60m": 0.23, "llama_130m": 0.51, "llama_350m": 1.37, "llama_1b": 5.20},
    "adamw8bit": {"llama_7b": 13.0},
    "galore_adamw": {"llama_60m": 0.13, "llama_130m": 0.28, "llama_350m": 0.54, "llama_1b": 1.78},
    "galore_adamw8bit": {"llama_7b": 4.9},
    "apollo_adamw": {"llama_7b": 1.6},
}


def measure(name: str, optimizer: str) -> dict:
    section, ranks = RANKS.get(optimizer, (None, None))
    rank = None if ranks is None else ranks[CONFIGS.index(name)]
    cfg = replace(load_config(name), model__param_dtype="bfloat16", optim__name=optimizer)
    if section is not None:
        cfg = replace(cfg, **{f"{section}__rank": rank})
    _, params = abstract_params(cfg.model)
    tx, _ = make_optimizer(cfg, params)
    state = jax.eval_shape(tx.init, params)
    return {
        "config": name,
        "optimizer": optimizer,
        "rank": rank,
        "params": count_params(params),
        "param_bytes": count_bytes(params),
        "state_bytes": count_bytes(state),
        "block_state_bytes": count_bytes(_under_blocks(state)),
    }


def _under_blocks(state: Any) -> list:
    """The state leaves that belong to the transformer blocks (the attention/MLP kernels the methods wrap,
    and the blocks' norm scales), i.e. everything but the embedding's and lm_head's full-size Adam."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return [x for path, x in leaves if any(getattr(k, "key", None) == "blocks" for k in path)]


def table(rows: list[dict]) -> str:
    header = (
        "config | optimizer | params | param bytes (bf16) | optimizer state | of which blocks | params + state"
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
                f"{r['block_state_bytes'] / 1e9:.2f} GB",
                f"{total:.2f} GB",
                f"{paper_total:.2f} GB" if paper_total else "-",
                f"{paper_state:.2f} GB" if paper_state else "-",
            ]
        )
    return markdown_table(header, cells)


# The methods' four names (docs/methods.md): optim.name -> (method, complete optimizer, scale-by transform)
API = {
    "adamw": ("AdamW", "optax.adamw", "optax.scale_by_adam"),
    "adamw8bit": ("8-bit AdamW", "lrj.adamw_8bit", "lrj.scale_by_adam_8bit"),
    "galore_adamw": ("GaLore", "lrj.galore", "lrj.scale_by_galore"),
    "galore_adamw8bit": ("8-bit GaLore", "lrj.galore(eight_bit=True)", "lrj.scale_by_galore(base_optimizer=…)"),
    "golore_adamw": ("GoLore", "lrj.golore", "lrj.scale_by_golore"),
    "fira_adamw": ("Fira", "lrj.fira", "lrj.scale_by_fira"),
    "apollo_adamw": ("APOLLO", "lrj.apollo", "lrj.scale_by_apollo"),
    "apollo_mini_adamw": ("APOLLO-Mini", "lrj.apollo_mini", "lrj.scale_by_apollo_mini"),
    "swan": ("SWAN", "lrj.swan", "lrj.scale_by_swan"),
    "ldadamw": ("LDAdam", "lrj.ldadam", "lrj.scale_by_ldadam"),
    "q_galore_adamw8bit": ("Q-GaLore", "lrj.q_galore", "lrj.scale_by_q_galore"),
}


def api_table(rows: list[dict]) -> str:
    """Per method: its complete optimizer, scale-by transform, CLI name and state bytes per parameter at 7B."""
    at_7b = {r["optimizer"]: r for r in rows if r["config"] == "llama_7b"}
    cells = []
    for name, (method, complete, scale_by) in API.items():
        r = at_7b.get(name)
        per_param = f"{r['state_bytes'] / r['params']:.2f}" if r else "-"
        rank = f" (r={r['rank']})" if r and r["rank"] else ""
        cells.append([method, f"`{complete}`", f"`{scale_by}`", f"`optim.name={name}`", f"{per_param}{rank}"])
    header = "method | complete optimizer | scale-by transform | CLI / YAML | state bytes per parameter at 7B"
    return markdown_table(header, cells)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--out", default=str(HERE / "results" / "optim_memory"))
    p.add_argument("--api-out", default=str(HERE / "results" / "method_api"), help="the methods' names and 7B state")
    args = p.parse_args(argv)
    rows = [measure(c, o) for c in args.configs for o in OPTIMIZERS]
    md = table(rows)
    print(md)
    out = Path(args.out)
    write_table(out, md)
    write_results(out, {"rows": rows})
    if "llama_7b" in args.configs:
        api = api_table(rows)
        print(api)
        write_table(Path(args.api_out), api)
    return 0


if __name__ == "__main__":
    sys.exit(main())
