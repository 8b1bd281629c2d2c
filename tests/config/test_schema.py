"""The typed config schema: bounds, choices from their owners, cross-field rules, one-line errors."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from lowrank_jax.config import (
    Config,
    ConfigError,
    DataConfig,
    GaloreConfig,
    ModelConfig,
    OptimConfig,
    ReloraConfig,
    check_paths,
    load_config,
    replace,
    to_dict,
)
from lowrank_jax.data.corpus import SOURCES
from lowrank_jax.layers import dense as dense_lib
from lowrank_jax.layers.dense import DTYPES
from lowrank_jax.optim.galore import MOMENT_MODES, PROJ_TYPES, REFRESH_MODES, SVD_MODES, galore
from lowrank_jax.optim.relora import RESET_MODES
from pallas_kernels.sl_matmul.api import IMPLEMENTATIONS

LORA = ["model.dense=lora", "model.lora_rank=8"]

# id: (overrides on tiny, field named first, a fragment of the message)
CROSS_FIELD = {
    "heads_divide_hidden": (["model.heads=5"], "model.heads", "do not divide hidden=128"),
    "even_head_dim": (["model.hidden=96", "model.heads=32", "model.ffn=160"], "model.heads", "must be even"),
    "dense_kind_registered": (["model.dense=magic"], "model.dense", "unknown dense kind 'magic'"),
    "files_need_paths": (["data.source=files"], "data.paths", "needs at least one glob"),
    "tfds_needs_data_dir": (["data.source=tfds"], "data.tfds_data_dir", "prepared data directory"),
    "trained_tokenizer_vocab": (["data.vocab_size=256"], "data.vocab_size", "must be >= 257"),
    "optimizer_registered": (["optim.name=sgdx"], "optim.name", "unknown optimizer 'sgdx'"),
    "warm_start_needs_lora": (["relora.warm_start=10"], "relora.warm_start", "switches to model.dense=lora"),
    "warm_start_before_end": ([*LORA, "relora.warm_start=200"], "relora.warm_start", "must be < steps=200"),
    "restarts_need_lora": (["relora.every=50"], "relora.every", "restarts need model.dense=lora"),
    "restart_warmup_in_cycle": (
        [*LORA, "relora.every=50", "relora.restart_warmup=50"],
        "relora.restart_warmup",
        "[1, 50)",
    ),
    "warmup_before_first_restart": (
        [*LORA, "relora.every=10", "relora.restart_warmup=2", "optim.warmup_ratio=0.2"],
        "optim.warmup_ratio",
        "first warmup (40 steps) must end before the first restart (step 10)",
    ),
    "layerwise_needs_scan": (["layerwise_update=true", "model.scan_layers=false"], "layerwise_update", "scan_layers"),
    "layerwise_without_restarts": (
        [*LORA, "layerwise_update=true", "relora.every=50", "relora.restart_warmup=5"],
        "layerwise_update",
        "does not combine with ReLoRA",
    ),
    "galore_not_with_lora": ([*LORA, "optim.name=galore_adamw"], "optim.name", "model.dense=lora"),
    "galore_not_with_lowrank": (["model.dense=lowrank", "optim.name=galore_adamw8bit"], "optim.name", "lowrank"),
    "grad_accum_divides_batch": (["grad_accum=5"], "grad_accum", "5 does not divide batch_size=16"),
    "seq_len_fits_model": (["seq_len=257"], "seq_len", "exceeds model.max_seq_len=256"),
    "mesh_three_sizes": (["mesh=2,2"], "mesh", "needs three sizes"),
    "mesh_one_minus_one": (["mesh=-1,1,-1"], "mesh", "at most one -1"),
    "mesh_positive": (["mesh=2,0,1"], "mesh", "sizes must be positive"),
}


@pytest.mark.parametrize("case", sorted(CROSS_FIELD))
def test_cross_field_rule_names_its_field(case, tmp_path):
    overrides, field, fragment = CROSS_FIELD[case]
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [*overrides, f"out_dir={tmp_path}"])
    msg = str(e.value)
    assert msg.startswith(f"{field}: ") and fragment in msg and "\n" not in msg, msg


def test_cross_field_rules_are_config_level_only(monkeypatch):
    """A section holds any kind; the whole Config checks it against the registry at validation time."""
    model = dataclasses.replace(ModelConfig(), dense="my_kind_for_schema_test", heads=5)  # neither is checked here
    assert (model.dense, model.heads) == ("my_kind_for_schema_test", 5)
    with pytest.raises(ConfigError, match=r"^model\.heads: 5 heads do not divide hidden=256"):
        Config(model=model)
    model = dataclasses.replace(model, heads=8)
    with pytest.raises(ConfigError, match=r"^model\.dense: unknown dense kind 'my_kind_for_schema_test'"):
        Config(model=model)
    monkeypatch.setitem(dense_lib._KINDS, "my_kind_for_schema_test", dense_lib._KINDS["dense"])
    assert Config(model=model).model.dense == "my_kind_for_schema_test"


BOUNDS = {
    # key=value: message after the field
    "steps=0": "must be positive, got 0",
    "optim.lr=-0.003": "must be positive, got -0.003",
    "optim.warmup_ratio=1.0": "must be in [0, 1), got 1.0",
    "optim.b1=-0.5": "must be in [0, 1), got -0.5",
    "optim.min_lr_ratio=1.25": "must be in [0, 1], got 1.25",
    "model.sl_density=1.5": "must be in (0, 1], got 1.5",
    "data.val_fraction=0": "must be in (0, 1), got 0",
    "model.vocab_size=-7": "must be >= 0 (0: from tokenizer), got -7",
    "optim.grad_clip=-2": "must be >= 0 (0 disables), got -2",
    "eval_every=-1": "must be >= 0, got -1",
    "relora.reset_ratio=1": "must be in [0, 1), got 1",
    "galore.rank=0": "must be positive, got 0",
}


@pytest.mark.parametrize("override", sorted(BOUNDS))
def test_bounds(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert str(e.value) == f"{key}: {BOUNDS[override]}"


def test_bounds_are_inclusive_where_written():
    overrides = ["optim.min_lr_ratio=1", "model.dense=sl", "model.sl_density=1", "optim.warmup_ratio=0", "eval_every=0"]
    cfg = load_config("tiny", overrides)
    assert (cfg.optim.min_lr_ratio, cfg.model.sl_density, cfg.optim.warmup_ratio, cfg.eval_every) == (1.0, 1.0, 0.0, 0)


def _choices(cls: type, name: str) -> tuple[str, ...]:
    typ = typing.get_type_hints(cls)[name]
    assert typing.get_origin(typ) is typing.Literal, typ
    return typing.get_args(typ)


@pytest.mark.parametrize(
    "cls, name, owner",
    [
        (ModelConfig, "dtype", DTYPES),
        (ModelConfig, "param_dtype", DTYPES),
        (DataConfig, "source", SOURCES),
        (GaloreConfig, "proj_type", PROJ_TYPES),
        (GaloreConfig, "refresh", REFRESH_MODES),
        (GaloreConfig, "svd", SVD_MODES),
        (GaloreConfig, "moments", MOMENT_MODES),
        (ReloraConfig, "reset", RESET_MODES),
    ],
)
def test_choices_are_the_owners_tuples(cls, name, owner):
    assert _choices(cls, name) == tuple(owner)
    for value in owner:
        assert getattr(cls(**{name: value}), name) == value
    with pytest.raises(ConfigError) as e:
        cls(**{name: "not_a_choice"})
    section = {ModelConfig: "model", DataConfig: "data", GaloreConfig: "galore", ReloraConfig: "relora"}[cls]
    assert str(e.value) == f"{section}.{name}: must be one of {tuple(owner)}, got 'not_a_choice'"


def test_sl_implementation_choices_are_the_kernels_and_auto():
    choices = _choices(ModelConfig, "sl_implementation")
    assert set(choices) == {*IMPLEMENTATIONS, "auto"} and len(choices) == len(set(choices))
    assert ModelConfig(sl_implementation="pallas").sl_implementation == "pallas"
    with pytest.raises(ConfigError, match=r"^model\.sl_implementation: must be one of .*, got 'triton'$"):
        ModelConfig(sl_implementation="triton")


def test_galore_fields_are_galore_keywords():
    params = inspect.signature(galore).parameters
    names = [f.name for f in dataclasses.fields(GaloreConfig)]
    assert set(names) <= set(params), set(names) - set(params)
    assert all(params[n].kind in (params[n].KEYWORD_ONLY, params[n].POSITIONAL_OR_KEYWORD) for n in names)
    cfg = GaloreConfig(rank=3, update_proj_gap=7, refresh="staggered", moments="reproject")
    galore(0.01, **dataclasses.asdict(cfg))  # the builders' call: every field is accepted as a keyword


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: DataConfig(source="nope"), "data.source: must be one of"),
        (lambda: ModelConfig(hidden="64"), "model.hidden: expected an integer, got '64'"),
        (lambda: ModelConfig(hiden=64), "model.hiden: unknown key (known model.* keys: dense, dtype,"),
        (lambda: OptimConfig(lr=True), "optim.lr: expected a number, got True"),
        (lambda: Config(steps=2.5), "steps: expected an integer, got 2.5"),
        (lambda: Config(resume="maybe"), "resume: expected true or false, got 'maybe'"),
        (lambda: Config(resume=1), "resume: expected true or false, got 1"),
        (lambda: Config(out_dir=3), "out_dir: expected a string, got 3"),
        (lambda: Config(mesh=(1, "x", 1)), "mesh: expected an integer, got 'x'"),
        (lambda: Config(learning_rate=0.1), "learning_rate: unknown key (known: batch_size,"),
        (lambda: dataclasses.replace(Config(), steps=-1), "steps: must be positive, got -1"),
        (lambda: dataclasses.replace(Config(), grad_accum=3), "grad_accum: 3 does not divide batch_size=16"),
    ],
)
def test_pydantic_errors_become_one_line_config_errors(build, message):
    with pytest.raises(ConfigError) as e:
        build()
    assert type(e.value) is ConfigError and isinstance(e.value, ValueError)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_types_are_strict_but_read_numbers_sensibly(tmp_path):
    cfg = load_config("tiny", ["optim.lr=3", "batch_size=8.0", "optim.eps=1e-6", "model.rope_theta=5E5"])
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 3.0
    assert type(cfg.batch_size) is int and cfg.batch_size == 8
    assert (cfg.optim.eps, cfg.model.rope_theta) == (1e-6, 5e5)
    assert OptimConfig(eps="1e-6").eps == 1e-6  # YAML 1.1 reads 1e-6 (no dot) as a string
    f = tmp_path / "c.yaml"
    f.write_text("base: tiny\ndata:\n  tokenizer: 3\n")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: expected a string, got 3$"):
        load_config(str(f))
    f.write_text("base: tiny\nresume: 1\n")
    with pytest.raises(ConfigError, match=r"^resume: expected true or false, got 1$"):
        load_config(str(f))
    for bad, field in (["batch_size=2.5"], "batch_size"), (["resume=maybe"], "resume"), (["steps=1e3"], "steps"):
        with pytest.raises(ConfigError, match=rf"^{field}: expected"):
            load_config("tiny", bad)


def test_cli_strings_keep_str_fields_and_split_lists():
    cfg = load_config("tiny", ["data.tfds_split=123", "mesh=1,-1,1", "data.cache_dir=yes", "relora.reset=none"])
    assert (cfg.data.tfds_split, cfg.data.cache_dir, cfg.relora.reset) == ("123", "yes", "none")
    assert cfg.mesh == (1, -1, 1)
    cfg = load_config("tiny", {"mesh": [2, 1, 1], "data.paths": ["a/*.txt"], "seed": 5})  # dict: values as in JSON
    assert (cfg.mesh, cfg.data.paths, cfg.seed) == ((2, 1, 1), ("a/*.txt",), 5)


def test_dataclass_api_still_works():
    cfg = load_config("tiny")
    assert [f.name for f in dataclasses.fields(cfg)][:5] == ["model", "data", "optim", "galore", "golore"]
    assert dataclasses.asdict(cfg) == to_dict(cfg) and to_dict(cfg)["model"]["hidden"] == 128
    small = dataclasses.replace(cfg.model, hidden=64, ffn=160)
    assert (small.hidden, small.ffn, cfg.model.hidden) == (64, 160, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3  # type: ignore[misc]
    assert hash(cfg) == hash(load_config("tiny")) and cfg == load_config("tiny")
    assert cfg.tokens_per_step == cfg.batch_size * cfg.seq_len


def test_replace_sections_and_revalidates(tmp_path):
    cfg = load_config("tiny")
    out = replace(cfg, **{"model__vocab_size": 4, "steps": 9, "optim__lr": 0.02})
    assert (out.model.vocab_size, out.steps, out.optim.lr, out.model.hidden) == (4, 9, 0.02, 128)
    with pytest.raises(ConfigError, match=r"^model\.heads: 3 heads do not divide"):
        replace(cfg, model__heads=3)
    with pytest.raises(ConfigError, match=r"^galore\.svd: must be one of"):
        replace(cfg, galore__svd="lanczos")
    with pytest.raises(ConfigError, match=r"^model\.hiden: unknown key"):
        replace(cfg, model__hiden=3)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"^out_dir: .* exists and is not a directory"):
        replace(cfg, out_dir=str(f))


def test_path_checks_come_after_the_schema(tmp_path):
    """A Config never reads the filesystem; check_paths does (load_config and replace call it)."""
    glob = str(tmp_path / "none" / "*.txt")
    cfg = Config(data=DataConfig(source="files", paths=(glob,)))
    with pytest.raises(ConfigError, match=r"^data\.paths: glob .* matches no files"):
        check_paths(cfg)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.txt").write_text("some text")
    check_paths(cfg)
    cfg = Config(data=DataConfig(tokenizer=str(tmp_path / "t5.model")))
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: no such file"):
        check_paths(cfg)
    cfg = Config(data=DataConfig(source="tfds", tfds_data_dir=str(tmp_path / "tfds")))
    with pytest.raises(ConfigError, match=r"^data\.tfds_data_dir: no such directory"):
        check_paths(cfg)


def test_section_and_unknown_key_messages():
    with pytest.raises(ConfigError, match=r"^model: is a section; set model\.<field>=value$"):
        load_config("tiny", ["model=3"])
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["relora.evry=3"])
    assert str(e.value).startswith("relora.evry: unknown key (known relora.* keys: every, jagged, reset,")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["step=3"])
    assert "steps" in str(e.value) and str(e.value).endswith(
        "model.*, data.*, optim.*, galore.*, golore.*, relora.*, apollo.*, apollo_mini.*, fira.*, swan.*, ldadam.*, "
        "q_galore.*, logging.*)"
    )
