"""Fine-tune degradation: fine-tune a pretraining checkpoint on a second domain with fixed hyperparameters.

Springer, Goyal, Wen, Kumar, Yue, Malladi, Neubig, Raghunathan, "Overtrained Language Models Are
Harder to Fine-Tune", ICML 2025, arXiv 2503.19206, §3: every checkpoint of a pretraining run (one
per token budget) is fine-tuned with the *same* hyperparameters on a downstream domain; the paper
reports the fine-tune-domain quality and the pretraining-domain loss after fine-tuning, and finds
both degrade past some budget (U-shaped quality vs budget: "catastrophic overtraining").

:func:`finetune_degradation` does this for one checkpoint of this repository's training loop:

1. restore the checkpoint's params (its run's ``config.json`` gives the model); with
   ``parameterisation="effective"`` (default) factorised layers (LoRA/ReLoRA, low-rank, SLTrain)
   are first merged into dense kernels (:func:`lowrank_jax.analysis.sensitivity.densify`) so that
   every method is fine-tuned the same way, as a full-rank model; ``"native"`` keeps the model's
   own parameterisation (then only its trainable tensors move);
2. train with a *fresh* AdamW state (fine-tuning does not inherit pretraining moments) for
   ``steps`` steps at peak ``lr`` with the loop's schedule (linear warmup over ``warmup_ratio`` of
   the steps, cosine to ``min_lr_ratio``), on batches of the fine-tuning stream drawn by the same
   deterministic :class:`~lowrank_jax.data.BatchIterator` — the jitted step of
   :func:`lowrank_jax.train.step.make_trainer` does the work;
3. report the fine-tune-domain validation loss and the pretraining-domain validation loss before
   and after (``forgetting`` = its rise), plus the curve at ``eval_every`` steps.

The fine-tuning text must be encoded with the *pretraining* tokenizer: :func:`finetune_token_data`
loads the second corpus (e.g. ``data.source=pydoc`` when the model was pretrained on ``stdlib``)
with ``data.tokenizer`` pointing at the pretraining run's cached tokenizer file, so token ids mean
the same thing in both domains.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import config as config_lib
from lowrank_jax.analysis.sensitivity import densify
from lowrank_jax.config import Config
from lowrank_jax.data import BatchIterator, eval_batches, load_corpus, prepare_data
from lowrank_jax.data.tokenizer import get_tokenizer
from lowrank_jax.train.checkpoint import Checkpointer, checkpoint_steps
from lowrank_jax.train.relora import warm_start_config
from lowrank_jax.train.state import TrainState
from lowrank_jax.train.step import evaluate, make_trainer


def _flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_config(run_dir: str | Path) -> Config:
    """The validated :class:`Config` of a training run, read from its ``config.json``."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"checkpoint: no config.json in run directory {str(run_dir)!r}")
    return config_lib.load_config("tiny", _flatten_dict(json.loads(path.read_text())))


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, int]:
    """``(run_dir, step)`` from ``RUN`` (latest step) or ``RUN/checkpoints/STEP``."""

    p = Path(checkpoint).expanduser()
    if p.name.isdigit() and p.parent.name == "checkpoints":
        run_dir, step = p.parent.parent, int(p.name)
        if not p.is_dir():
            raise ValueError(f"checkpoint: no such checkpoint {str(p)!r}")
        return run_dir, step
    steps = checkpoint_steps(p / "checkpoints")
    if not steps:
        raise ValueError(f"checkpoint: no checkpoints under {str(p / 'checkpoints')!r}")
    return p, steps[-1]


def load_params(checkpoint: str | Path) -> tuple[Any, Config, int]:
    """``(params, run config, step)`` of a checkpoint (``RUN`` or ``RUN/checkpoints/STEP``), on the host."""

    run_dir, step = resolve_checkpoint(checkpoint)
    cfg = run_config(run_dir)
    if cfg.model.vocab_size == 0:
        raise ValueError(f"checkpoint: run config in {str(run_dir)!r} has no vocab_size")
    # A ReLoRA warm start stores full-rank states up to its switch step.
    layout_cfg = warm_start_config(cfg) if cfg.relora.warm_start and step <= cfg.relora.warm_start else cfg
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", keep=10_000, async_save=False)
    try:
        state, _ = ckpt.restore(step, make_trainer(layout_cfg).abstract_state)
    finally:
        ckpt.close()
    return jax.device_get(state.params), layout_cfg, step


