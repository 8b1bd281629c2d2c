"""The pretraining loop: data, compile, train, evaluate, checkpoint, record.

``train(cfg)`` runs four phases:

1. **setup** (:func:`setup`): every check that can fail on user input (out_dir, trackers, mesh,
   data, tokenizer, vocabulary, shardings, compile) before anything is written into ``out_dir``;
2. **restore or init** (:func:`restore_or_init`): the newest checkpoint on ``resume=true``
   (checked against the data), else a fresh state from ``cfg.seed``;
3. **the loop** (:class:`Loop`): steps, periodic logging, evaluation and checkpoints, then the
   final evaluation and checkpoint;
4. **the record** (:func:`results_record`): ``results.json`` and the loss plot.

With ``relora.warm_start`` the first steps run full-rank on a second trainer and the state is
switched to LoRA at that step (:func:`lowrank_jax.train.relora.switch_to_lora`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from functools import cached_property
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
from lowrank_jax.hf import finetune as init_from
from lowrank_jax.models import count_bytes, count_params, param_labels
from lowrank_jax.storage import OutDir
from lowrank_jax.train import metrics as metrics_lib
from lowrank_jax.train.checkpoint import Checkpointer, checkpoint_steps
from lowrank_jax.train.metrics import device_memory_gib, model_flops_utilization
from lowrank_jax.train.optimizer import lr_group_report, trainable_params
from lowrank_jax.train.preemption import PreemptionWatch, stop_preempted
from lowrank_jax.train.resume import check_resume_config
from lowrank_jax.train.step import Phases, Trainer, compiled_memory, evaluate, health
from lowrank_jax.train.tracking import Trackers, check_logging
from pallas_kernels.selection import implementation_record


def is_primary() -> bool:
    """Whether this process writes the run's files and logs: process 0 of a multi-host run.

    Every process computes the same replicated metrics and takes part in checkpoint saves (orbax
    coordinates them); only the primary writes metrics.jsonl, config.json, results.json and the plot.
    """
    return jax.process_index() == 0


def _silent(*args, **kwargs) -> None:
    """The log of a non-primary process."""


def train(cfg: Config, log=print) -> dict[str, Any]:
    """Run ``cfg`` to ``cfg.steps``; returns the results dict also written to ``out_dir/results.json``."""
    t_start = time.time()
    primary = is_primary()
    log = log if primary else _silent
    cfg = init_from.apply_init_from(cfg)  # a pretrained checkpoint's architecture and tokenizer
    run = setup(cfg, log, primary)
    state, start, checkpointer = restore_or_init(run, log)
    outputs = Outputs.open(run, start, checkpointer, primary)
    try:
        loop = Loop(run, outputs, state, start, t_start, primary)
        loop.run_steps()
    except BaseException:
        outputs.trackers.close(ok=False)
        raise
    outputs.trackers.close()
    results = results_record(run, outputs, loop, t_start, primary)
    log(
        f"done: {run.cfg.steps} steps, {results['tokens']:,} tokens, val_loss {loop.val_loss:.4f}, "
        f"val_ppl {math.exp(loop.val_loss):.2f} (unigram baseline {math.exp(run.unigram_ce):.1f}), "
        f"{results['tokens_per_s']:,.0f} tokens/s, skipped {results['skipped_steps']}, "
        f"wall {results['wall_time_s']:.0f}s -> {run.outdir}"
    )
    return results


# -- 1. setup -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What setup prepared: the config (vocabulary filled in), data, trainers, compiled steps, sizes."""

    cfg: Config
    data: TokenShards
    val_batches: list[np.ndarray]
    unigram_ce: float  # the unigram model's validation cross-entropy (nats/token), the floor to beat
    phases: Phases  # the compiled steps (a ReLoRA warm start's full-rank phase first)
    compile_s: float
    batches: ShardBatches
    memory: dict[str, int]  # XLA's memory analysis of the compiled step
    n_params: int
    n_trainable: int
    param_bytes: int
    opt_bytes: int
    groups: dict[str, dict[str, Any]]  # each parameter group's peak learning rate and size

    @cached_property
    def outdir(self) -> OutDir:
        """Where the run writes: records in ``out`` (a local mirror of a gs:// out_dir), checkpoints in ``ckpt_dir``."""
        return OutDir(self.cfg.out_dir, self.cfg.data.cache_dir)

    @property
    def out(self) -> Path:
        return self.outdir.local

    @property
    def ckpt_dir(self) -> str:
        return self.outdir.checkpoints

    @property
    def trainer(self) -> Trainer:
        return self.phases.trainer

    def phase(self, step: int) -> tuple[Trainer, Any]:
        return self.phases.phase(step)


