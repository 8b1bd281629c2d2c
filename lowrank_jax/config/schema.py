"""The run configuration as a typed schema: frozen pydantic dataclasses, validated on construction.

Each section checks its own fields: strict types, ``Literal`` choices imported from the modules
that own them, ``Field`` bounds. :class:`Config` adds, in one ``model_validator``, the rules that
involve several fields or a registry filled at import time (``model.dense`` against
:func:`~lowrank_jax.layers.dense_kinds`, ``optim.name`` against
:func:`~lowrank_jax.optim.registry.optimizer_names`), so a section may hold a kind registered
later (``dataclasses.replace(model_cfg, dense="my_kind")``). Nothing here reads the filesystem:
:func:`check_paths` does, after the schema. Every problem is a one-line :class:`ConfigError`
naming the field (:mod:`lowrank_jax.config.errors`).

Types are strict, as a config file should be: ``2.5`` is not an int, ``1`` is not a bool, ``3`` is
not a string. A float field takes an int, a NumPy number and a numeric string (YAML 1.1 reads
``1e-6`` without a dot as a string); an int field takes an integral float (``16.0``); a tuple field
takes a list or a single item.
"""

import dataclasses
import glob
import os
from numbers import Integral, Real
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from lowrank_jax.config.errors import ConfigError, one_line_errors
from lowrank_jax.data.corpus import SOURCES
from lowrank_jax.layers import dense_kinds
from lowrank_jax.layers.dense import DTYPES
from lowrank_jax.optim.apollo import APOLLO_PROJ_TYPES, SCALE_TYPES
from lowrank_jax.optim.galore import MOMENT_MODES, PROJ_TYPES, PROJECTORS, REFRESH_MODES, SVD_MODES
from lowrank_jax.optim.ldadam import LDADAM_PROJ_TYPES
from lowrank_jax.optim.q_galore import Q_GALORE_PROJ_TYPES
from lowrank_jax.optim.registry import optimizer_names, optimizer_sections
from lowrank_jax.optim.relora import RESET_MODES
from lowrank_jax.optim.swan import WHITEN_MODES
from pallas_kernels.sl_matmul.api import IMPLEMENTATIONS

SCHEMA = ConfigDict(extra="forbid", strict=True)


