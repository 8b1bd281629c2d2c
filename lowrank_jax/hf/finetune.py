"""``train … init_from=DIR``: start a run from pretrained weights (fine-tuning with any method).

``init_from`` names a model directory (``lowrank-jax import-hf``), a Hugging Face checkpoint
directory or a training run. Before anything compiles, :func:`apply_init_from` replaces the run's
architecture fields (``model.vocab_size`` … ``model.tie_embeddings``) by the checkpoint's and, when
``data.tokenizer`` is empty, points it at the checkpoint's ``tokenizer.json``; the method fields
(``model.dense``, ranks, dtypes, ``scan_layers``) stay the run's. :func:`init_state_from` then builds
the fresh state as usual and puts the pretrained weights in:

- ``model.dense=dense`` (full-rank, GaLore / GoLore, APOLLO, Fira): every parameter is the
  checkpoint's;
- ``model.dense=lora`` (LoRA, ReLoRA): the frozen ``W`` of every linear is the checkpoint's weight and
  the factors keep their initialisation with ``B = 0`` (Hu et al., "LoRA", arXiv 2106.09685), so the
  model computes the pretrained function at step 0;
- ``model.dense=bitlinear``: the latent weights are the checkpoint's (the quantised forward differs);
- the other kinds cannot hold a dense weight exactly and are refused.

The optimizer state is initialised on the pretrained params. The first step's loss is therefore the
pretrained model's loss on the first batch.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax import config as config_lib
from lowrank_jax.config import Config, ConfigError
from lowrank_jax.hf.convert import layer_params
from lowrank_jax.hf.model_dir import load_model
from lowrank_jax.hf.transfer import dense_params

ARCHITECTURE = (
    "vocab_size",
    "hidden",
    "ffn",
    "heads",
    "layers",
    "max_seq_len",
    "rope_theta",
    "norm_eps",
    "num_kv_heads",
    "head_dim",
    "rope_scaling",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_seq_len",
    "tie_embeddings",
)
KINDS = ("dense", "lora", "bitlinear")


@functools.lru_cache(maxsize=2)
def _load(path: str):
    try:
        return load_model(path)
    except ValueError as e:
        raise ConfigError(f"init_from: {str(e).splitlines()[0]}") from None


def apply_init_from(cfg: Config) -> Config:
    """``cfg`` with the checkpoint's architecture (and tokenizer); ``cfg`` itself without ``init_from``."""
    if not cfg.init_from or cfg.resume:
        return cfg
    if cfg.model.dense not in KINDS:
        kinds = ", ".join(KINDS)
        raise ConfigError(f"init_from: model.dense={cfg.model.dense} cannot start from dense weights ({kinds})")
    model = _load(cfg.init_from)
    changes: dict[str, Any] = {f"model__{k}": getattr(model.cfg, k) for k in ARCHITECTURE}
    if not cfg.data.tokenizer and model.tokenizer:
        changes["data__tokenizer"] = model.tokenizer
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"seq_len: {cfg.seq_len} exceeds the checkpoint's max_seq_len={model.cfg.max_seq_len}")
    return config_lib.replace(cfg, **changes)


def _place(fresh: Any, pretrained: Any, kind: str) -> Any:
    """The fresh params with every dense weight (``kernel`` of a linear, embeddings, norms) from ``pretrained``."""
    if isinstance(fresh, dict):
        if kind == "lora" and "lora_a" in fresh:
            return {**fresh, "kernel": jnp.asarray(pretrained["kernel"], fresh["kernel"].dtype)}
        missing = set(pretrained) ^ set(fresh)
        if missing:
            raise ConfigError(f"init_from: parameter {sorted(missing, key=str)[0]!r} does not match the run's model")
        return {k: _place(fresh[k], pretrained[k], kind) for k in fresh}
    if tuple(fresh.shape) != tuple(pretrained.shape):
        raise ConfigError(f"init_from: a parameter of shape {pretrained.shape} does not fit {fresh.shape}")
    return jnp.asarray(pretrained, fresh.dtype)


def init_state_from(phases: Any, cfg: Config) -> Any:
    """The initial train state of ``phases`` (:class:`lowrank_jax.train.step.Phases`) with the pretrained weights."""
    trainer = phases.phase(0)[0]
    state = phases.init_state()
    model = _load(cfg.init_from)
    pretrained = model.params
    if model.cfg.dense != "dense":
        pretrained, _ = dense_params(pretrained, model.cfg)
    if model.cfg.scan_layers != trainer.cfg.model.scan_layers:
        layers = layer_params(pretrained, model.cfg)
        blocks = (
            jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
            if trainer.cfg.model.scan_layers
            else dict(enumerate(layers))
        )
        pretrained = {**pretrained, "blocks": blocks}
    params = _place(jax.device_get(state.params), pretrained, trainer.cfg.model.dense)

    def put(params, state):
        return state._replace(params=params, opt_state=trainer.tx.init(params))

    return jax.jit(put, out_shardings=trainer.state_shardings, donate_argnums=(1,))(params, state)


def describe(cfg: Config) -> str:
    """A log line naming the checkpoint a run starts from."""
    return f"init_from: weights of {cfg.init_from} ({cfg.model.layers} layers, vocab {cfg.model.vocab_size})"


__all__ = ["apply_init_from", "describe", "init_state_from"]