def setup(cfg: Config, log, primary: bool) -> Run:
    """Check, load the data, build and compile the trainers; nothing is written into ``out_dir``."""
    _check_run(cfg)
    cfg, data, val_batches, unigram_ce = _prepare_data(cfg, log, primary)
    try:
        trainer, warm = Phases.trainers(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t0 = time.time()
    phases = Phases.compile(cfg, trainer, warm)
    compile_s = time.time() - t0
    batches = train_batches(cfg, trainer, data)
    abstract = trainer.abstract_state
    groups = lr_group_report(cfg, abstract.params, param_labels(cfg.model))
    run = Run(
        cfg=cfg,
        data=data,
        val_batches=val_batches,
        unigram_ce=unigram_ce,
        phases=phases,
        compile_s=compile_s,
        batches=batches,
        memory=compiled_memory(phases.step_fn),
        n_params=count_params(abstract.params),
        n_trainable=trainable_params(groups),  # frozen leaves and groups at lr 0 excluded
        param_bytes=count_bytes(abstract.params),
        opt_bytes=count_bytes(abstract.opt_state),
        groups=groups,
    )
    _log_model(run, log)
    return run


def _check_run(cfg: Config) -> None:
    """The checks that need no data: out_dir against ``resume``, trackers, mesh, batch over processes."""
    out, ckpt_dir = cfg.out_dir, OutDir(cfg.out_dir, cfg.data.cache_dir).checkpoints
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


def _prepare_data(cfg: Config, log, primary: bool) -> tuple[Config, TokenShards, list[np.ndarray], float]:
    """``(cfg with the tokenizer's vocabulary, shards, validation batches, unigram cross-entropy)``."""
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
    return cfg, data, val_batches, unigram_ce


def train_batches(cfg: Config, trainer: Trainer, data: TokenShards) -> ShardBatches:
    """This process's rows of every training batch, in a deterministic order resumable from a step."""
    try:
        rows = shd.host_rows(shd.batch_sharding(trainer.mesh), (cfg.batch_size, cfg.seq_len + 1))
        return ShardBatches(data.train, cfg.batch_size, cfg.seq_len, cfg.seed, rows)
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith(("seq_len", "batch")) else f"batch_size: {e}") from None


def _log_model(run: Run, log) -> None:
    fmt = metrics_lib.fmt_bytes
    log(
        f"model: {run.n_params:,} params ({fmt(run.param_bytes)}), optimizer state {fmt(run.opt_bytes)}; step "
        f"compiled in {run.compile_s:.1f}s, XLA peak estimate {fmt(run.memory.get('peak_estimate_bytes', 0))}/device "
        f"on {run.trainer.mesh.devices.size} device(s)"
    )
    if len({g["lr"] for g in run.groups.values()}) > 1:
        log("learning rates: " + ", ".join(f"{g} {v['lr']:g} ({v['params']:,} params)" for g, v in run.groups.items()))


# -- 2. restore or init ---------------------------------------------------------------------------------


def restore_or_init(run: Run, log) -> tuple[Any, int, Checkpointer | None]:
    """``(state, start step, checkpointer)``: the newest readable checkpoint on resume, else a fresh state
    (and no checkpointer yet: nothing is created in ``out_dir`` before every check has passed)."""
    cfg = run.cfg
    if not cfg.resume:
        if cfg.init_from:
            log(init_from.describe(cfg))
            return init_from.init_state_from(run.phases, cfg), 0, None
        return run.phases.init_state(), 0, None
    checkpointer = Checkpointer(run.ckpt_dir, cfg.keep_checkpoints)
    # a checkpoint at step s holds the state before step s runs: full-rank while s <= switch
    state, meta = checkpointer.restore_latest(lambda s: run.phase(max(s - 1, 0))[0].abstract_state)
    if meta.get("data_digest") != run.data.digest:
        raise ConfigError(f"resume: checkpoint was trained on data {meta.get('data_digest')}, not {run.data.digest}")
    start = int(state.step)
    check_resume_config(meta.get("config"), cfg, start, log)  # refuses changed settings; announces new steps
    try:
        run.batches.check_state(meta.get("data_state", {}), start)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    log(f"resumed from step {start} ({run.ckpt_dir})")
    return state, start, checkpointer


