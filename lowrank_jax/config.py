"""Run configuration: frozen dataclasses validated before anything compiles.

A run is described by one YAML file (a named config shipped in ``lowrank_jax/configs`` or a path)
plus ``key=value`` overrides. Top-level keys are the training-loop fields of :class:`Config`;
``model.*``, ``data.*`` and ``optim.*`` address the sections. A YAML file may name another config
in ``base:`` and override part of it. Every problem is raised as :class:`ConfigError` naming the
field, which the CLI prints on one line and exits with status 2 before writing anything.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message names the offending field."""


@dataclass(frozen=True)
class ModelConfig:
    """LLaMA architecture. ``vocab_size=0`` takes the tokenizer's vocabulary size."""

    vocab_size: int = 0
    hidden: int = 256
    ffn: int = 688
    heads: int = 4
    layers: int = 4
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dense: str = "dense"  # dense-factory kind for attention + MLP linears: dense | lora | lowrank | sl | bitlinear
    lora_rank: int = 128  # rank of the lora / lowrank kinds
    lora_alpha: float = 32.0  # LoRA scale s = lora_alpha / lora_rank
    lora_trainable_scale: bool = False  # ReLoRA's trainable scale, used as tanh(s)
    sl_rank: int = 128  # SLTrain: rank r of the low-rank part B A
    sl_alpha: float = 32.0  # SLTrain: scale s = sl_alpha / sl_rank
    sl_density: float = 0.03  # SLTrain: fraction delta of in*out entries in the fixed sparse support
    sl_implementation: str = "auto"  # SLTrain matmul: xla | pallas | auto
    scan_layers: bool = True
    remat: bool = False
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"


@dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and split. See :mod:`lowrank_jax.data`."""

    source: str = "stdlib"  # stdlib | pydoc | files | tfds
    paths: tuple[str, ...] = ()  # globs, for source=files
    tfds_name: str = "c4/en:3.1.0"
    tfds_data_dir: str = ""
    tfds_split: str = "train"
    tfds_val_split: str = "validation"
    max_docs: int = 0  # 0: all documents (cap for tfds streams / quick runs)
    val_fraction: float = 0.05
    tokenizer: str = ""  # "": train a BPE tokenizer; else a SentencePiece .model or tokenizer.json
    vocab_size: int = 8192
    tokenizer_train_chars: int = 8_000_000
    cache_dir: str = "~/.cache/lowrank_jax"


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule: AdamW, linear warmup then cosine decay to ``min_lr_ratio``."""

    name: str = "adamw"
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass(frozen=True)
class GaloreConfig:
    """GaLore settings for ``optim.name=galore_adamw`` / ``galore_adamw8bit`` (see lowrank_jax.optim.galore).

    Applied to the attention and MLP kernels only; embeddings, norms and lm_head use the same Adam
    at full size. Paper recipe: rank 128 (60M) … 1024 (7B), update_proj_gap 200, scale 0.25, lr 0.01.
    """

    rank: int = 32
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    refresh: str = "all"  # all | staggered
    svd: str = "exact"  # exact | randomized
    moments: str = "keep"  # keep | reproject | reset
    canonical_signs: bool = False


@dataclass(frozen=True)
class ReloraConfig:
    """ReLoRA restarts for ``model.dense=lora`` (see lowrank_jax.optim.relora).

    ``every > 0``: merge the LoRA factors into the frozen weights every ``every`` steps, re-initialise
    them, prune the factors' optimizer moments (``reset``) and use the jagged cosine schedule with
    ``restart_warmup`` re-warm steps. ``every = 0`` is plain LoRA. ``warm_start = N > 0`` trains the
    first N steps full-rank (dense linears) and then switches to LoRA, carrying weights and optimizer
    state over; the switch is the first restart (restarts follow at N + k·every). ``jagged=false`` and
    ``reset=none`` switch those parts off for the paper's ablation (Table 6).
    """

    every: int = 0
    restart_warmup: int = 10
    reset: str = "random"  # random | magnitude | zero | none
    reset_ratio: float = 0.999
    warm_start: int = 0  # full-rank steps before switching to LoRA (0: LoRA from step 0)
    jagged: bool = True  # lr drops to 0 and re-warms at each restart (and at the warm-start switch)


