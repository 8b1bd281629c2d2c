"""The config sections of GaLore, GoLore, APOLLO, APOLLO-Mini and Fira: keywords of their complete optimizers,
choices from their owners, the cross-field rules, and settings the chosen optimizer or layer kind does not read."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from lowrank_jax.config import ConfigError, load_config
from lowrank_jax.config.schema import ApolloConfig, ApolloMiniConfig, FiraConfig, GaloreConfig, GoloreConfig
from lowrank_jax.optim import apollo, apollo_mini, fira, galore, golore
from lowrank_jax.optim.apollo import APOLLO_PROJ_TYPES, SCALE_TYPES
from lowrank_jax.optim.galore import PROJECTORS
from lowrank_jax.optim.registry import optimizer_names


def _keywords(fn) -> set[str]:
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is not p.VAR_KEYWORD}


@pytest.mark.parametrize(
    "cls, fn",
    [(GaloreConfig, galore), (GoloreConfig, golore), (ApolloConfig, apollo), (ApolloMiniConfig, apollo_mini),
     (FiraConfig, fira)],
)  # fmt: skip
def test_fields_are_keywords_of_the_complete_optimizer(cls, fn) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    assert names <= _keywords(fn), names - _keywords(fn)
    fn(0.01, **dataclasses.asdict(cls()))  # the builders' call


def test_defaults_follow_the_official_recipes() -> None:
    a, m, g = ApolloConfig(), ApolloMiniConfig(), GaloreConfig()
    assert (a.scale, a.scale_type, a.scale_front, a.update_proj_gap) == (1.0, "channel", False, 200)
    assert (m.rank, m.scale, m.scale_front, m.update_proj_gap) == (1, 128.0, True, 200)
    assert a.norm_growth_limit == m.norm_growth_limit == FiraConfig().norm_growth_limit == 1.01
    assert (g.projector, g.random_from) == ("svd", 0)


@pytest.mark.parametrize(
    "cls, name, owner",
    [(ApolloConfig, "scale_type", SCALE_TYPES), (ApolloConfig, "proj_type", APOLLO_PROJ_TYPES),
     (GaloreConfig, "projector", PROJECTORS)],
)  # fmt: skip
def test_choices_are_the_owners_tuples(cls, name, owner) -> None:
    hints = typing.get_type_hints(cls, include_extras=True)
    assert typing.get_args(hints[name]) == tuple(owner)
    with pytest.raises(ConfigError, match=f"must be one of {tuple(owner)!r}".replace("(", r"\(").replace(")", r"\)")):
        cls(**{name: "not_a_choice"})


def test_registered_names() -> None:
    names = {"apollo_adamw", "apollo_mini_adamw", "fira_adamw", "galore_adamw", "galore_adamw8bit", "golore_adamw"}
    assert names <= set(optimizer_names())


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["galore.random_from=100"], "galore.random_from", "only applies with galore.projector=random"),
        (["apollo.norm_growth_limit=0.5"], "apollo.norm_growth_limit", "must be 0 (off) or >= 1"),
        (["fira.norm_growth_limit=0.9"], "fira.norm_growth_limit", "must be 0 (off) or >= 1"),
        (["apollo_mini.rank=0"], "apollo_mini.rank", "must be positive"),
        (["apollo_mini.scale_type=channel"], "apollo_mini.scale_type", "unknown key"),
        (["optim.name=apollo_adamw", "model.dense=lora"], "optim.name", "does not combine with model.dense=lora"),
        (["optim.name=fira_adamw", "model.dense=lowrank"], "optim.name", "does not combine with model.dense=lowrank"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, key, fragment) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert str(e.value).startswith(f"{key}: ") and fragment in str(e.value), str(e.value)


def test_method_overrides_load_with_their_optimizer() -> None:
    load = lambda name, *kv: load_config("tiny", [f"optim.name={name}", *kv])
    cfg = load("galore_adamw", "galore.projector=random", "galore.random_from=160", "galore.moments=reproject_first")
    assert (cfg.galore.projector, cfg.galore.random_from, cfg.galore.moments) == ("random", 160, "reproject_first")
    cfg = load("golore_adamw", "golore.random_from=160", "golore.rank=16")
    assert (cfg.golore.random_from, cfg.golore.rank, cfg.golore.moments, cfg.golore.scale) == (
        160, 16, "reproject_first", 1.0
    )  # fmt: skip
    cfg = load("apollo_adamw", "apollo.rank=64", "apollo.scale_type=tensor", "apollo.eight_bit=true")
    assert (cfg.apollo.rank, cfg.apollo.scale_type, cfg.apollo.eight_bit) == (64, "tensor", True)
    assert load("apollo_mini_adamw", "apollo_mini.scale=64").apollo_mini.scale == 64.0
    cfg = load("fira_adamw", "fira.norm_growth_limit=0", "fira.rank=8")
    assert (cfg.fira.norm_growth_limit, cfg.fira.rank) == (0.0, 8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.name=apollo_adamw", "galore.rank=16"],
         "galore.rank: not read by optim.name=apollo_adamw (its settings are in apollo.*)"),
        (["optim.name=fira_adamw", "galore.rank=16"],
         "galore.rank: not read by optim.name=fira_adamw (its settings are in fira.*)"),
        (["galore.projector=random", "galore.random_from=10"],
         "galore.projector: not read by optim.name=adamw (it has no method section)"),
        (["optim.name=galore_adamw", "golore.random_from=10"],
         "golore.random_from: not read by optim.name=galore_adamw (its settings are in galore.*)"),
        (["optim.name=adamw8bit", "apollo_mini.rank=2"],
         "apollo_mini.rank: not read by optim.name=adamw8bit (it has no method section)"),
        (["model.lora_rank=8"], "model.lora_rank: not read by model.dense=dense (only by lora, lowrank)"),
        (["model.dense=lowrank", "model.lora_alpha=8"],
         "model.lora_alpha: not read by model.dense=lowrank (only by lora)"),
        (["model.sl_density=0.05"], "model.sl_density: not read by model.dense=dense (only by sl)"),
    ],
)  # fmt: skip
def test_a_setting_nothing_reads_is_a_one_line_error(overrides, message) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert str(e.value) == message