def _int(v: Any) -> Any:
    """An integral float (``16.0``) or a NumPy integer as an int; anything else is left to the strict check."""
    if isinstance(v, Integral) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _float(v: Any) -> Any:
    """A numeric string (YAML 1.1's ``1e-6``), an int or a NumPy number as a float; not a bool."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    if isinstance(v, Real) and not isinstance(v, bool):
        return float(v)
    return v


def _tuple(v: Any) -> Any:
    """A list (YAML, JSON) as a tuple, a single string or int as a 1-tuple."""
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, (str, int)) and not isinstance(v, bool):
        return (v,)
    return v


Int = Annotated[int, BeforeValidator(_int)]
Float = Annotated[float, BeforeValidator(_float)]
Positive = Field(gt=0)
NonNegative = Field(ge=0)
Fraction = Field(ge=0, lt=1)  # [0, 1)
GroupLr = Annotated[Float, NonNegative] | None  # None: optim.lr; 0 freezes the group


@one_line_errors("model")
@dataclass(frozen=True, config=SCHEMA)
class ModelConfig:
    """LLaMA architecture. ``vocab_size=0`` takes the tokenizer's vocabulary size."""

    vocab_size: Annotated[Int, Field(ge=0, description="0: from tokenizer")] = 0
    hidden: Annotated[Int, Positive] = 256
    ffn: Annotated[Int, Positive] = 688
    heads: Annotated[Int, Positive] = 4
    layers: Annotated[Int, Positive] = 4
    max_seq_len: Annotated[Int, Positive] = 256
    rope_theta: Annotated[Float, Positive] = 10000.0
    norm_eps: Annotated[Float, Field(gt=0, lt=1)] = 1e-6
    init_std: Annotated[Float, Positive] = 0.02
    num_kv_heads: Annotated[Int, Field(ge=0, description="0: heads")] = 0  # grouped-query attention (GQA)
    head_dim: Annotated[Int, Field(ge=0, description="0: hidden // heads")] = 0
    rope_scaling: Literal["none", "llama3"] = "none"  # llama3: Llama-3.1's frequency-dependent rope scaling
    rope_factor: Annotated[Float, Field(ge=1)] = 8.0  # llama3 scaling: wavelengths past low_freq_wavelen / factor
    rope_low_freq_factor: Annotated[Float, Positive] = 1.0
    rope_high_freq_factor: Annotated[Float, Positive] = 4.0
    rope_original_max_seq_len: Annotated[Int, Positive] = 8192
    tie_embeddings: bool = False  # lm_head reuses the input embedding (logits = h · embedᵀ)
    dense: str = "dense"  # dense-factory kind for attention + MLP linears: dense | lora | lowrank | sl | bitlinear
    lora_rank: Annotated[Int, Positive] = 128  # rank of the lora / lowrank kinds
    lora_alpha: Annotated[Float, Positive] = 32.0  # LoRA scale s = lora_alpha / lora_rank
    lora_trainable_scale: bool = False  # ReLoRA's trainable scale, used as tanh(s)
    sl_rank: Annotated[Int, Positive] = 128  # SLTrain: rank r of the low-rank part B A
    sl_alpha: Annotated[Float, Positive] = 32.0  # SLTrain: scale s = sl_alpha / sl_rank
    sl_density: Annotated[Float, Field(gt=0, le=1)] = 0.03  # SLTrain: fraction delta of in*out entries in the support
    sl_implementation: Literal[IMPLEMENTATIONS] = "auto"  # SLTrain matmul: xla | pallas | auto
    scan_layers: bool = True
    remat: bool = False
    dtype: Literal[DTYPES] = "float32"  # compute dtype
    param_dtype: Literal[DTYPES] = "float32"

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``num_kv_heads``, or ``heads`` (multi-head attention) when 0."""
        return self.num_kv_heads or self.heads

    @property
    def head_size(self) -> int:
        """Per-head dimension: ``head_dim``, or ``hidden // heads`` when 0."""
        return self.head_dim or self.hidden // self.heads


