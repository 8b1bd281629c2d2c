"""Regenerate the README's results tables from experiments/results/*/results.json.

Tables live between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` markers in README.md and
are also written to experiments/results/NAME.md. Never edit them by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"


def _load(name: str) -> dict | None:
    p = HERE / "results" / name / "results.json"
    return json.loads(p.read_text()) if p.is_file() else None


def tiny_table() -> str:
    """The `tiny` pretraining runs: one row per results folder whose name starts with ``tiny``."""
    rows = []
    base = _load("tiny_full")
    for d in sorted((HERE / "results").glob("tiny*/results.json")):
        r = json.loads(d.read_text())
        ratio = f"{r['final_val_ppl'] / base['final_val_ppl']:.3f}" if base else "-"
        rows.append(
            f"| {d.parent.name} | {r['config']['optim']['name']} | {r['config']['model']['dense']} | "
            f"{r['params'] / 1e6:.2f}M | {r['optimizer_state_bytes'] / 2**20:.1f} MiB | {r['tokens']:,} | "
            f"{r['final_val_ppl']:.2f} | {ratio} | {r['unigram_val_ppl']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['device_kind']} |"
        )
    head = (
        "| run | optimizer | dense | params | optimizer state | tokens | val ppl | ppl / full | unigram ppl "
        "| tokens/s | device |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows)


TABLES = {"tiny": tiny_table}


def main() -> None:
    text = README.read_text() if README.is_file() else ""
    for name, fn in TABLES.items():
        table = fn()
        (HERE / "results" / f"{name}.md").write_text(table + "\n")
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
    if text:
        README.write_text(text)


if __name__ == "__main__":
    main()
