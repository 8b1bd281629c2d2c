"""Time the jitted train step of a config on random tokens: step time, tokens/s, TFLOP/s and MFU.

    python experiments/bench_step.py CONFIG [key=value ...] [--steps N] [--warmup K] [--out DIR]

No dataset is read: batches are uniform random token ids, so ``model.vocab_size`` must be known
(a config that leaves it to the tokenizer gets ``--vocab-size``, default 32000). The step is
compiled ahead of time, run ``--warmup`` times, then ``--steps`` times with a device sync after
each step. FLOPs come from the analytic count of :mod:`lowrank_jax.models.flops` (model FLOPs,
training = 3× forward); MFU is reported when the device's peak for ``model.dtype`` is known.
Writes ``results.json`` and ``step_times.png`` into ``--out``
(default ``experiments/results/bench_step/<config>``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _report import save_figure, step_seconds, subplots, write_results

from lowrank_jax import config as config_lib
from lowrank_jax.config import ConfigError, load_config
from lowrank_jax.models import count_bytes, count_params, flops
from lowrank_jax.train import metrics as metrics_lib
from lowrank_jax.train.step import make_trainer, memory_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VOCAB = 32000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; overrides and options may be interleaved."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="named config or YAML file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. batch_size=8 model.dtype=bfloat16")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB, help="model.vocab_size when the config leaves it 0 (32000)"
    )
    p.add_argument("--out", default=None, help="output directory (default experiments/results/bench_step/<config>)")
    args = p.parse_intermixed_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.vocab_size < 1:
        p.error("--vocab-size must be >= 1")
    return args


def bench(cfg: config_lib.Config, steps: int, warmup: int) -> dict[str, Any]:
    """Compile and time ``cfg``'s train step on random tokens; returns the metrics (no files written)."""
    try:
        trainer = make_trainer(cfg)
    except ValueError as e:  # e.g. a batch that does not divide over the mesh
        raise ConfigError(str(e)) from None
    B, T = cfg.batch_size, cfg.seq_len
    rng = np.random.default_rng(cfg.seed)
    # Distinct batches, already on device, so host-to-device copies stay out of the timings.
    batches = [trainer.put_batch(rng.integers(0, cfg.model.vocab_size, (B, T + 1))) for _ in range(warmup + steps)]
    batch_abstract = jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=batches[0].sharding)

    t0 = time.perf_counter()
    step_fn = trainer.train_step.lower(trainer.abstract_state, batch_abstract).compile()
    compile_s = time.perf_counter() - t0
    memory = memory_report(trainer)

    state = trainer.init_state()
    jax.block_until_ready(state)
    for batch in batches[:warmup]:
        state, m = step_fn(state, batch)
    jax.block_until_ready(state)
    times, state, m = step_seconds(step_fn, state, batches[warmup:])
    last_loss = float(m["loss"])

    median = statistics.median(times)
    flops_step = flops.train_flops_per_step(cfg.model, B, T)
    achieved = flops_step / median
    device = jax.devices()[0]
    n_dev = trainer.mesh.devices.size
    peak = flops.peak_flops(device.device_kind, cfg.model.dtype)
    peak_total = peak * n_dev if peak is not None else None
    return {
        "steps_timed": steps,
        "warmup_steps": warmup,
        "step_time_median_s": median,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "step_times_s": times,
        "tokens_per_step": B * T,
        "tokens_per_s": B * T / median,
        "train_flops_per_step": flops_step,
        "train_flops_per_token": flops.train_flops_per_token(cfg.model, T),
        "achieved_tflops_per_s": achieved / 1e12,
        "peak_tflops_per_s": peak_total / 1e12 if peak_total is not None else None,
        "mfu": flops.mfu(achieved, peak_total),
        "mesh_devices": n_dev,
        "compile_time_s": compile_s,
        "last_loss": last_loss,
        "params": count_params(trainer.abstract_state.params),
        "param_bytes": count_bytes(trainer.abstract_state.params),
        "optimizer_state_bytes": count_bytes(trainer.abstract_state.opt_state),
        "xla_memory": memory,
    }


def format_table(name: str, res: dict[str, Any], device_kind: str) -> str:
    """The human-readable summary printed by :func:`main`."""
    mfu = res["mfu"]
    peak = res["peak_tflops_per_s"]
    rows = [
        ("params", f"{res['params']:,}"),
        ("tokens / step", f"{res['tokens_per_step']:,}"),
        ("train GFLOP / step (analytic)", f"{res['train_flops_per_step'] / 1e9:,.2f}"),
        ("compile (s)", f"{res['compile_time_s']:.2f}"),
        ("step time median (ms)", f"{res['step_time_median_s'] * 1e3:,.2f}"),
        ("step time min (ms)", f"{res['step_time_min_s'] * 1e3:,.2f}"),
        ("step time max (ms)", f"{res['step_time_max_s'] * 1e3:,.2f}"),
        ("tokens / s", f"{res['tokens_per_s']:,.0f}"),
        ("achieved TFLOP/s", f"{res['achieved_tflops_per_s']:,.4f}"),
        ("peak TFLOP/s", "unknown" if peak is None else f"{peak:,.1f}"),
        ("MFU", "n/a (peak unknown)" if mfu is None else f"{100 * mfu:.2f}%"),
    ]
    mem = res["xla_memory"]
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes"):
        if key in mem:
            rows.append((f"XLA {key.removesuffix('_size_in_bytes')}", metrics_lib.fmt_bytes(mem[key])))
    if "peak_estimate_bytes" in mem:
        rows.append(("XLA peak estimate / device", metrics_lib.fmt_bytes(mem["peak_estimate_bytes"])))
    width = max(len(k) for k, _ in rows)
    head = (
        f"bench_step: {name} on {res['mesh_devices']} x {device_kind} ({jax.default_backend()}), "
        f"{res['steps_timed']} timed steps after {res['warmup_steps']} warmup"
    )
    lines = [head, f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 18}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def plot_step_times(times: list[float], path: Path, title: str) -> None:
    """Per-step wall time of the timed steps, with the median."""
    fig, ax = subplots(figsize=(6, 3.5), dpi=110)
    ms = [t * 1e3 for t in times]
    ax.plot(range(1, len(ms) + 1), ms, "o-", lw=1, ms=3, label="step")
    ax.axhline(statistics.median(ms), color="tab:red", lw=1, ls="--", label="median")
    ax.set_xlabel("timed step")
    ax.set_ylabel("wall time (ms)")
    ax.set_title(title)
    save_figure(fig, path, [ax], grid=True, legend=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for configuration errors)."""
    args = parse_args(argv)
    name = Path(args.config).stem if args.config.endswith((".yaml", ".yml")) else args.config
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.model.vocab_size == 0:
            cfg = config_lib.replace(cfg, model__vocab_size=args.vocab_size)
        res = bench(cfg, args.steps, args.warmup)
    except ConfigError as e:
        print(f"bench_step: error: {e}", file=sys.stderr)
        return 2
    device_kind = jax.devices()[0].device_kind
    print(format_table(name, res, device_kind))

    out = Path(args.out) if args.out else REPO / "experiments" / "results" / "bench_step" / name
    results = {
        "benchmark": "bench_step",
        "config_name": name,
        "overrides": list(args.overrides),
        **res,
        "config": config_lib.to_dict(cfg),
    }
    write_results(out, results)
    plot_step_times(res["step_times_s"], out / "step_times.png", f"{name}: train step on {device_kind}")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