def _model_shape_rules(m: ModelConfig) -> None:
    """Attention shapes (heads, GQA groups, even rotary head dim) and the llama3 rope-scaling band."""
    if m.head_dim == 0:
        _check(m.hidden % m.heads == 0, "model.heads", f"{m.heads} heads do not divide hidden={m.hidden}")
        even = (m.hidden // m.heads) % 2 == 0
        _check(even, "model.heads", "head dim hidden/heads must be even for rotary embeddings")
    else:
        _check(m.head_dim % 2 == 0, "model.head_dim", f"must be even for rotary embeddings, got {m.head_dim}")
    kv = m.num_kv_heads or m.heads
    _check(kv <= m.heads and m.heads % kv == 0, "model.num_kv_heads", f"{kv} does not divide heads={m.heads}")
    if m.rope_scaling == "llama3":
        _check(
            m.rope_high_freq_factor > m.rope_low_freq_factor,
            "model.rope_high_freq_factor",
            f"must exceed rope_low_freq_factor={m.rope_low_freq_factor}, got {m.rope_high_freq_factor}",
        )


@one_line_errors("data")
@dataclass(frozen=True, config=SCHEMA)
class DataConfig:
    """Corpus, tokenizer and split. See :mod:`lowrank_jax.data`."""

    source: Literal[SOURCES] = "stdlib"
    paths: Annotated[tuple[str, ...], BeforeValidator(_tuple)] = ()  # globs, for source=files
    tfds_name: str = "c4/en:3.1.0"
    tfds_data_dir: str = ""
    tfds_split: str = "train"
    tfds_val_split: str = "validation"
    max_docs: Annotated[Int, NonNegative] = 0  # 0: all documents (cap for tfds streams / quick runs)
    val_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.05
    tokenizer: str = ""  # "": train a BPE tokenizer; else a SentencePiece .model or tokenizer.json
    vocab_size: Int = 8192  # of a trained tokenizer (>= 257, checked with `tokenizer` by Config)
    tokenizer_train_chars: Annotated[Int, Positive] = 8_000_000
    cache_dir: str = "~/.cache/lowrank_jax"
    # "": the corpus is tokenized into shards under cache_dir on first use; else a directory written by
    # `lowrank-jax prepare` (its manifest fixes the tokenizer; the source fields above are then not read)
    shards: str = ""


@one_line_errors("logging")
@dataclass(frozen=True, config=SCHEMA)
class LoggingConfig:
    """Where the scalars go besides ``metrics.jsonl`` and ``loss.png`` (process 0 writes them).

    ``tensorboard``: event files under ``out_dir/tensorboard`` (``tensorboard --logdir out_dir``).
    ``wandb``: a Weights & Biases run (``pip install wandb``); ``wandb_mode=offline`` needs no network
    (sync later with ``wandb sync``).
    """

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "lowrank-jax"
    wandb_mode: Literal["offline", "online"] = "offline"


@one_line_errors("optim")
@dataclass(frozen=True, config=SCHEMA)
class OptimConfig:
    """Optimizer and schedule: AdamW, linear warmup then cosine decay to ``min_lr_ratio``.

    ``name`` is one of :func:`~lowrank_jax.optim.registry.optimizer_names` (checked by :class:`Config`).
    ``lr_embed`` / ``lr_blocks`` / ``lr_factors`` / ``lr_norms`` give a parameter group its own peak
    learning rate (the same warmup and decay); a group left null trains at ``lr``, one at 0 is frozen.
    """

    name: str = "adamw"
    lr: Annotated[Float, Positive] = 1e-3
    warmup_ratio: Annotated[Float, Fraction] = 0.1
    min_lr_ratio: Annotated[Float, Field(ge=0, le=1)] = 0.1
    b1: Annotated[Float, Fraction] = 0.9
    b2: Annotated[Float, Fraction] = 0.999
    eps: Annotated[Float, Positive] = 1e-8
    weight_decay: Annotated[Float, NonNegative] = 0.0
    grad_clip: Annotated[Float, Field(ge=0, description="0 disables")] = 1.0
    # Peak learning rates of the parameter groups (lowrank_jax.train.optimizer.LR_GROUPS); null: ``lr``.
    lr_embed: GroupLr = None  # token embedding and lm_head
    lr_blocks: GroupLr = None  # the blocks' dense kernels (attention, MLP; BitLinear's latent weights)
    lr_factors: GroupLr = None  # the method's trainable leaves: LoRA / low-rank factors and scale, SLTrain B, A, values
    lr_norms: GroupLr = None  # RMSNorm scales and other vectors


@dataclass(frozen=True, config=SCHEMA)
class _ProjectorFields:
    """The GaLore projector settings that the ``galore``, ``golore`` and ``fira`` sections each hold (keywords of
    :func:`lowrank_jax.optim.galore.galore`, :func:`~lowrank_jax.optim.galore.golore`, :func:`~lowrank_jax.optim.fira`).
    """

    rank: Annotated[Int, Positive] = 32
    update_proj_gap: Annotated[Int, Positive] = 200
    scale: Annotated[Float, Positive] = 0.25
    proj_type: Literal[PROJ_TYPES] = "std"
    refresh: Literal[REFRESH_MODES] = "all"
    svd: Literal[SVD_MODES] = "exact"
    moments: Literal[MOMENT_MODES] = "keep"
    canonical_signs: bool = False
    oversample: Annotated[Int, NonNegative] = 8  # svd=randomized: sketch columns beyond the rank


@one_line_errors("galore")
@dataclass(frozen=True, config=SCHEMA)
class GaloreConfig(_ProjectorFields):
    """GaLore for ``optim.name=galore_adamw`` / ``galore_adamw8bit`` (:func:`lowrank_jax.optim.galore.galore`).

    The field names are exactly keyword arguments of :func:`~lowrank_jax.optim.galore.galore`: the optimizer
    builders (:mod:`lowrank_jax.optim.registry`) pass each field as that keyword, so a new GaLore option is one
    field here, one keyword in the builders and its keyword in the transform.

    Applied to the attention and MLP kernels only; embeddings, norms and lm_head use the same Adam at full size.
    Paper recipe: rank 128 (60M) … 1024 (7B), update_proj_gap 200, scale 0.25, lr 0.01.
    """

    projector: Literal[PROJECTORS] = "svd"  # random: GoLore's projectors from random_from on (see golore_adamw)
    random_from: Annotated[Int, NonNegative] = 0  # the switch step; only with projector=random


@one_line_errors("golore")
@dataclass(frozen=True, config=SCHEMA)
class GoloreConfig(_ProjectorFields):
    """GoLore for ``optim.name=golore_adamw`` (:func:`lowrank_jax.optim.galore.golore`): GaLore whose refreshes draw
    random orthonormal projectors from step ``random_from`` on. Official recipe: ``random_from = 0.8 · steps``,
    scale 1, the first moment re-projected at each refresh (``moments=reproject_first``)."""

    scale: Annotated[Float, Positive] = 1.0
    moments: Literal[MOMENT_MODES] = "reproject_first"
    random_from: Annotated[Int, NonNegative] = 0  # 0: random projectors from the start


NormGrowthLimit = Annotated[Float, Field(ge=0, description="0: off, else >= 1")]


@dataclass(frozen=True, config=SCHEMA)
class _ApolloShared:
    """The fields APOLLO and APOLLO-Mini share (keywords of :func:`lowrank_jax.optim.apollo`)."""

    update_proj_gap: Annotated[Int, Positive] = 200
    proj_type: Literal[APOLLO_PROJ_TYPES] = "std"
    norm_growth_limit: NormGrowthLimit = 1.01
    eight_bit: bool = False  # 8-bit block-wise quantized low-rank moments
    seed: Annotated[Int, NonNegative] = 0  # of the random projections


@one_line_errors("apollo")
@dataclass(frozen=True, config=SCHEMA)
class ApolloConfig(_ApolloShared):
    """APOLLO for ``optim.name=apollo_adamw`` (see lowrank_jax.optim.apollo); fields are :func:`apollo` keywords.

    Applied to the attention and MLP kernels; the rest use the same Adam at full size. Official recipe: rank
    128 (60M), 192 (130M), 256 (350M, 1B, 7B), update_proj_gap 200, scale 1, channel-wise, lr 0.01.
    """

    rank: Annotated[Int, Positive] = 32
    scale: Annotated[Float, Positive] = 1.0  # the update is multiplied by sqrt(scale), as in the official code
    scale_type: Literal[SCALE_TYPES] = "channel"
    scale_front: bool = False  # sqrt(scale) before the norm-growth limiter instead of after


@one_line_errors("apollo_mini")
@dataclass(frozen=True, config=SCHEMA)
class ApolloMiniConfig(_ApolloShared):
    """APOLLO-Mini for ``optim.name=apollo_mini_adamw``: tensor-wise scaling; fields are :func:`apollo_mini` keywords.

    Official recipe: rank 1, scale 128 (applied as sqrt(128)), scale_front, update_proj_gap 200, lr 0.01.
    """

    rank: Annotated[Int, Positive] = 1
    scale: Annotated[Float, Positive] = 128.0
    scale_front: bool = True


@one_line_errors("fira")
@dataclass(frozen=True, config=SCHEMA)
class FiraConfig(_ProjectorFields):
    """Fira for ``optim.name=fira_adamw`` (:func:`lowrank_jax.optim.fira`): GaLore's projector settings and its own.

    Fira = GaLore + the norm-scaled residual of the gradient outside the subspace. Official recipe: rank 128 (60M)
    … 512 (1B, 7B), update_proj_gap 200, scale (alpha) 0.25, lr 0.01.
    """

    norm_growth_limit: NormGrowthLimit = 1.01
    eight_bit: bool = False  # 8-bit block-wise quantized low-rank moments


@one_line_errors("swan")
@dataclass(frozen=True, config=SCHEMA)
class SwanConfig:
    """SWAN for ``optim.name=swan`` (:func:`lowrank_jax.optim.swan.swan`); fields are its keywords.

    Applied to the attention and MLP kernels (no state); the rest use Adam at full size, as in the paper
    (Ma et al., ICML 2025, arXiv 2412.13148).
    """

    normalize: bool = True  # GradNorm (row-wise standardisation) before whitening
    whiten: Literal[WHITEN_MODES] = "newton_schulz"  # exact: the SVD polar factor; none: GradNorm only
    ns_steps: Annotated[Int, Positive] = 10
    norm_eps: Annotated[Float, NonNegative] = 1e-8
    scale: Annotated[Float, Positive] = 1.0


@one_line_errors("ldadam")
@dataclass(frozen=True, config=SCHEMA)
class LdadamConfig:
    """LDAdam for ``optim.name=ldadamw`` (:func:`lowrank_jax.optim.ldadam.ldadam`); fields are its keywords.

    Official recipe (IST-DASLab/LDAdam): rank 8 (350M pretraining), b1 0.908, b2 0.99, eps 1e-8, rho 0.908, lr 1e-3.
    """

    rank: Annotated[Int, Positive] = 16
    rho: Annotated[Float, Field(ge=0, lt=1)] = 0.908
    proj_type: Literal[LDADAM_PROJ_TYPES] = "std"
    error_feedback: bool = True


@one_line_errors("q_galore")
@dataclass(frozen=True, config=SCHEMA)
class QGaloreConfig:
    """Q-GaLore for ``optim.name=q_galore_adamw8bit`` (:func:`lowrank_jax.optim.q_galore.q_galore`); fields are its
    keywords. Official recipe: rank 128 (60M) … 1024 (7B), update_proj_gap 200 (7B 500), scale 0.25, INT4
    projectors in groups of 256, cos_threshold 0.4, gamma_proj 2, queue_size 5, 8-bit AdamW with b2 0.95."""

    rank: Annotated[Int, Positive] = 32
    update_proj_gap: Annotated[Int, Positive] = 200
    scale: Annotated[Float, Positive] = 0.25
    proj_type: Literal[Q_GALORE_PROJ_TYPES] = "std"
    proj_quant: bool = True
    proj_bits: Annotated[Int, Field(ge=1, le=8)] = 4
    proj_group_size: Annotated[Int, Field(ge=2)] = 256
    cos_threshold: Annotated[Float, Field(ge=-1, le=1)] = 0.4
    gamma_proj: Annotated[Float, Field(ge=1)] = 2.0
    queue_size: Annotated[Int, Positive] = 5


@one_line_errors("relora")
@dataclass(frozen=True, config=SCHEMA)
class ReloraConfig:
    """ReLoRA restarts for ``model.dense=lora`` (see lowrank_jax.optim.relora).

    ``every > 0``: merge the LoRA factors into the frozen weights every ``every`` steps, re-initialise
    them, prune the factors' optimizer moments (``reset``) and use the jagged cosine schedule with
    ``restart_warmup`` re-warm steps. ``every = 0`` is plain LoRA. ``warm_start = N > 0`` trains the
    first N steps full-rank (dense linears) and then switches to LoRA, carrying weights and optimizer
    state over; the switch is the first restart (restarts follow at N + k·every). ``jagged=false`` and
    ``reset=none`` switch those parts off for the paper's ablation (Table 6).
    """

    every: Annotated[Int, Field(ge=0, description="0: no restarts")] = 0
    restart_warmup: Int = 10  # in [1, restart cycle), checked by Config when restarts are on
    reset: Literal[RESET_MODES] = "random"
    reset_ratio: Annotated[Float, Fraction] = 0.999
    warm_start: Annotated[Int, Field(ge=0, description="0: no warm start")] = 0  # full-rank steps before LoRA
    jagged: bool = True  # lr drops to 0 and re-warms at each restart (and at the warm-start switch)

    @property
    def first_restart(self) -> int:
        """``F``: the warm-start switch if there is one, else the first ``every`` boundary (0: neither)."""
        return self.warm_start or self.every

    @property
    def jagged_schedule(self) -> bool:
        """Whether the run's schedule is ReLoRA's jagged cosine (restarts or a warm start, and ``jagged``)."""
        return self.jagged and self.first_restart > 0


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "galore": GaloreConfig,
    "golore": GoloreConfig,
    "relora": ReloraConfig,
    "apollo": ApolloConfig,
    "apollo_mini": ApolloMiniConfig,
    "fira": FiraConfig,
    "swan": SwanConfig,
    "ldadam": LdadamConfig,
    "q_galore": QGaloreConfig,
    "logging": LoggingConfig,
}


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# Method sections (read only by the optimizers that name them in the registry) and the model fields that only some
# layer kinds (model.dense) read.
METHOD_SECTIONS = ("galore", "golore", "apollo", "apollo_mini", "fira", "swan", "ldadam", "q_galore")
LAYER_FIELDS = {
    "lora_rank": ("lora", "lowrank"),
    "lora_alpha": ("lora",),
    "lora_trainable_scale": ("lora",),
    "sl_rank": ("sl",),
    "sl_alpha": ("sl",),
    "sl_density": ("sl",),
    "sl_implementation": ("sl",),
}


