"""Regenerate the results tables in README.md and docs/*.md from the records under experiments/results/.

A table lives between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` markers, in README.md and in
every docs/*.md page that has them. The tables made here (not copied from another script's
``experiments/results/NAME/table.md``) are also written to ``experiments/results/NAME.md``. Never edit
them by hand.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from _report import counts_text, markdown_table, write_table
from stats import p_text

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
DOCS = HERE.parent / "docs"


# ReLoRA paper Table 6 (130M, validation perplexity) next to the sweep recipe that mirrors each row.
RELORA_ABLATION = [
    ("lora", "LoRA (no restarts)", "-", "-", "-", "-", "34.17"),
    ("relora_restarts", "+ restarts", "yes", "-", "-", "-", "34.25"),
    ("relora_restarts_reset", "+ restarts + optimizer reset", "yes", "yes", "-", "-", "diverged"),
    ("relora_restarts_jagged", "+ restarts + jagged schedule", "yes", "-", "yes", "-", "34.29"),
    ("relora", "+ restarts + reset + jagged (ReLoRA, no warm start)", "yes", "yes", "yes", "-", "29.77"),
    ("lora_warm", "warm start + LoRA (no restarts)", "-", "-", "at switch", "yes", "25.46"),
    ("relora_warm", "ReLoRA (warm start + restarts + reset + jagged)", "yes", "yes", "yes", "yes", "25.04"),
    ("relora_warm_split", "ReLoRA, warm start at AdamW's lr 0.001", "yes", "yes", "yes", "yes", "-"),
    ("adamw", "full-rank AdamW", "-", "-", "-", "-", "23.65"),
]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def _lr(r: dict) -> str:
    """The grid's chosen lr, and the long runs' where the sweep's lr check moved them."""
    moved = r.get("long_lr") not in (None, r["chosen_lr"])
    return f"{r['chosen_lr']:g} → {r['long_lr']:g}" if moved else f"{r['chosen_lr']:g}"


def relora_ablation_table() -> str:
    """ReLoRA's ablation at tiny scale from the comparison harness's records (experiments/results/sweep).

    Every row is a sweep recipe under the same protocol, tuned the same way (its own lr grid, best on
    validation loss); ratios divide by tuned full-rank AdamW at the same budget, evaluated on the same
    validation tokens (the sweep's paired ratio). A row the sweep marks stale or has not finished says
    so instead of showing a number.
    """
    recs = _sweep_records()
    base = recs.get("adamw", {})
    rows = []
    for name, label, restarts, reset, jagged, warm, paper in RELORA_ABLATION:
        r = recs.get(name)
        if not r or r["stale"] or r["short_ppl"] is None:
            why = "not run" if not r else f"STALE: {'; '.join(r['stale'])}" if r["stale"] else "grid incomplete"
            rows.append([name, label, restarts, reset, jagged, warm, "-", "-", "-", "-", "-", "-", paper, why])
            continue
        short_ratio = (
            f"{r['short_ppl'] / base['short_ppl']:.3f}" if base.get("short_ppl") and not base["stale"] else "-"
        )
        # the sweep's ratio: set once the row and AdamW have every seed on the same evaluation
        long_ratio = f"{r['ratio']:.3f}" if r.get("ratio") and not base.get("stale") else "-"
        rows.append(
            [
                name,
                label,
                restarts,
                reset,
                jagged,
                warm,
                _lr(r),
                f"{r['short_ppl']:.2f}",
                short_ratio,
                f"{r['pending_runs']} runs pending" if r.get("pending_runs") else _mean_std(r["long_ppl"]),
                long_ratio,
                counts_text(r.get("eval_tokens", [])),
                paper,
                ", ".join(r["commits"]),
            ]
        )
    header = (
        "recipe | variant | restarts | reset | jagged lr | warm start | chosen lr | short ppl | ÷ adamw (short)"
        " | long ppl (mean ± std) | ÷ adamw (long, same eval) | eval tokens | paper 130M ppl | commits"
    )
    return markdown_table(header, rows)


# The README's headline: the methods a reader compares first, from the sweep's long-budget runs.
HEADLINE = [
    ("adamw", "AdamW (full rank)"),
    ("galore", "GaLore"),
    ("galore8bit", "GaLore, 8-bit Adam"),
    ("golore", "GoLore"),
    ("apollo", "APOLLO"),
    ("apollo_mini", "APOLLO-Mini"),
    ("fira", "Fira"),
    ("q_galore", "Q-GaLore"),
    ("swan", "SWAN"),
    ("ldadam", "LDAdam"),
    ("lora", "LoRA"),
    ("relora", "ReLoRA"),
    ("relora_warm", "ReLoRA, warm start"),
    ("sl", "SLTrain"),
    ("bitlinear", "BitLinear (ternary)"),
]


