"""Regenerate the README's results tables from experiments/results/*/results.json.

Tables live between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` markers in README.md and
are also written to experiments/results/NAME.md. Never edit them by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from _report import markdown_table, write_table

from lowrank_jax.config import ModelConfig
from lowrank_jax.models import abstract_params, count_trainable, param_labels

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"


def _load(name: str) -> dict | None:
    p = HERE / "results" / name / "results.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _trainable(r: dict) -> int:
    """Trainable parameters of a run: recorded since the ReLoRA warm start; else counted from its config."""
    if "trainable_params" in r:
        return r["trainable_params"]
    cfg = ModelConfig(**r["config"]["model"])
    return count_trainable(abstract_params(cfg)[1], param_labels(cfg))


def tiny_table() -> str:
    """The `tiny` pretraining runs: one row per results folder whose name starts with ``tiny``.

    "ppl / best full" divides by the best full-rank AdamW run (dense layers, any learning rate), so
    each method is compared with a tuned baseline at equal tokens and seed.
    """
    runs = {d.parent.name: json.loads(d.read_text()) for d in sorted((HERE / "results").glob("tiny*/results.json"))}
    full = [
        r["final_val_ppl"]
        for r in runs.values()
        if r["config"]["optim"]["name"] == "adamw" and r["config"]["model"]["dense"] == "dense"
    ]
    best = min(full) if full else None
    rows = []
    for name, r in runs.items():
        c = r["config"]
        ratio = f"{r['final_val_ppl'] / best:.3f}" if best else "-"
        method = c["optim"]["name"]
        if method.startswith("galore"):
            g = c["galore"]
            method += f" r={g['rank']} T={g['update_proj_gap']} {g['refresh']}/{g['svd']}/{g['moments']}"
        if c["model"]["dense"] == "sl":
            m = c["model"]
            method += f" r={m['sl_rank']} alpha={m['sl_alpha']:g} density={m['sl_density']:g}"
        if c["model"]["dense"] in ("lora", "lowrank"):
            method += f" r={c['model']['lora_rank']}"
            rl = c.get("relora", {})
            if rl.get("warm_start"):
                method += f" warm start {rl['warm_start']}"
            if rl.get("every"):
                method += f" ReLoRA every={rl['every']} reset={rl['reset']}"
            if (rl.get("every") or rl.get("warm_start")) and not rl.get("jagged", True):
                method += " no jagged lr"
        rows.append(
            [
                name,
                method,
                c["model"]["dense"],
                f"{c['optim']['lr']:g}",
                f"{r['params'] / 1e6:.2f}M",
                f"{_trainable(r) / 1e6:.2f}M",
                f"{r['optimizer_state_bytes'] / 2**20:.1f} MiB",
                f"{r['tokens']:,}",
                f"{r['final_val_ppl']:.2f}",
                ratio,
                f"{r['unigram_val_ppl']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
            ]
        )
    header = (
        "run | optimizer | dense | lr | params | trainable | optimizer state | tokens | val ppl | ppl / best full"
        " | unigram ppl | tokens/s"
    )
    return markdown_table(header, rows)


# ReLoRA paper Table 6 (130M, validation perplexity) next to the tiny runs that mirror each row.
RELORA_ABLATION = [
    ("tiny_lora", "LoRA (no restarts)", "-", "-", "-", "-", "34.17"),
    ("tiny_relora_restarts", "+ restarts", "yes", "-", "-", "-", "34.25"),
    ("tiny_relora_restarts_reset", "+ restarts + optimizer reset", "yes", "yes", "-", "-", "diverged"),
    ("tiny_relora_restarts_jagged", "+ restarts + jagged schedule", "yes", "-", "yes", "-", "34.29"),
    ("tiny_relora", "+ restarts + reset + jagged (ReLoRA, no warm start)", "yes", "yes", "yes", "-", "29.77"),
    ("tiny_lora_warm", "warm start + LoRA (no restarts)", "-", "-", "at switch", "yes", "25.46"),
    ("tiny_relora_warm", "ReLoRA (warm start + restarts + reset + jagged)", "yes", "yes", "yes", "yes", "25.04"),
]


def relora_ablation_table() -> str:
    """ReLoRA's ablation at tiny scale: each row's val ppl and its ratio to the best full-rank run."""
    full = [
        json.loads(p.read_text())
        for p in sorted((HERE / "results").glob("tiny_full*/results.json"))
        if json.loads(p.read_text())["config"]["optim"]["name"] == "adamw"
    ]
    best = min((r["final_val_ppl"] for r in full), default=None)
    rows = []
    for name, label, restarts, reset, jagged, warm, paper in RELORA_ABLATION:
        r = _load(name)
        ppl = f"{r['final_val_ppl']:.2f}" if r else "(not run)"
        ratio = f"{r['final_val_ppl'] / best:.3f}" if r and best else "-"
        rows.append([name, label, restarts, reset, jagged, warm, ppl, ratio, paper])
    if best:
        rows.append(["best full-rank", "AdamW", "-", "-", "-", "-", f"{best:.2f}", "1.000", "23.65"])
    header = "run | variant | restarts | reset | jagged lr | warm start | val ppl | / best full-rank | paper 130M ppl"
    return markdown_table(header, rows)


def _copied(name: str):
    """A table another script wrote into experiments/results/NAME/table.md."""

    def read() -> str:
        p = HERE / "results" / name / "table.md"
        return p.read_text().strip() if p.is_file() else "(not generated yet)"

    return read


TABLES = {
    "tiny": tiny_table,
    "optim_memory": _copied("optim_memory"),
    "bench_optim": _copied("bench_optim"),
    "relora_ablation": relora_ablation_table,
    "noise_step_mnist": _copied("noise_step_mnist"),
    "sl_memory": _copied("sl_memory"),
    "memory_7b": _copied("memory_7b"),
    "bench_frameworks": _copied("bench_frameworks"),
    "cpu_ablation": _copied("cpu_ablation"),
    "sweep": _copied("sweep"),
}


def main() -> None:
    text = README.read_text() if README.is_file() else ""
    for name, fn in TABLES.items():
        table = fn()
        if name in ("tiny", "relora_ablation"):
            write_table(HERE / "results", table, f"{name}.md")
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
    if text:
        README.write_text(text)


if __name__ == "__main__":
    main()
