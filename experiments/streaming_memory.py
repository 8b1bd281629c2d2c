"""Host memory of training from token shards is flat in corpus size; the first step comes soon after start.

    python experiments/streaming_memory.py [--sizes-mb 20 200] [--steps 50] [--work /tmp/lrj_streaming]

For each size a synthetic text corpus is generated (``--work``/corpus-<N>mb/, files of 0.5 MB of
Zipf-distributed words from a fixed lexicon; file ``i`` is the same in every size, so the smaller
corpus is a prefix of the larger), then three child processes run one after the other, each measured
with ``os.wait4`` (peak resident set size of that process alone) and wall time:

1. ``lowrank-jax prepare tiny data.source=files data.paths=... data.shards=...``;
2. ``lowrank-jax train tiny data.shards=... steps=--steps`` (results.json gives the time from start
   to the first step's loss, compile included);
3. the in-memory path the analyses use (:func:`lowrank_jax.data.prepare_data`: corpus and token
   streams in memory), for contrast.

Writes ``results.json`` and ``table.md`` to ``--out`` (default ``experiments/results/streaming_memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _report import markdown_table, write_results, write_table

FILE_BYTES = 500_000
LEXICON = 20_000


def _lexicon(rng: np.random.Generator) -> np.ndarray:
    lengths = rng.integers(2, 10, size=LEXICON)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = np.linspace(2.0, 0.2, letters.size)
    p /= p.sum()
    return np.array(["".join(rng.choice(letters, size=n, p=p)) for n in lengths])


def generate_corpus(directory: Path, size_mb: int) -> list[str]:
    """``size_mb`` MB of text in 0.5 MB files (deterministic: file i is seeded by i); returns the glob."""
    directory.mkdir(parents=True, exist_ok=True)
    words = _lexicon(np.random.default_rng(0))
    n_files = max(1, size_mb * 1_000_000 // FILE_BYTES)
    for i in range(n_files):
        path = directory / f"doc-{i:04d}.txt"
        if path.is_file() and path.stat().st_size >= FILE_BYTES:
            continue
        rng = np.random.default_rng([1, i])
        parts, size = [], 0
        while size < FILE_BYTES:
            ids = np.minimum(rng.zipf(1.2, size=12_000), LEXICON) - 1
            text = " ".join(words[ids])
            sentences = text.split(" the ")
            para = ". ".join(s.capitalize() for s in sentences) + ".\n\n"
            parts.append(para)
            size += len(para)
        path.write_text("".join(parts)[:FILE_BYTES])
    return [str(directory / "*.txt")]


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd``; its wall time, exit status and peak RSS (MiB) from ``os.wait4`` (this child only)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}")
    return {"wall_s": time.time() - t0, "peak_rss_mib": usage.ru_maxrss / 1024, "output_tail": out[-600:]}


IN_MEMORY = """
import sys
from lowrank_jax.config import load_config
from lowrank_jax.data import prepare_data
cfg = load_config("tiny", sys.argv[1:])
data = prepare_data(cfg.data)
print(data.train.size, data.val.size)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[20, 200])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="training runs per size (the median is tabled)")
    p.add_argument("--work", default="/tmp/lrj_streaming")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "streaming_memory"))
    args = p.parse_args()
    work = Path(args.work)
    cli = [sys.executable, "-m", "lowrank_jax.train.cli"]
    rows, records = [], {}
    for size in args.sizes_mb:
        paths = generate_corpus(work / f"corpus-{size}mb", size)
        corpus_bytes = sum(f.stat().st_size for f in (work / f"corpus-{size}mb").glob("*.txt"))
        cache = str(work / f"cache-{size}mb")
        shards = work / f"shards-{size}mb"
        source = ["data.source=files", f"data.paths={paths[0]}", f"data.cache_dir={cache}"]
        if not (shards / "manifest.json").is_file():
            prep = run_measured([*cli, "prepare", "tiny", *source, f"data.shards={shards}"])
        else:  # pragma: no cover - a re-run reuses the shards; prepare figures come from the first run
            prep = {"wall_s": float("nan"), "peak_rss_mib": float("nan"), "output_tail": "reused"}
        manifest = json.loads((shards / "manifest.json").read_text())
        runs = []
        for r in range(args.repeats):
            run_dir = work / f"run-{size}mb-{int(time.time())}-{r}"
            cmd = [*cli, "train", "tiny", f"data.shards={shards}", f"steps={args.steps}", "eval_every=0"]
            run = run_measured([*cmd, "progress=false", f"out_dir={run_dir}"])
            res = json.loads((run_dir / "results.json").read_text())
            runs.append({**run, "time_to_first_step_s": res["time_to_first_step_s"], "steps": res["steps"]})
        train = {
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "time_to_first_step_s": statistics.median(r["time_to_first_step_s"] for r in runs),
            "runs": runs,
        }
        mem = run_measured([sys.executable, "-c", IN_MEMORY, *source])
        records[f"{size}mb"] = {
            "corpus_bytes": corpus_bytes,
            "train_tokens": manifest["splits"]["train"]["tokens"],
            "prepare": prep,
            "train": train,
            "in_memory_prepare_data": mem,
        }
        each = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in runs)
        rows.append(
            [
                f"{corpus_bytes / 1e6:.0f} MB",
                f"{manifest['splits']['train']['tokens'] / 1e6:.1f}M",
                f"{prep['wall_s']:.0f} s / {prep['peak_rss_mib']:.0f} MiB",
                f"{train['peak_rss_mib']:.0f} MiB ({each})",
                f"{train['time_to_first_step_s']:.1f} s",
                f"{mem['peak_rss_mib']:.0f} MiB",
            ]
        )
        print(rows[-1], flush=True)
    sizes = [f"{s}mb" for s in args.sizes_mb]
    spread = max(records[s]["train"]["peak_rss_mib"] for s in sizes) - min(
        records[s]["train"]["peak_rss_mib"] for s in sizes
    )
    md = markdown_table(
        f"corpus | train tokens | prepare (wall / peak RSS) | train {args.steps} steps: peak RSS, median (runs) | "
        "start to first step | in-memory prepare_data: peak RSS",
        rows,
    )
    md += f"\n\nPeak RSS of the {args.steps}-step runs differs by {spread:.0f} MiB across corpus sizes."
    write_results(args.out, {"sizes": records, "train_peak_rss_spread_mib": spread, "steps": args.steps})
    write_table(args.out, md)
    print(md)


if __name__ == "__main__":
    main()