def _sweep_records() -> dict:
    p = HERE / "results" / "sweep" / "results.json"
    return json.loads(p.read_text())["recipes"] if p.is_file() else {}


def sweep_headline_table() -> str:
    """Long-budget perplexity (mean ± std over the seeds), its ratio to AdamW's and the optimizer state of the
    headline methods, from the comparison harness's records (experiments/results/sweep/results.json)."""
    recs = _sweep_records()
    base_ok = not recs.get("adamw", {}).get("stale", True)
    rows = []
    for name, label in HEADLINE:
        r = recs.get(name)
        if not r or r["stale"] or not r["long_ppl"]:
            why = "not run" if not r else "STALE" if r["stale"] else "runs pending"
            rows.append([label, f"`{name}`", why, "-", "-", "-"])
            continue
        # the sweep's ratio pairs each row with AdamW evaluated on the same tokens, never across evaluations
        ratio = f"{r['ratio']:.3f}" if base_ok and r.get("ratio") else "-"
        state = f"{r['optimizer_state_bytes'] / 2**20:.2f} MiB" if r["optimizer_state_bytes"] is not None else "-"
        ppl = _mean_std(r["long_ppl"])
        if r.get("long_ppl_lr") not in (None, r.get("long_lr")):  # the lr check moved it; the new runs are pending
            ppl += f" (lr {r['long_ppl_lr']:g}; at {r['long_lr']:g}: pending)"
        rows.append([label, f"`{name}`", ppl, ratio, counts_text(r.get("eval_tokens", [])), state])
    header = "method | recipe | long ppl (mean ± std) | ÷ adamw (same eval) | eval tokens | optimizer state"
    return markdown_table(header, rows)


def sweep_comparisons_table() -> str:
    """The protocol's pairings beyond the baseline (``comparisons`` in experiments/recipes/protocol.yaml), from
    the comparison harness's records: each row's long runs against another recipe's of the same seeds, on the
    same validation tokens."""
    rows = []
    for name, r in _sweep_records().items():
        for other, p in (r.get("compared") or {}).items():
            if p is None:
                rows.append([f"`{name}`", f"`{other}`", "-", "-", "not both on record", "-", "-"])
                continue
            evals = counts_text(sorted({pair[1] for pair in p["pairs"]}))
            diff = f"{p['mean_diff']:+.4f} ± {p['ci'][1] - p['mean_diff']:.4f}"
            ratio = f"{p['ratio']:.3f} ({p['ratio_ci'][0]:.3f}–{p['ratio_ci'][1]:.3f})"
            rows.append([f"`{name}`", f"`{other}`", str(p["n"]), evals, diff, ratio, p_text(p["p"])])
    header = "recipe | versus | seeds | eval tokens | Δ loss (95% CI) | ppl ratio (95% CI) | p"
    return markdown_table(header, rows)


def _copied(name: str):
    """A table another script wrote into experiments/results/NAME/table.md."""

    def read() -> str:
        p = HERE / "results" / name / "table.md"
        return p.read_text().strip() if p.is_file() else "(not generated yet)"

    return read


TABLES = {
    "optim_memory": _copied("optim_memory"),
    "method_api": _copied("method_api"),
    "bench_optim": _copied("bench_optim"),
    "relora_ablation": relora_ablation_table,
    "noise_step_mnist": _copied("noise_step_mnist"),
    "sl_memory": _copied("sl_memory"),
    "memory_7b": _copied("memory_7b"),
    "bench_frameworks": _copied("bench_frameworks"),
    "cpu_ablation": _copied("cpu_ablation"),
    "sweep": _copied("sweep"),
    "galore_gap": _copied("galore_gap"),
    "sweep_headline": sweep_headline_table,
    "sweep_comparisons": sweep_comparisons_table,
}
# made here: also written to experiments/results/NAME.md
GENERATED = ("relora_ablation", "sweep_headline", "sweep_comparisons")


def fill(text: str, tables: dict[str, str]) -> str:
    """``text`` with the content between each table's markers replaced by the table."""
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
    return text


def pages() -> list[Path]:
    """README.md and the docs pages, where they exist."""
    return [p for p in [README, *sorted(DOCS.glob("*.md"))] if p.is_file()]


def main() -> None:
    tables = {name: fn() for name, fn in TABLES.items()}
    for name in GENERATED:
        write_table(HERE / "results", tables[name], f"{name}.md")
    for page in pages():
        text = page.read_text()
        new = fill(text, tables)
        if new != text:
            page.write_text(new)


if __name__ == "__main__":
    main()
