"""What each CPU optimisation of the model and step is worth: the train step with them undone one by one.

    python experiments/cpu_ablation.py [CONFIG] [key=value ...] [--steps 20] [--warmup 3] [--rounds 3]

The optimisations (README, "CPU performance"), applied cumulatively to a baseline without any of them:

1. ``2-D linears``: the blocks and the head run every linear on ``(B·T, D)`` tokens, not ``(B, T, D)``;
2. ``loss rule``: :func:`lowrank_jax.train.state.cross_entropy` has its derivative written out
   (baseline: autodiff of ``log_softmax`` + ``take_along_axis``);
3. ``query blocks``: causal attention in query blocks of ``CPU_QUERY_BLOCK`` rows (baseline: the whole
   ``(T, T)`` score matrix, ``bqhd`` layout, masked with ``finfo.min``).

The baseline versions (the variant named "before") are re-created here (not kept in the library) and
patched in while a variant's step is traced; every variant is compiled in this one process and timed in
interleaved rounds (``--warmup`` untimed, then ``--steps`` timed steps per round; a variant's time is the
median of its per-round medians). Writes ``results.json`` and ``table.md`` to ``--out``
(default ``experiments/results/cpu_ablation``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _report import markdown_table, write_results, write_table

from lowrank_jax.config import load_config
from lowrank_jax.models import llama
from lowrank_jax.train import state as state_lib
from lowrank_jax.train import step as step_lib
from lowrank_jax.train.step import compile_train_step, make_trainer

REPO = Path(__file__).resolve().parents[1]
CHANGES = ["2-D linears", "loss rule", "query blocks"]


def _loss_before(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    return -jnp.mean(state_lib.target_log_probs(logits_BTV, targets_BT))


def _block_before(self, x, cos, sin):  # (B, T, D) through every linear
    attn, (B, T, D) = self.attn, x.shape
    h = self.attn_norm(x)
    shape = (B, T, attn.heads, attn.head_dim)
    q = llama.apply_rope(attn.q(h).reshape(shape), cos, sin)
    k = llama.apply_rope(attn.k(h).reshape(shape), cos, sin)
    out = llama.causal_attention(q, k, attn.v(h).reshape(shape), block=llama.CPU_QUERY_BLOCK)
    x = x + attn.o(out.reshape(B, T, D))
    return x + self.mlp(self.mlp_norm(x))


def _head_before(self, x_BTD):
    return self.lm_head(self.final_norm(x_BTD)).astype(jnp.float32)


def _attention_before(q, k, v, *, block):
    T = q.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool))[None, None], scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)


@contextlib.contextmanager
def undone(changes: set[str]) -> Iterator[None]:
    """Patch in the "before" version of every change in ``changes`` while the step is traced."""
    patches = []
    if "2-D linears" in changes:
        patches += [(llama.Block, "__call__", _block_before), (llama.Llama, "head", _head_before)]
    if "loss rule" in changes:
        patches.append((step_lib, "cross_entropy", _loss_before))
    if "query blocks" in changes:
        patches.append((llama, "causal_attention", _attention_before))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="tiny")
    p.add_argument("overrides", nargs="*", default=[])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "experiments" / "results" / "cpu_ablation"))
    args = p.parse_intermixed_args(argv)
    overrides = ["model.vocab_size=4096", *args.overrides]
    cfg = load_config(args.config, overrides)
    # variant k: the first k changes applied
    variants = {"before": set(CHANGES)} | {f"+ {c}": set(CHANGES[i + 1 :]) for i, c in enumerate(CHANGES)}
    rng = np.random.default_rng(cfg.seed)
    host_batches = [rng.integers(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1)) for _ in range(4)]
    runs = {}
    for name, changes in variants.items():
        with undone(changes):
            trainer = make_trainer(cfg)
            step = compile_train_step(trainer)
        runs[name] = {"step": step, "state": trainer.init_state(), "medians": [], "loss": None}
        runs[name]["batches"] = [trainer.put_batch(b) for b in host_batches]
    for r in range(args.rounds):
        for name, run in runs.items():
            times = []
            for i in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                run["state"], m = run["step"](run["state"], run["batches"][i % len(host_batches)])
                jax.block_until_ready((run["state"], m))
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            run["medians"].append(statistics.median(times))
            run["loss"] = float(m["loss"])
            print(f"round {r + 1}: {name}: {1e3 * run['medians'][-1]:.1f} ms", flush=True)
    base = statistics.median(runs["before"]["medians"])
    rows, prev = [], base
    for name, run in runs.items():
        ms = statistics.median(run["medians"])
        rows.append(
            {
                "variant": name,
                "step_ms": 1e3 * ms,
                "round_medians_ms": [1e3 * x for x in run["medians"]],
                "vs_before": ms / base,
                "vs_previous": ms / prev,
                "last_loss": run["loss"],
            }
        )
        prev = ms
    md = markdown_table(
        "variant (cumulative) | median ms / step | ÷ before | ÷ previous row",
        [(r["variant"], f"{r['step_ms']:.0f}", f"{r['vs_before']:.2f}", f"{r['vs_previous']:.2f}") for r in rows],
    )
    print(md)
    protocol = {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds}
    out = Path(args.out)
    record = {"benchmark": "cpu_ablation", "config": args.config, "overrides": overrides, "protocol": protocol}
    write_results(out, {**record, "rows": rows})
    write_table(out, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
