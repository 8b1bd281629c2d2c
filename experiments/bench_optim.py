"""Optimizer-update benchmark: optax.adamw vs optax.contrib.galore vs lowrank-jax GaLore, side by side.

    python experiments/bench_optim.py [--shapes tiny llama_60m] [--gap 20] [--periods 3] [--out DIR]

For each parameter-shape set (the attention/MLP kernels of a named config, unrolled layers so
that every transform sees 2-D matrices, plus embeddings, norms and lm_head) it times one jitted
update ``(params, state, grads) -> (params, state)`` per step over ``periods`` projector periods
of ``gap`` steps, after compiling ahead of time. optax.contrib.galore projects every 2-D leaf
(embeddings and lm_head included; its ``mask`` only selects weight decay), so our transform is
timed with the same selection, plus once with the papers' selection (attention/MLP kernels only,
the rest Adam at full size). Reported: median and max step time
(refresh steps included; step 0 is reported apart because every projector is created there),
the ratio to optax.adamw's median, the refresh-step spike (max / median), and the optimizer-state
bytes (jax.eval_shape). Writes results.json, a table (table.md) and a PNG of step times.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _report import markdown_table, save_figure, step_seconds, subplots, write_results, write_table
from optax import contrib

from lowrank_jax.config import load_config, replace
from lowrank_jax.models import abstract_params, count_bytes, count_params
from lowrank_jax.optim import galore
from lowrank_jax.optim.complete import matrices
from lowrank_jax.train.step import compile_train_step, make_trainer

HERE = Path(__file__).resolve().parent
RANKS = {"tiny": 32, "llama_60m": 128, "llama_130m": 256}


def _params(name: str, key: int = 0):
    cfg = load_config(name).model
    cfg = dataclasses.replace(
        cfg, scan_layers=False, vocab_size=cfg.vocab_size or 4096, dtype="float32", param_dtype="float32"
    )
    _, abstract = abstract_params(cfg)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    params = [jax.random.normal(k, x.shape, x.dtype) * 0.02 for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, params)


def _optimizers(rank: int, gap: int, lr: float = 1e-3) -> dict[str, optax.GradientTransformation]:
    return {
        "optax.adamw": optax.adamw(lr),
        # optax.contrib.galore projects every 2-D leaf (its `mask` is a weight-decay mask), so ours runs
        # with mask=matrices (every leaf with ndim >= 2) for a like-for-like comparison ...
        "optax.contrib.galore": contrib.galore(lr, rank=rank, update_proj_gap=gap, scale=0.25),
        "ours (default)": galore(lr, rank=rank, update_proj_gap=gap, scale=0.25, mask=matrices),
        "ours (staggered+randomized)": galore(
            lr, rank=rank, update_proj_gap=gap, scale=0.25, mask=matrices, refresh="staggered", svd="randomized"
        ),
        # ... and with the papers' selection (attention + MLP kernels only), the complete optimizer's default.
        "ours (attn+MLP only)": galore(lr, rank=rank, update_proj_gap=gap, scale=0.25),
        "ours (attn+MLP only, staggered+randomized)": galore(
            lr, rank=rank, update_proj_gap=gap, scale=0.25, refresh="staggered", svd="randomized"
        ),
    }


def _stats(times: list[float]) -> dict[str, float]:
    """Step 0 (projector creation) apart; median and max over the rest, in ms."""
    later = np.asarray(times[1:])
    return {"step0_ms": 1e3 * times[0], "median_ms": 1e3 * float(np.median(later)), "max_ms": 1e3 * float(later.max())}


def _add_ratios(rows: dict[str, dict], baseline: str) -> None:
    base = rows[baseline]["median_ms"]
    for r in rows.values():
        r["median_vs_adamw"] = r["median_ms"] / base
        r["max_vs_median"] = r["max_ms"] / r["median_ms"]
        r["max_vs_adamw"] = r["max_ms"] / base


def _time_updates(tx, params, grads, steps: int) -> tuple[list[float], int]:
    state_bytes = count_bytes(jax.eval_shape(tx.init, params))

    def step(p, s, g):
        upd, s = tx.update(g, s, p)
        return optax.apply_updates(p, upd), s

    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    fn = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, grads[0]).compile()

    def update(ps, g):  # step_seconds' (state, aux) form: the state is (params, optimizer state), no aux
        return fn(*ps, g), None

    times, _, _ = step_seconds(update, (p, s), [grads[i % len(grads)] for i in range(steps)])
    return times, state_bytes


def bench(shape_set: str, gap: int, periods: int) -> dict:
    params = _params(shape_set)
    grads = [
        jax.tree.map(lambda x, k=k: jax.random.normal(jax.random.key(k), x.shape) * 1e-3, params) for k in range(3)
    ]
    rank = RANKS.get(shape_set, 32)
    steps = gap * periods + 1
    rows = {}
    for name, tx in _optimizers(rank, gap).items():
        times, state_bytes = _time_updates(tx, params, grads, steps)
        rows[name] = {**_stats(times), "state_bytes": state_bytes, "times_ms": [1e3 * t for t in times]}
        print(
            f"  {shape_set:10s} {name:30s} median {rows[name]['median_ms']:9.2f} ms  max "
            f"{rows[name]['max_ms']:9.2f} ms  state {state_bytes / 2**20:8.1f} MiB",
            flush=True,
        )
    _add_ratios(rows, "optax.adamw")
    return {
        "shape_set": shape_set,
        "params": count_params(params),
        "rank": rank,
        "gap": gap,
        "steps": steps,
        "optimizers": rows,
    }


def bench_train_steps(name: str, gap: int, periods: int) -> dict:
    """Whole jitted train steps (forward + backward + update) of ``name`` with each optimizer, side by side."""
    rank = RANKS.get(name, 32)
    base = load_config(name, [f"galore.rank={rank}", f"galore.update_proj_gap={gap}"])
    base = replace(base, model__vocab_size=base.model.vocab_size or base.data.vocab_size)
    steps = gap * periods + 1
    variants = {
        "adamw": {},
        "galore_adamw": {"optim__name": "galore_adamw"},
        "galore_adamw staggered+randomized": {
            "optim__name": "galore_adamw",
            "galore__refresh": "staggered",
            "galore__svd": "randomized",
        },
    }
    batch = np.random.default_rng(0).integers(0, base.model.vocab_size, (base.batch_size, base.seq_len + 1))
    rows = {}
    for label, changes in variants.items():
        trainer = make_trainer(replace(base, **changes))
        step = compile_train_step(trainer)
        times, _, _ = step_seconds(step, trainer.init_state(), [trainer.put_batch(batch)] * steps)
        rows[label] = _stats(times)
        print(
            f"  train step {name} {label:36s} median {rows[label]['median_ms']:9.1f} ms  max "
            f"{rows[label]['max_ms']:9.1f} ms",
            flush=True,
        )
    _add_ratios(rows, "adamw")
    return {"config": name, "rank": rank, "gap": gap, "steps": steps, "variants": rows}


def train_table(res: dict) -> str:
    rows = [
        [
            label,
            f"{r['median_ms']:.1f}",
            f"{r['median_vs_adamw']:.3f}",
            f"{r['max_ms']:.1f}",
            f"{r['max_vs_median']:.2f}",
        ]
        for label, r in res["variants"].items()
    ]
    header = "optimizer | median step (ms) | median / adamw | max step (ms) | max / median"
    return (
        f"Whole train steps of `{res['config']}` (r={res['rank']}, T={res['gap']}, {res['steps']} steps):\n\n"
        + markdown_table(header, rows)
    )


def table(results: list[dict]) -> str:
    header = (
        "shapes | optimizer | median step (ms) | median / adamw | max step (ms) | max / median | max / adamw"
        " | step 0 (ms) | state (MiB)"
    )
    rows = [
        [
            f"{res['shape_set']} ({res['params'] / 1e6:.1f}M, r={res['rank']}, T={res['gap']})",
            name,
            f"{r['median_ms']:.2f}",
            f"{r['median_vs_adamw']:.2f}",
            f"{r['max_ms']:.2f}",
            f"{r['max_vs_median']:.2f}",
            f"{r['max_vs_adamw']:.2f}",
            f"{r['step0_ms']:.1f}",
            f"{r['state_bytes'] / 2**20:.1f}",
        ]
        for res in results
        for name, r in res["optimizers"].items()
    ]
    return markdown_table(header, rows)


def plot(results: list[dict], path: Path) -> None:
    fig, axes = subplots(1, len(results), figsize=(6 * len(results), 4), dpi=110, squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for name, r in res["optimizers"].items():
            ax.plot(r["times_ms"][1:], label=name, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("update step (after step 0)")
        ax.set_ylabel("ms")
        ax.set_title(f"{res['shape_set']}: rank {res['rank']}, refresh gap {res['gap']}")
    save_figure(fig, path, axes[0], grid=True, legend={"fontsize": 7})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["tiny", "llama_60m"])
    p.add_argument("--gap", type=int, default=20, help="update_proj_gap T for every GaLore variant")
    p.add_argument("--periods", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "bench_optim"))
    args = p.parse_args(argv)
    results = [bench(s, args.gap, args.periods) for s in args.shapes]
    train_res = bench_train_steps("tiny", args.gap, args.periods)
    out = Path(args.out)
    md = "Optimizer updates alone:\n\n" + table(results) + "\n\n" + train_table(train_res)
    print(md)
    write_table(out, md)
    plot(results, out / "step_times.png")
    write_results(out, {"results": results, "train_steps": train_res, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