def finetune_token_data(pretrain_cfg: Config, source: str = "pydoc", **data_changes: Any):
    """The second corpus encoded with the pretraining tokenizer (a :class:`~lowrank_jax.data.TokenData`).

    The pretraining tokenizer is the file named by ``pretrain_cfg.data.tokenizer`` or, for a trained
    BPE, the cached file the pretraining run used (found again from the pretraining corpus digest).
    """

    d = pretrain_cfg.data
    if d.tokenizer:
        tok_path = d.tokenizer
    else:
        tok_path = get_tokenizer(d, load_corpus(d)).path
    ft = dataclasses.replace(d, source=source, tokenizer=tok_path, **data_changes)
    data = prepare_data(ft)
    if data.vocab_size > pretrain_cfg.model.vocab_size:
        raise ValueError(
            f"source: tokenizer vocab {data.vocab_size} exceeds the model's {pretrain_cfg.model.vocab_size}"
        )
    return data


def _as_stream(name: str, x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or a.size < 2 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: expected a 1-D integer token stream, got {a.dtype} {a.shape}")
    return a.astype(np.int32)


def _check_settings(steps: Any, lr: Any, eval_every: Any, parameterisation: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: must be a positive integer, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: must be a positive number, got {lr!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(f"eval_every: must be an integer >= 0, got {eval_every!r}")
    if parameterisation not in ("effective", "native"):
        raise ValueError(f"parameterisation: must be 'effective' or 'native', got {parameterisation!r}")


def _streams(finetune_data: Any, pretrain_eval_data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fine-tune train, fine-tune val, pretraining val)`` token streams, int32."""
    if hasattr(finetune_data, "train") and hasattr(finetune_data, "val"):
        ft_train, ft_val = finetune_data.train, finetune_data.val
    elif isinstance(finetune_data, (tuple, list)) and len(finetune_data) == 2:
        ft_train, ft_val = finetune_data
    else:
        raise ValueError("finetune_data: expected a TokenData or a (train, val) pair of token streams")
    ft_train, ft_val = _as_stream("finetune_data", ft_train), _as_stream("finetune_data", ft_val)
    return ft_train, ft_val, _as_stream("pretrain_eval_data", pretrain_eval_data)


def _check_vocab(vocab: int, ft_train: np.ndarray, ft_val: np.ndarray, pt_val: np.ndarray) -> None:
    for name, stream in (("finetune_data", ft_train), ("finetune_data", ft_val), ("pretrain_eval_data", pt_val)):
        if stream.max() >= vocab or stream.min() < 0:
            raise ValueError(f"{name}: token ids must lie in [0, {vocab}) (encode with the pretraining tokenizer)")


def _finetune_config(pre_cfg: Config, model_cfg: Any, settings: dict[str, Any]) -> Config:
    """The pretraining config turned into plain AdamW fine-tuning with ``settings`` (no ReLoRA resets)."""
    return config_lib.replace(
        pre_cfg,
        model=model_cfg,
        optim=dataclasses.replace(
            pre_cfg.optim,
            name="adamw",
            lr=settings["lr"],
            warmup_ratio=settings["warmup_ratio"],
            min_lr_ratio=settings["min_lr_ratio"],
            weight_decay=settings["weight_decay"],
        ),
        relora=dataclasses.replace(pre_cfg.relora, every=0, warm_start=0),
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        grad_accum=1,
        seq_len=settings["seq_len"],
        seed=settings["seed"],
    )


def _fresh_state(trainer: Any, params: Any, seed: int) -> TrainState:
    """``params`` with a fresh optimizer state, step 0, placed with the trainer's shardings."""

    def init(p, raw_key):
        return TrainState(jnp.zeros((), jnp.int32), p, trainer.tx.init(p), raw_key, jnp.zeros((), jnp.int32))

    raw_key = jax.random.key_data(jax.random.key(seed))
    return jax.jit(init, out_shardings=trainer.state_shardings)(params, raw_key)


def _train(trainer, state, streams, settings: dict[str, Any], eval_every: int, eval_batch_size: int):
    """``(state, curve, train_losses)`` after ``settings["steps"]`` steps on the fine-tuning stream; both
    domains' validation losses at step 0, every ``eval_every`` steps and at the end."""
    ft_train, ft_val, pt_val = streams
    steps, sl, et = settings["steps"], settings["seq_len"], settings["eval_tokens"]
    ft_batches = eval_batches(ft_val, sl, et, eval_batch_size)
    pt_batches = eval_batches(pt_val, sl, et, eval_batch_size)
    iterator = BatchIterator(ft_train, settings["batch_size"], sl, settings["seed"])

    def measure(s: int) -> dict[str, float]:
        return {
            "step": s,
            "ft_loss": evaluate(trainer, state.params, ft_batches),
            "pt_loss": evaluate(trainer, state.params, pt_batches),
        }

    curve = [measure(0)]
    train_losses = []
    for t in range(steps):
        state, m = trainer.train_step(state, trainer.put_batch(iterator.batch(t)))
        train_losses.append(float(m["loss"]))
        done = t + 1
        if done == steps or (eval_every and done % eval_every == 0):
            curve.append(measure(done))
    return state, curve, train_losses


def finetune_degradation(
    checkpoint: str | Path,
    finetune_data: Any,
    pretrain_eval_data: Any,
    steps: int,
    lr: float,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    eval_tokens: int | None = None,
    eval_every: int = 0,
    warmup_ratio: float = 0.1,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    parameterisation: str = "effective",
    loaded: tuple[Any, Config, int] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` on ``finetune_data`` and measure both domains (see the module docstring).

    ``finetune_data``: an object with ``train`` and ``val`` token streams (a ``TokenData``) or a
    ``(train, val)`` pair; ``pretrain_eval_data``: the pretraining domain's validation token stream.
    ``loaded``: ``(params, config, step)`` of a checkpoint already in memory (e.g. a Hugging Face one,
    :func:`lowrank_jax.analysis.checkpoints.study_checkpoints`); ``checkpoint`` then only names it.
    ``batch_size``/``seq_len``/``eval_tokens`` default to the pretraining run's. Returns a dict with
    ``ft_loss_before/after``, ``pt_loss_before/after``, ``forgetting`` (pt after − before),
    ``ft_gain`` (ft before − after), the ``curve`` and the settings.
    """
    _check_settings(steps, lr, eval_every, parameterisation)
    streams = _streams(finetune_data, pretrain_eval_data)
    params, pre_cfg, step = loaded if loaded is not None else load_params(checkpoint)
    if parameterisation == "effective":
        params, model_cfg = densify(params, pre_cfg.model)
    else:
        model_cfg = pre_cfg.model
    _check_vocab(model_cfg.vocab_size, *streams)
    settings = {
        "steps": steps,
        "lr": float(lr),
        "batch_size": batch_size or pre_cfg.batch_size,
        "seq_len": seq_len or pre_cfg.seq_len,
        "eval_tokens": eval_tokens or pre_cfg.eval_tokens,
        "warmup_ratio": warmup_ratio,
        "min_lr_ratio": min_lr_ratio,
        "weight_decay": weight_decay,
        "seed": seed,
        "parameterisation": parameterisation,
        "model_dense_kind": pre_cfg.model.dense,
        "finetune_dense_kind": model_cfg.dense,
    }
    ft_cfg = _finetune_config(pre_cfg, model_cfg, settings)
    trainer = make_trainer(ft_cfg)
    state = _fresh_state(trainer, params, seed)
    state, curve, train_losses = _train(trainer, state, streams, settings, eval_every, ft_cfg.eval_batch_size)
    before, after = curve[0], curve[-1]
    return {
        "checkpoint_step": step,
        "pretrain_tokens": step * pre_cfg.tokens_per_step,
        "ft_loss_before": before["ft_loss"],
        "ft_loss_after": after["ft_loss"],
        "pt_loss_before": before["pt_loss"],
        "pt_loss_after": after["pt_loss"],
        "forgetting": after["pt_loss"] - before["pt_loss"],
        "ft_gain": before["ft_loss"] - after["ft_loss"],
        "curve": curve,
        "train_losses": train_losses,
        "skipped_steps": int(state.skipped),
        "settings": settings,
    }