@dataclass(frozen=True)
class Config:
    """A whole run. ``steps * batch_size * seq_len`` tokens are seen."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    relora: ReloraConfig = field(default_factory=ReloraConfig)
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 256
    seed: int = 0
    eval_every: int = 100  # 0: evaluate only at the end
    eval_tokens: int = 65536
    eval_batch_size: int = 16
    log_every: int = 10
    checkpoint_every: int = 0  # 0: no periodic checkpoints (a final one is still written)
    keep_checkpoints: int = 2
    mesh: tuple[int, ...] = (1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
    layerwise_update: bool = False  # update each block inside the backward pass (no full gradient)
    out_dir: str = "runs/default"
    resume: bool = False
    progress: bool = True

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "galore": GaloreConfig,
    "relora": ReloraConfig,
}
DTYPES = ("float32", "bfloat16")
SOURCES = ("stdlib", "pydoc", "files", "tfds")


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a named or file YAML config, resolving ``base:`` chains into one flat dict."""
    path = Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) or path.is_file()):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"config: unknown config {name_or_path!r} (named configs: {', '.join(named_configs())};"
                " or pass a .yaml path)"
            )
    if not path.is_file():
        raise ConfigError(f"config: no such file {str(path)!r}")
    if str(path.resolve()) in seen:
        raise ConfigError(f"base: circular base chain at {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"config: {str(path)!r} is not valid YAML ({first})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {str(path)!r} must hold a mapping of keys to values")
    flat = _flatten(raw)
    base = flat.pop("base", None)
    if base is None:
        return flat
    parent = _read_yaml(str(base), seen + (str(path.resolve()),))
    parent.update(flat)
    return parent


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in SECTIONS and not prefix:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(key: str, value: Any, typ: Any, from_cli: bool) -> Any:
    """Convert ``value`` to ``typ`` strictly; CLI strings are parsed as YAML scalars first."""
    if from_cli and isinstance(value, str):
        if typ is str:
            return value
        if typing.get_origin(typ) is tuple:
            return _coerce(key, [s for s in value.split(",") if s], typ, True)
        else:
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: cannot parse {value!r}") from None
    if typing.get_origin(typ) is tuple:
        elem = typing.get_args(typ)[0]
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(key, v, elem, from_cli) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover


def _apply(flat: dict[str, Any], from_cli: set[str]) -> Config:
    top_types = {k: t for k, t in _field_types(Config).items() if k not in SECTIONS}
    section_types = {name: _field_types(cls) for name, cls in SECTIONS.items()}
    top: dict[str, Any] = {}
    sec: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in flat.items():
        head, _, tail = key.partition(".")
        if tail and head in SECTIONS:
            types_ = section_types[head]
            if tail not in types_:
                raise ConfigError(f"{key}: unknown key (known {head}.* keys: {', '.join(sorted(types_))})")
            sec[head][tail] = _coerce(key, value, types_[tail], key in from_cli)
        elif key in top_types:
            top[key] = _coerce(key, value, top_types[key], key in from_cli)
        elif key in SECTIONS:
            raise ConfigError(f"{key}: is a section; set {key}.<field>=value")
        else:
            raise ConfigError(
                f"{key}: unknown key (known: {', '.join(sorted(top_types))}, {', '.join(k + '.*' for k in SECTIONS)})"
            )
    return Config(**top, **{name: SECTIONS[name](**vals) for name, vals in sec.items()})


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"{item}: overrides are written key=value")
        out[key.strip()] = value
    return out


