"""Train a named config (default ``tiny``) and file its records under experiments/results/NAME/.

    python experiments/run_tiny.py --name tiny_full [key=value ...]

Copies results.json, metrics.jsonl and loss.png of the run (not its checkpoints) into
``experiments/results/NAME`` and then regenerates the README tables (make_tables.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from make_tables import main as make_tables

from lowrank_jax.config import ConfigError, load_config
from lowrank_jax.train.loop import train

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="results folder name, e.g. tiny_full")
    p.add_argument("--config", default="tiny")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    run_dir = Path("runs") / "experiments" / args.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    try:
        cfg = load_config(args.config, [*args.overrides, f"out_dir={run_dir}"])
        train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dest = HERE / "results" / args.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "metrics.jsonl", "loss.png"):
        shutil.copy2(run_dir / name, dest / name)
    make_tables()
    return 0


if __name__ == "__main__":
    sys.exit(main())