# -- 3. the loop ----------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """What the run writes: metrics.jsonl, config.json, the trackers and the checkpoints."""

    mlog: metrics_lib.MetricsLog
    trackers: Trackers
    checkpointer: Checkpointer
    meta: dict[str, Any]  # stored with every checkpoint
    pending: list[tuple[int, dict[str, jax.Array]]]  # step metrics not yet read back from the devices
    outdir: OutDir | None = None  # on the primary: uploads the records of a gs:// out_dir

    @classmethod
    def open(cls, run: Run, start: int, checkpointer: Checkpointer | None, primary: bool) -> Outputs:
        """Create ``out_dir`` and its records (a resumed run keeps those up to ``start``)."""
        cfg, out = run.cfg, run.out
        resume_step = start if cfg.resume else None
        if primary:  # a gs:// out_dir: its records in a local mirror, the bucket's first on resume
            run.outdir.pull() if cfg.resume else run.outdir.clear_mirror()
        out.mkdir(parents=True, exist_ok=True)
        if checkpointer is None:
            checkpointer = Checkpointer(run.ckpt_dir, cfg.keep_checkpoints)
        mlog = metrics_lib.MetricsLog(out / "metrics.jsonl", resume_step=resume_step, enabled=primary)
        if primary:
            metrics_lib.write_json(out / "config.json", config_lib.to_dict(cfg))
        trackers = Trackers(cfg, out, enabled=primary, resume_step=resume_step)
        if start == 0:
            trackers.scalars(0, {"xla_peak_estimate_gib": run.memory.get("peak_estimate_bytes", 0) / 2**30}, "memory")
        meta = {
            "data_digest": run.data.digest,
            "tokens_per_step": cfg.tokens_per_step,
            "config": config_lib.to_dict(cfg),
        }
        return cls(mlog, trackers, checkpointer, meta, [], run.outdir if primary else None)

    def flush_metrics(self, tokens_per_step: int) -> None:
        """Read back the pending step metrics and write them to metrics.jsonl and the trackers."""
        for s, m in jax.device_get(self.pending):
            self.mlog.write({"step": s, "tokens": s * tokens_per_step, **{k: float(v) for k, v in m.items()}})
            self.trackers.scalars(s, m, "train")
        self.pending.clear()
        self.mlog.flush()
        self.trackers.flush()
        if self.outdir is not None:
            self.outdir.push(force=False)

    def record_eval(self, step: int, tokens_per_step: int, record: dict[str, Any]) -> None:
        self.mlog.write({"step": step, "tokens": step * tokens_per_step, **record})
        self.mlog.flush()
        self.trackers.scalars(step, record, "eval")
        self.trackers.flush()

    def save(self, run: Run, step: int, state: Any) -> None:
        self.checkpointer.save(step, state, {**self.meta, "step": step, "data_state": run.batches.state_dict(step)})
        if self.outdir is not None:
            self.outdir.push()


