"""Per-device train-step memory of llama_7b for every method, on 1 device and on 8 (FSDP), from XLA.

    python experiments/memory_7b.py [--out DIR] [--quick]

Each row runs ``lowrank-jax memory llama_7b method=... --no-licm --devices 8`` in a fresh process:
the train step is lowered and compiled ahead of time on abstract inputs (nothing is allocated) and
XLA's ``memory_analysis()`` gives arguments (params + optimizer state + batch), temporaries and the
peak estimate per device. BF16 parameters, sequence 256, one sequence per device per step (the
memory of the per-layer mode does not depend on the number of accumulated micro-batches beyond
their activations). Compiled for the CPU backend (the table needs no accelerator) with
loop-invariant code motion off (see lowrank_jax.train.memory). Writes results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _report import markdown_table, write_results, write_table

HERE = Path(__file__).resolve().parent
GIB = 2**30
# (label, overrides); method presets are lowrank_jax.train.memory.METHODS
ROWS = [
    ("AdamW (bf16 params)", ["method=adamw"]),
    ("8-bit Adam", ["method=adamw8bit"]),
    ("GaLore r=1024", ["method=galore"]),
    ("8-bit GaLore r=1024", ["method=galore8bit"]),
    ("8-bit GaLore r=1024 + per-layer update", ["method=galore8bit", "layerwise_update=true"]),
    ("Fira r=512", ["method=fira"]),
    ("APOLLO r=256", ["method=apollo"]),
    ("APOLLO-Mini r=1", ["method=apollo_mini"]),
    ("APOLLO-Mini r=1 + per-layer update", ["method=apollo_mini", "layerwise_update=true"]),
    ("SLTrain r=1024 δ=0.05", ["method=sl"]),
    ("ReLoRA / LoRA r=128", ["method=relora"]),
]
MESHES = {"1 device": ["mesh=1,1,1", "batch_size=1"], "8 devices (fsdp)": ["mesh=1,8,1", "batch_size=8"]}
COMMON = ["model.param_dtype=bfloat16", "seq_len=256"]


def measure(overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lowrank_jax.train.cli", "memory", "llama_7b", *COMMON, *overrides]
    cmd += ["--no-licm", "--devices", "8"]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1], "seconds": time.time() - t0}
    report = json.loads(out.stdout.rstrip().rpartition("\n")[0])
    return {**report, "seconds": time.time() - t0}


def _cells(r: dict) -> list[str]:
    if "error" in r:
        return [r["label"], r["mesh_label"], "-", "-", "-", f"error: {r['error'][:80]}"]
    m = r["xla_memory"]
    return [
        r["label"],
        r["mesh_label"],
        f"{(r['param_bytes'] + r['optimizer_state_bytes']) / GIB:.2f}",
        f"{m['argument_size_in_bytes'] / GIB:.2f}",
        f"{m['temp_size_in_bytes'] / GIB:.2f}",
        f"**{m['peak_estimate_bytes'] / GIB:.2f}**",
    ]


def table(rows: list[dict]) -> str:
    header = "method | devices | params + state (GiB) | arguments | temporaries | peak estimate / device"
    return markdown_table(header, [_cells(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results" / "memory_7b"))
    p.add_argument("--only", nargs="*", help="labels (prefixes) of the rows to run")
    p.add_argument("--meshes", nargs="*", default=list(MESHES), choices=list(MESHES))
    args = p.parse_args(argv)
    rows = []
    for mesh_label in args.meshes:
        for label, overrides in ROWS:
            if args.only and not any(label.startswith(o) for o in args.only):
                continue
            r = {"label": label, "mesh_label": mesh_label, **measure([*overrides, *MESHES[mesh_label]])}
            print(table([r]).splitlines()[-1], flush=True)
            rows.append(r)
    out = Path(args.out)
    write_results(out, {"rows": rows, "common_overrides": COMMON})
    write_table(out, table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