def _changed_fields(section: Any) -> list[str]:
    """The fields of a section that differ from the section's defaults."""
    default = type(section)()
    return [f.name for f in dataclasses.fields(section) if getattr(section, f.name) != getattr(default, f.name)]


def check_unread_settings(cfg: "Config") -> None:
    """A setting the chosen optimizer or layer kind does not read is an error, not a silent no-op.

    Run on every config read from YAML and ``key=value`` overrides (:func:`~lowrank_jax.config.load_config`):
    a method section or layer field that differs from its defaults must be read by ``optim.name`` /
    ``model.dense``. :func:`~lowrank_jax.config.replace` (Python) leaves such composition to the caller.
    """
    name = cfg.optim.name
    reads = optimizer_sections(name)
    for section in METHOD_SECTIONS:
        changed = _changed_fields(getattr(cfg, section))
        if changed and section not in reads:
            where = f"its settings are in {', '.join(s + '.*' for s in reads)}" if reads else "it has no method section"
            raise ConfigError(f"{section}.{changed[0]}: not read by optim.name={name} ({where})")
    m = cfg.model
    for field in _changed_fields(m):
        kinds = LAYER_FIELDS.get(field)
        if kinds and m.dense not in kinds:
            raise ConfigError(f"model.{field}: not read by model.dense={m.dense} (only by {', '.join(kinds)})")


