"""The pretraining loop: data, compile, train, evaluate, checkpoint, record.

``train(cfg)`` does every check that can fail on user input (data, tokenizer, vocabulary,
shardings, compile, checkpoint restore) before it writes anything into ``out_dir``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from lowrank_jax import config as config_lib
from lowrank_jax import sharding as shd
from lowrank_jax.config import Config, ConfigError
from lowrank_jax.data import (
    ShardBatches,
    TokenShards,
    eval_batches,
    load_shards,
    unigram_cross_entropy_from_counts,
)
from lowrank_jax.models import count_bytes, count_params, param_labels
from lowrank_jax.train import metrics as metrics_lib
from lowrank_jax.train.checkpoint import Checkpointer, checkpoint_steps
from lowrank_jax.train.optimizer import lr_group_report, trainable_params
from lowrank_jax.train.relora import switch_to_lora, warm_start_config
from lowrank_jax.train.step import compile_train_step, compiled_memory, evaluate, health, make_trainer
from lowrank_jax.train.tracking import Trackers, check_logging, device_memory_gib, model_flops_utilization
from pallas_kernels.selection import implementation_record


def is_primary() -> bool:
    """Whether this process writes the run's files and logs: process 0 of a multi-host run.

    Every process computes the same replicated metrics and takes part in checkpoint saves (orbax
    coordinates them); only the primary writes metrics.jsonl, config.json, results.json and the plot.
    """
    return jax.process_index() == 0


def _load_data(cfg: Config, log, primary: bool) -> TokenShards:
    """The run's token shards; with several processes, process 0 prepares them first and the others wait.

    The others then open the same directory (a shared filesystem) or prepare their own copy (a
    host with its own cache; the result is the same bytes). If process 0 fails, the others still
    pass the barrier and fail on their own attempt, so no process is left waiting.
    """
    if jax.process_count() == 1:
        return load_shards(cfg.data, log)
    data, error = None, None
    if primary:
        try:
            data = load_shards(cfg.data, log)
        except (ValueError, OSError) as e:
            error = e
    multihost_utils.sync_global_devices("lowrank_jax: token shards ready")
    if error is not None:
        raise error
    return data if primary else load_shards(cfg.data, log)


def train(cfg: Config, log=print) -> dict[str, Any]:
    """Run ``cfg`` to ``cfg.steps``; returns the results dict also written to ``out_dir/results.json``."""
    t_start = time.time()
    primary = is_primary()
    if not primary:
        log = lambda *args, **kwargs: None  # noqa: E731
    out = Path(cfg.out_dir).expanduser()
    ckpt_dir = out / "checkpoints"
    if cfg.resume and not checkpoint_steps(ckpt_dir):
        raise ConfigError(f"resume: no checkpoint in {str(ckpt_dir)!r}")
    if not cfg.resume and checkpoint_steps(ckpt_dir):
        raise ConfigError(f"out_dir: {str(out)!r} already holds checkpoints; pass resume=true or another out_dir")

    check_logging(cfg)  # a missing tensorboardX / wandb package: one line, before anything is written
    try:
        shd.mesh_shape(cfg.mesh, jax.device_count())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.batch_size % jax.process_count():
        raise ConfigError(f"batch_size: {cfg.batch_size} rows do not split evenly over {jax.process_count()} processes")
    try:
        data = _load_data(cfg, log, primary)
    except (ValueError, OSError) as e:
        raise ConfigError.from_exception(e) from None
    if cfg.model.vocab_size == 0:
        cfg = config_lib.replace(cfg, model__vocab_size=data.vocab_size)
    elif data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size}")
    log(
        f"data: {data.digest} ({data.manifest['corpus']}, shards {data.directory}) train {data.train.n_tokens:,} "
        f"tokens, val {data.val.n_tokens:,} tokens, vocab {data.vocab_size}"
    )
    try:
        val_batches = eval_batches(
            data.val_prefix(cfg.eval_tokens + 1), cfg.seq_len, cfg.eval_tokens, cfg.eval_batch_size
        )
    except ValueError as e:
        raise ConfigError(f"seq_len: {e}") from None
    eval_targets = np.concatenate([b[:, 1:].ravel() for b in val_batches])
    unigram_ce = unigram_cross_entropy_from_counts(data.unigram_counts(), eval_targets)

    switch = cfg.relora.warm_start  # ReLoRA warm start: full-rank steps [0, switch), then LoRA
    try:
        trainer = make_trainer(cfg)
        warm = make_trainer(warm_start_config(cfg)) if switch else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t0 = time.time()
    step_fn = compile_train_step(trainer)
    warm_step_fn = compile_train_step(warm) if warm else None
    compile_s = time.time() - t0

    def phase(step: int):
        """(trainer, compiled step) that runs ``step``: the full-rank phase before the switch."""
        return (warm, warm_step_fn) if warm is not None and step < switch else (trainer, step_fn)

    try:
        rows = shd.host_rows(shd.batch_sharding(trainer.mesh), (cfg.batch_size, cfg.seq_len + 1))
        batches = ShardBatches(data.train, cfg.batch_size, cfg.seq_len, cfg.seed, rows)
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith(("seq_len", "batch")) else f"batch_size: {e}") from None
    memory = compiled_memory(step_fn)
    n_params = count_params(trainer.abstract_state.params)
    labels = param_labels(cfg.model)
    groups = lr_group_report(cfg, trainer.abstract_state.params, labels)
    n_trainable = trainable_params(groups)  # frozen leaves and groups at lr 0 excluded
    opt_bytes = count_bytes(trainer.abstract_state.opt_state)
    fmt = metrics_lib.fmt_bytes
    param_bytes = count_bytes(trainer.abstract_state.params)
    log(
        f"model: {n_params:,} params ({fmt(param_bytes)}), optimizer state {fmt(opt_bytes)}; step compiled in "
        f"{compile_s:.1f}s, XLA peak estimate {fmt(memory.get('peak_estimate_bytes', 0))}/device on "
        f"{trainer.mesh.devices.size} device(s)"
    )
    if len({g["lr"] for g in groups.values()}) > 1:
        log("learning rates: " + ", ".join(f"{g} {v['lr']:g} ({v['params']:,} params)" for g, v in groups.items()))

    checkpointer = None
    if cfg.resume:
        checkpointer = Checkpointer(ckpt_dir, cfg.keep_checkpoints)
        # a checkpoint at step s holds the state before step s runs: full-rank while s <= switch
        state, meta = checkpointer.restore_latest(lambda s: phase(max(s - 1, 0))[0].abstract_state)
        if meta.get("data_digest") != data.digest:
            raise ConfigError(f"resume: checkpoint was trained on data {meta.get('data_digest')}, not {data.digest}")
        start = int(state.step)
        try:
            batches.check_state(meta.get("data_state", {}), start)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        log(f"resumed from step {start} ({ckpt_dir})")
    else:
        state, start = phase(0)[0].init_state(), 0

    out.mkdir(parents=True, exist_ok=True)
    if checkpointer is None:
        checkpointer = Checkpointer(ckpt_dir, cfg.keep_checkpoints)
    mlog = metrics_lib.MetricsLog(out / "metrics.jsonl", resume_step=start if cfg.resume else None, enabled=primary)
    if primary:
        metrics_lib.write_json(out / "config.json", config_lib.to_dict(cfg))
    trackers = Trackers(cfg, out, enabled=primary, resume_step=start if cfg.resume else None)
    device_kind, n_devices = trainer.mesh.devices.flat[0].device_kind, trainer.mesh.devices.size
    if start == 0:
        trackers.scalars(0, {"xla_peak_estimate_gib": memory.get("peak_estimate_bytes", 0) / 2**30}, "memory")

    tps = cfg.tokens_per_step
    meta = {"data_digest": data.digest, "tokens_per_step": tps}
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    val_loss = float("nan")
    excluded = 0.0  # seconds spent in evaluation and checkpointing, not counted in tokens/s

    def flush_metrics() -> None:
        for s, m in jax.device_get(pending):
            mlog.write({"step": s, "tokens": s * tps, **{k: float(v) for k, v in m.items()}})
            trackers.scalars(s, m, "train")
        pending.clear()
        mlog.flush()
        trackers.flush()

    def run_eval(s: int) -> float:
        tr = phase(s - 1)[0]
        loss = evaluate(tr, state.params, val_batches)
        rms = health(tr, state.params, val_batches[0])
        record = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), **rms}
        mlog.write({"step": s, "tokens": s * tps, **record})
        mlog.flush()
        trackers.scalars(s, record, "eval")
        trackers.flush()
        return loss

    try:
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            disable=not (cfg.progress and primary),
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        say = bar.write if primary else (lambda *args, **kwargs: None)  # tqdm's write ignores disable
        t_loop = time.time()
        loader = batches.iterate(start, cfg.steps)
        first_step_s = None  # wall time from train() start to the first step's loss (data, compile, restore included)
        for step in range(start, cfg.steps):
            if warm is not None and step == switch:
                state = switch_to_lora(state, trainer)
                say(f"step {step}: warm start done, switched to LoRA (model.dense={cfg.model.dense})")
            state, m = phase(step)[1](state, trainer.put_rows(next(loader), cfg.batch_size))
            done = step + 1
            if first_step_s is None:
                jax.block_until_ready(m["loss"])
                first_step_s = time.time() - t_start
            pending.append((done, m))
            if done % cfg.log_every == 0 or done == cfg.steps:
                loss = float(m["loss"])
                flush_metrics()
                rate = (done - start) * tps / max(time.time() - t_loop - excluded, 1e-9)
                mfu = model_flops_utilization(cfg, rate, device_kind, n_devices)
                trackers.scalars(done, {"tokens_per_s": rate, "mfu": mfu}, "train")
                trackers.scalars(done, device_memory_gib(), "memory")
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
                bar.update(done - bar.n)
            t_pause = time.time()
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                flush_metrics()
                val_loss = run_eval(done)
                say(f"step {done}: val_loss {val_loss:.4f} val_ppl {math.exp(val_loss):.2f}")
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
                flush_metrics()
                checkpointer.save(done, state, {**meta, "step": done, "data_state": batches.state_dict(done)})
            excluded += time.time() - t_pause
        jax.block_until_ready(state)
        train_time = time.time() - t_loop - excluded
        bar.close()
        flush_metrics()
        if start < cfg.steps or not math.isfinite(val_loss):
            val_loss = run_eval(cfg.steps)
        if cfg.steps not in checkpointer.manager.all_steps():
            checkpointer.save(
                cfg.steps, state, {**meta, "step": cfg.steps, "data_state": batches.state_dict(cfg.steps)}
            )
        checkpointer.close()
        mlog.close()
    except BaseException:
        trackers.close(ok=False)
        raise
    trackers.close()

    if primary:
        records = metrics_lib.read_metrics(out / "metrics.jsonl")
        metrics_lib.plot_losses(records, out / "loss.png", title=f"{out.name}: {n_params / 1e6:.2f}M params")
    skipped = int(state.skipped)
    steps_run = cfg.steps - start
    results = {
        "final_val_loss": val_loss,
        "final_val_ppl": math.exp(val_loss),
        "unigram_val_loss": unigram_ce,
        "unigram_val_ppl": math.exp(unigram_ce),
        "steps": cfg.steps,
        "steps_this_run": steps_run,
        "tokens": cfg.steps * tps,
        "params": n_params,
        "trainable_params": n_trainable,
        "param_bytes": param_bytes,
        "optimizer_state_bytes": opt_bytes,
        "lr_groups": groups,  # each parameter group's peak learning rate and size
        "skipped_steps": skipped,
        "wall_time_s": time.time() - t_start,
        "train_time_s": train_time,
        "tokens_per_s": steps_run * tps / max(train_time, 1e-9),
        "compile_time_s": compile_s,
        "time_to_first_step_s": first_step_s,
        "xla_memory": memory,
        "kernel_implementations": implementation_record(),  # which matmul implementation ran, and why
        "trackers": trackers.record(),
        "data_digest": data.digest,
        "data": {
            "shards": str(data.directory),
            "train_tokens": data.train.n_tokens,
            "val_tokens": data.val.n_tokens,
            "tokenizer": data.manifest["tokenizer"]["fingerprint"],
            "loader": "grain MapDataset: index-shuffled windows, reseeded each epoch (lowrank_jax.data.shards)",
        },
        "config": config_lib.to_dict(cfg),
        **metrics_lib.provenance(),
    }
    if primary:
        metrics_lib.write_json(out / "results.json", results)
    log(
        f"done: {cfg.steps} steps, {cfg.steps * tps:,} tokens, val_loss {val_loss:.4f}, "
        f"val_ppl {math.exp(val_loss):.2f} (unigram baseline {math.exp(unigram_ce):.1f}), "
        f"{results['tokens_per_s']:,.0f} tokens/s, skipped {skipped}, wall {results['wall_time_s']:.0f}s -> {out}"
    )
    return results