class Loop:
    """Steps ``start .. cfg.steps``: log every ``log_every``, evaluate every ``eval_every``, checkpoint every
    ``checkpoint_every``; then the final evaluation and checkpoint.

    tokens/s counts only the time spent in steps (evaluation and checkpointing excluded).
    """

    def __init__(self, run: Run, outputs: Outputs, state: Any, start: int, t_start: float, primary: bool):
        self.run, self.outputs, self.state, self.start = run, outputs, state, start
        self.t_start, self.primary = t_start, primary
        self.val_loss = float("nan")
        self.excluded = 0.0  # seconds spent in evaluation and checkpointing
        self.first_step_s: float | None = None  # wall time from train() start to the first step's loss
        self.train_time = 0.0
        self.t_loop = 0.0
        self.preemption = PreemptionWatch()  # SIGTERM: every process stops after the same step, checkpointed

    def run_steps(self) -> None:
        run, cfg = self.run, self.run.cfg
        bar = tqdm(
            total=cfg.steps,
            initial=self.start,
            disable=not (cfg.progress and self.primary),
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        say = bar.write if self.primary else _silent  # tqdm's write ignores disable
        self.t_loop = time.time()
        loader = run.batches.iterate(self.start, cfg.steps)
        for step in range(self.start, cfg.steps):
            self.state, switched = run.phases.switch_if_due(self.state, step)
            if switched:
                say(f"step {step}: warm start done, switched to LoRA (model.dense={cfg.model.dense})")
            self.state, m = run.phases.run_step(self.state, step, next(loader), cfg.batch_size)
            self._after_step(step + 1, m, bar, say)
            if self.preemption.reached(step + 1) and step + 1 < cfg.steps:
                stop_preempted(self, step + 1)
        self.preemption.close()
        jax.block_until_ready(self.state)
        self.train_time = time.time() - self.t_loop - self.excluded
        bar.close()
        self._finish()

    def _after_step(self, done: int, m: dict[str, jax.Array], bar: tqdm, say) -> None:
        cfg, outputs = self.run.cfg, self.outputs
        if self.first_step_s is None:
            jax.block_until_ready(m["loss"])
            self.first_step_s = time.time() - self.t_start
        outputs.pending.append((done, m))
        if done % cfg.log_every == 0 or done == cfg.steps:
            self._log_progress(done, float(m["loss"]), bar)
        t_pause = time.time()
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            outputs.flush_metrics(cfg.tokens_per_step)
            self.val_loss = self.evaluate(done)
            say(f"step {done}: val_loss {self.val_loss:.4f} val_ppl {math.exp(self.val_loss):.2f}")
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
            outputs.flush_metrics(cfg.tokens_per_step)
            outputs.save(self.run, done, self.state)
        self.excluded += time.time() - t_pause

    def _log_progress(self, done: int, loss: float, bar: tqdm) -> None:
        """Metrics so far to the records; tokens/s, MFU and device memory to the trackers; the progress bar."""
        cfg, trackers, mesh = self.run.cfg, self.outputs.trackers, self.run.trainer.mesh
        self.outputs.flush_metrics(cfg.tokens_per_step)
        rate = (done - self.start) * cfg.tokens_per_step / max(time.time() - self.t_loop - self.excluded, 1e-9)
        mfu = model_flops_utilization(cfg, rate, mesh.devices.flat[0].device_kind, mesh.devices.size)
        trackers.scalars(done, {"tokens_per_s": rate, "mfu": mfu}, "train")
        trackers.scalars(done, device_memory_gib(), "memory")
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        bar.update(done - bar.n)

    def evaluate(self, step: int) -> float:
        """Validation loss and the health signal of the params after ``step`` steps, recorded; returns the loss."""
        run = self.run
        trainer = run.phase(step - 1)[0]
        loss = evaluate(trainer, self.state.params, run.val_batches)
        rms = health(trainer, self.state.params, run.val_batches[0])
        record = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), **rms}
        self.outputs.record_eval(step, run.cfg.tokens_per_step, record)
        return loss

    def _finish(self) -> None:
        """The last metrics, the final evaluation (unless a resumed finished run has one) and checkpoint."""
        cfg, outputs = self.run.cfg, self.outputs
        outputs.flush_metrics(cfg.tokens_per_step)
        if self.start < cfg.steps or not math.isfinite(self.val_loss):
            self.val_loss = self.evaluate(cfg.steps)
        if cfg.steps not in outputs.checkpointer.manager.all_steps():
            outputs.save(self.run, cfg.steps, self.state)
        outputs.checkpointer.close()
        outputs.mlog.close()


# -- 4. the record --------------------------------------------------------------------------------------


def results_record(run: Run, outputs: Outputs, loop: Loop, t_start: float, primary: bool) -> dict[str, Any]:
    """The loss plot and ``results.json`` (on the primary process); returns the results dict."""
    cfg, out, data = run.cfg, run.out, run.data
    if primary:
        records = metrics_lib.read_metrics(out / "metrics.jsonl")
        metrics_lib.plot_losses(records, out / "loss.png", title=f"{out.name}: {run.n_params / 1e6:.2f}M params")
    tps, steps_run, val_loss = cfg.tokens_per_step, cfg.steps - loop.start, loop.val_loss
    results = {
        "final_val_loss": val_loss,
        "final_val_ppl": math.exp(val_loss),
        "unigram_val_loss": run.unigram_ce,
        "unigram_val_ppl": math.exp(run.unigram_ce),
        "steps": cfg.steps,
        "steps_this_run": steps_run,
        "tokens": cfg.steps * tps,
        "params": run.n_params,
        "trainable_params": run.n_trainable,
        "param_bytes": run.param_bytes,
        "optimizer_state_bytes": run.opt_bytes,
        "lr_groups": run.groups,  # each parameter group's peak learning rate and size
        "skipped_steps": int(loop.state.skipped),
        "wall_time_s": time.time() - t_start,
        "train_time_s": loop.train_time,
        "tokens_per_s": steps_run * tps / max(loop.train_time, 1e-9),
        "compile_time_s": run.compile_s,
        "time_to_first_step_s": loop.first_step_s,
        "xla_memory": run.memory,
        "kernel_implementations": implementation_record(),  # which matmul implementation ran, and why
        "trackers": outputs.trackers.record(),
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
        run.outdir.push()
    return results