def load_config(name_or_path: str, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build and validate a :class:`Config` from a named/file YAML and overrides."""
    flat = _read_yaml(name_or_path)
    cli: dict[str, Any] = {}
    if isinstance(overrides, dict):
        flat.update(overrides)
    elif overrides:
        cli = parse_overrides(list(overrides))
        flat.update(cli)
    cfg = _apply(flat, set(cli))
    validate(cfg)
    return cfg


def replace(cfg: Config, **changes: Any) -> Config:
    """``dataclasses.replace`` that accepts ``section__field`` keys and re-validates."""
    sec: dict[str, dict[str, Any]] = {}
    top = {}
    for k, v in changes.items():
        head, _, tail = k.partition("__")
        if tail:
            sec.setdefault(head, {})[tail] = v
        else:
            top[k] = v
    for name, vals in sec.items():
        top[name] = dataclasses.replace(getattr(cfg, name), **vals)
    out = dataclasses.replace(cfg, **top)
    validate(out)
    return out


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Cheap checks of every field (no data is read, nothing is written)."""
    from lowrank_jax.layers.dense import dense_kinds  # noqa: PLC0415 (avoid import cycle)

    m, d, o = cfg.model, cfg.data, cfg.optim
    for key, val in (
        ("model.hidden", m.hidden),
        ("model.ffn", m.ffn),
        ("model.heads", m.heads),
        ("model.layers", m.layers),
        ("model.max_seq_len", m.max_seq_len),
    ):
        _check(val > 0, key, f"must be positive, got {val}")
    _check(m.vocab_size >= 0, "model.vocab_size", f"must be >= 0 (0: from tokenizer), got {m.vocab_size}")
    _check(m.hidden % m.heads == 0, "model.heads", f"{m.heads} heads do not divide hidden={m.hidden}")
    _check((m.hidden // m.heads) % 2 == 0, "model.heads", "head dim hidden/heads must be even for rotary embeddings")
    _check(m.rope_theta > 0, "model.rope_theta", f"must be positive, got {m.rope_theta}")
    _check(m.norm_eps > 0, "model.norm_eps", f"must be positive, got {m.norm_eps}")
    _check(m.init_std > 0, "model.init_std", f"must be positive, got {m.init_std}")
    _check(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
    _check(m.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}, got {m.param_dtype!r}")
    kinds = dense_kinds()
    _check(m.dense in kinds, "model.dense", f"unknown dense kind {m.dense!r} (known: {', '.join(kinds)})")

    _check(d.source in SOURCES, "data.source", f"must be one of {SOURCES}, got {d.source!r}")
    if d.source == "files":
        _check(bool(d.paths), "data.paths", "source=files needs at least one glob")
        for pattern in d.paths:
            hits = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
            _check(bool(hits), "data.paths", f"glob {pattern!r} matches no files")
    if d.source == "tfds":
        _check(bool(d.tfds_data_dir), "data.tfds_data_dir", "source=tfds needs the prepared data directory")
        _check(
            os.path.isdir(os.path.expanduser(d.tfds_data_dir)),
            "data.tfds_data_dir",
            f"no such directory {d.tfds_data_dir!r}",
        )
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _check(d.max_docs >= 0, "data.max_docs", f"must be >= 0, got {d.max_docs}")
    if d.tokenizer:
        _check(os.path.isfile(os.path.expanduser(d.tokenizer)), "data.tokenizer", f"no such file {d.tokenizer!r}")
    else:
        _check(
            d.vocab_size >= 257,
            "data.vocab_size",
            f"must be >= 257 (256 bytes + end-of-document) to train a tokenizer, got {d.vocab_size}",
        )
    _check(d.tokenizer_train_chars > 0, "data.tokenizer_train_chars", "must be positive")

    _check(
        o.name in _optimizer_names(),
        "optim.name",
        f"unknown optimizer {o.name!r} (known: {', '.join(_optimizer_names())})",
    )
    _check(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _check(0.0 <= o.warmup_ratio < 1.0, "optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio}")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _check(0.0 <= o.b1 < 1.0, "optim.b1", f"must be in [0, 1), got {o.b1}")
    _check(0.0 <= o.b2 < 1.0, "optim.b2", f"must be in [0, 1), got {o.b2}")
    _check(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")

    g = cfg.galore
    _check(g.rank > 0, "galore.rank", f"must be positive, got {g.rank}")
    _check(g.update_proj_gap > 0, "galore.update_proj_gap", f"must be positive, got {g.update_proj_gap}")
    _check(g.scale > 0, "galore.scale", f"must be positive, got {g.scale}")
    for key, val, allowed in (
        ("proj_type", g.proj_type, ("std", "reverse_std", "input", "output", "both")),
        ("refresh", g.refresh, ("all", "staggered")),
        ("svd", g.svd, ("exact", "randomized")),
        ("moments", g.moments, ("keep", "reproject", "reset")),
    ):
        _check(val in allowed, f"galore.{key}", f"must be one of {allowed}, got {val!r}")

    _check(m.lora_rank > 0, "model.lora_rank", f"must be positive, got {m.lora_rank}")
    _check(m.lora_alpha > 0, "model.lora_alpha", f"must be positive, got {m.lora_alpha}")
    _check(m.sl_rank > 0, "model.sl_rank", f"must be positive, got {m.sl_rank}")
    _check(m.sl_alpha > 0, "model.sl_alpha", f"must be positive, got {m.sl_alpha}")
    _check(0.0 < m.sl_density <= 1.0, "model.sl_density", f"must be in (0, 1], got {m.sl_density}")
    _check(
        m.sl_implementation in ("xla", "pallas", "auto"),
        "model.sl_implementation",
        f"must be one of ('xla', 'pallas', 'auto'), got {m.sl_implementation!r}",
    )
    r = cfg.relora
    _check(r.every >= 0, "relora.every", f"must be >= 0 (0: no restarts), got {r.every}")
    _check(
        r.reset in ("random", "magnitude", "zero", "none"),
        "relora.reset",
        f"must be one of ('random', 'magnitude', 'zero', 'none'), got {r.reset!r}",
    )
    _check(0.0 <= r.reset_ratio < 1.0, "relora.reset_ratio", f"must be in [0, 1), got {r.reset_ratio}")
    _check(r.warm_start >= 0, "relora.warm_start", f"must be >= 0 (0: no warm start), got {r.warm_start}")
    if r.warm_start:
        _check(m.dense == "lora", "relora.warm_start", f"a warm start switches to model.dense=lora, got {m.dense!r}")
        _check(r.warm_start < cfg.steps, "relora.warm_start", f"must be < steps={cfg.steps}, got {r.warm_start}")
    if r.every:
        _check(m.dense == "lora", "relora.every", f"restarts need model.dense=lora, got {m.dense!r}")
    if r.jagged and (r.every or r.warm_start):
        cycle = r.every or cfg.steps - r.warm_start
        _check(
            0 < r.restart_warmup < cycle,
            "relora.restart_warmup",
            f"must be in [1, {cycle}) (the restart cycle), got {r.restart_warmup}",
        )
        first_restart = r.warm_start or r.every
        first_warmup = int(o.warmup_ratio * cfg.steps)
        _check(
            first_warmup <= first_restart,
            "optim.warmup_ratio",
            f"the first warmup ({first_warmup} steps) must end before the first restart (step {first_restart})",
        )
    if cfg.layerwise_update:
        _check(m.scan_layers, "layerwise_update", "needs model.scan_layers=true (blocks stacked on a layers axis)")
        _check(
            not (r.every or r.warm_start),
            "layerwise_update",
            "does not combine with ReLoRA restarts or a warm start (relora.every / relora.warm_start)",
        )
    if m.dense in ("lora", "lowrank"):
        _check(
            not o.name.startswith("galore"),
            "optim.name",
            f"{o.name} projects the kernels; it does not combine with model.dense={m.dense}",
        )

    for key in (
        "steps",
        "batch_size",
        "grad_accum",
        "seq_len",
        "eval_tokens",
        "eval_batch_size",
        "log_every",
        "keep_checkpoints",
    ):
        _check(getattr(cfg, key) > 0, key, f"must be positive, got {getattr(cfg, key)}")
    for key in ("eval_every", "checkpoint_every"):
        _check(getattr(cfg, key) >= 0, key, f"must be >= 0, got {getattr(cfg, key)}")
    _check(
        cfg.batch_size % cfg.grad_accum == 0,
        "grad_accum",
        f"{cfg.grad_accum} does not divide batch_size={cfg.batch_size}",
    )
    _check(cfg.seq_len <= m.max_seq_len, "seq_len", f"{cfg.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(len(cfg.mesh) == 3, "mesh", f"needs three sizes (data, fsdp, tensor), got {cfg.mesh}")
    _check(
        all(n > 0 or n == -1 for n in cfg.mesh) and list(cfg.mesh).count(-1) <= 1,
        "mesh",
        f"sizes must be positive, with at most one -1, got {cfg.mesh}",
    )
    _check(bool(cfg.out_dir), "out_dir", "must be a directory path")
    out = Path(cfg.out_dir).expanduser()
    _check(not out.exists() or out.is_dir(), "out_dir", f"{cfg.out_dir!r} exists and is not a directory")


def _optimizer_names() -> list[str]:
    from lowrank_jax.train.optimizer import optimizer_names  # noqa: PLC0415

    return optimizer_names()


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict for results.json and config.json (tuples serialise as lists)."""
    return dataclasses.asdict(cfg)