@one_line_errors("")
@dataclass(frozen=True, config=SCHEMA)
class Config:
    """A whole run. ``steps * batch_size * seq_len`` tokens are seen."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    galore: GaloreConfig = dataclasses.field(default_factory=GaloreConfig)
    golore: GoloreConfig = dataclasses.field(default_factory=GoloreConfig)
    relora: ReloraConfig = dataclasses.field(default_factory=ReloraConfig)
    apollo: ApolloConfig = dataclasses.field(default_factory=ApolloConfig)
    apollo_mini: ApolloMiniConfig = dataclasses.field(default_factory=ApolloMiniConfig)
    fira: FiraConfig = dataclasses.field(default_factory=FiraConfig)
    swan: SwanConfig = dataclasses.field(default_factory=SwanConfig)
    ldadam: LdadamConfig = dataclasses.field(default_factory=LdadamConfig)
    q_galore: QGaloreConfig = dataclasses.field(default_factory=QGaloreConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    steps: Annotated[Int, Positive] = 300
    batch_size: Annotated[Int, Positive] = 16
    grad_accum: Annotated[Int, Positive] = 1
    seq_len: Annotated[Int, Positive] = 256
    seed: Int = 0
    eval_every: Annotated[Int, NonNegative] = 100  # 0: evaluate only at the end
    eval_tokens: Annotated[Int, Positive] = 65536
    eval_batch_size: Annotated[Int, Positive] = 16
    log_every: Annotated[Int, Positive] = 10
    checkpoint_every: Annotated[Int, NonNegative] = 0  # 0: no periodic checkpoints (a final one is still written)
    keep_checkpoints: Annotated[Int, Positive] = 2
    mesh: Annotated[tuple[Int, ...], BeforeValidator(_tuple)] = (1, 1, 1)  # (data, fsdp, tensor); one -1: the rest
    layerwise_update: bool = False  # update each block inside the backward pass (no full gradient)
    out_dir: Annotated[str, Field(min_length=1)] = "runs/default"
    resume: bool = False
    # "": weights from cfg.seed; else a model directory (`lowrank-jax import-hf`) or a Hugging Face checkpoint
    # directory whose weights start the run (its architecture replaces model.*'s, see lowrank_jax.hf.finetune)
    init_from: str = ""
    progress: bool = True

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "Config":
        """The rules that involve several fields or a registry (no data is read, nothing is written)."""
        m, d, o, r = self.model, self.data, self.optim, self.relora
        _model_shape_rules(m)
        kinds = dense_kinds()
        _check(m.dense in kinds, "model.dense", f"unknown dense kind {m.dense!r} (known: {', '.join(kinds)})")
        _check(
            m.dense != "int8",
            "model.dense",
            "int8 weights need a step that requantizes them after each update (lowrank_jax.layers.int8.requantize, "
            "as experiments/memory_7b.py's Q-GaLore step does); the training loop does not",
        )

        if d.source == "files":
            _check(bool(d.paths), "data.paths", "source=files needs at least one glob")
        if d.source == "tfds":
            _check(bool(d.tfds_data_dir), "data.tfds_data_dir", "source=tfds needs the prepared data directory")
        if not d.tokenizer:
            _check(
                d.vocab_size >= 257,
                "data.vocab_size",
                f"must be >= 257 (256 bytes + end-of-document) to train a tokenizer, got {d.vocab_size}",
            )

        names = optimizer_names()
        _check(o.name in names, "optim.name", f"unknown optimizer {o.name!r} (known: {', '.join(names)})")

        if r.warm_start:
            _check(
                m.dense == "lora", "relora.warm_start", f"a warm start switches to model.dense=lora, got {m.dense!r}"
            )
            _check(r.warm_start < self.steps, "relora.warm_start", f"must be < steps={self.steps}, got {r.warm_start}")
        if r.every:
            _check(m.dense == "lora", "relora.every", f"restarts need model.dense=lora, got {m.dense!r}")
        if r.jagged_schedule:
            cycle = r.every or self.steps - r.warm_start
            _check(
                0 < r.restart_warmup < cycle,
                "relora.restart_warmup",
                f"must be in [1, {cycle}) (the restart cycle), got {r.restart_warmup}",
            )
            first_warmup = int(o.warmup_ratio * self.steps)
            _check(
                first_warmup <= r.first_restart,
                "optim.warmup_ratio",
                f"the first warmup ({first_warmup} steps) must end before the first restart (step {r.first_restart})",
            )
        if self.layerwise_update:
            _check(m.scan_layers, "layerwise_update", "needs model.scan_layers=true (blocks stacked on a layers axis)")
            _check(
                not (r.every or r.warm_start),
                "layerwise_update",
                "does not combine with ReLoRA restarts or a warm start (relora.every / relora.warm_start)",
            )
        if m.dense in ("lora", "lowrank"):
            _check(
                not o.name.startswith(("galore", "golore", "apollo", "fira")),
                "optim.name",
                f"{o.name} projects the kernels; it does not combine with model.dense={m.dense}",
            )
        g = self.galore
        _check(
            g.projector == "random" or g.random_from == 0,
            "galore.random_from",
            f"only applies with galore.projector=random (GoLore), got {g.random_from}",
        )
        for name in ("apollo", "apollo_mini", "fira"):
            limit = getattr(self, name).norm_growth_limit
            _check(limit == 0 or limit >= 1, f"{name}.norm_growth_limit", f"must be 0 (off) or >= 1, got {limit}")

        b = self.batch_size
        _check(b % self.grad_accum == 0, "grad_accum", f"{self.grad_accum} does not divide batch_size={b}")
        _check(self.seq_len <= m.max_seq_len, "seq_len", f"{self.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        _check(len(self.mesh) == 3, "mesh", f"needs three sizes (data, fsdp, tensor), got {self.mesh}")
        _check(
            all(n > 0 or n == -1 for n in self.mesh) and self.mesh.count(-1) <= 1,
            "mesh",
            f"sizes must be positive, with at most one -1, got {self.mesh}",
        )
        return self


def check_paths(cfg: Config) -> None:
    """The filesystem checks of a valid config: corpus globs match files, named files and directories exist.

    A remote path (``gs://...``) is checked by :func:`lowrank_jax.storage.check_remote` (scheme,
    credentials, endpoint, bucket) and then like a local one; nothing is written.
    """
    from lowrank_jax import storage  # lazy: remote paths only (fsspec/gcsfs)

    d = cfg.data
    remote = storage.is_remote
    fields = {"out_dir": cfg.out_dir, "data.shards": d.shards, "data.tokenizer": d.tokenizer}
    fields.update({"init_from": cfg.init_from, "data.tfds_data_dir": d.tfds_data_dir if d.source == "tfds" else ""})
    fields.update({f"data.paths[{i}]": p for i, p in enumerate(d.paths if d.source == "files" else ())})
    for field, value in fields.items():
        if value and remote(value):
            try:
                storage.check_remote(field.split("[")[0], value)
            except storage.StorageError as e:
                raise ConfigError(str(e)) from None

    def exists(p: str) -> bool:
        return storage.as_path(p).exists()

    if d.source == "files":
        for pattern in d.paths:
            if remote(pattern):
                from lowrank_jax.data.corpus import remote_glob  # lazy: remote paths only (fsspec/gcsfs)

                hits = remote_glob(pattern)
            else:
                hits = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
            _check(bool(hits), "data.paths", f"glob {pattern!r} matches no files")
    if d.source == "tfds":
        if remote(d.tfds_data_dir):
            _check(exists(d.tfds_data_dir), "data.tfds_data_dir", f"no such directory {d.tfds_data_dir!r}")
        else:
            _check(
                os.path.isdir(os.path.expanduser(d.tfds_data_dir)),
                "data.tfds_data_dir",
                f"no such directory {d.tfds_data_dir!r}",
            )
    if d.tokenizer:
        ok = exists(d.tokenizer) if remote(d.tokenizer) else os.path.isfile(os.path.expanduser(d.tokenizer))
        _check(ok, "data.tokenizer", f"no such file {d.tokenizer!r}")
    if not remote(cfg.out_dir):
        out = Path(cfg.out_dir).expanduser()
        _check(not out.exists() or out.is_dir(), "out_dir", f"{cfg.out_dir!r} exists and is not a directory")
    if cfg.init_from:
        ok = exists(cfg.init_from) if remote(cfg.init_from) else os.path.isdir(os.path.expanduser(cfg.init_from))
        _check(ok, "init_from", f"no such directory {cfg.init_from!r}")
