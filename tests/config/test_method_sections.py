"""The config sections of APOLLO, APOLLO-Mini, Fira and GaLore's GoLore fields: keywords of their transforms,
choices from their owners, and the cross-field rules."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from lowrank_jax.config import ConfigError, load_config
from lowrank_jax.config.schema import ApolloConfig, ApolloMiniConfig, FiraConfig, GaloreConfig
from lowrank_jax.optim import apollo, apollo_mini, fira
from lowrank_jax.optim.apollo import APOLLO_PROJ_TYPES, SCALE_TYPES
from lowrank_jax.optim.galore import PROJECTORS
from lowrank_jax.optim.registry import optimizer_names


def _keywords(fn) -> set[str]:
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is not p.VAR_KEYWORD}


@pytest.mark.parametrize(
    "cls, fn, extra, base",
    [
        (ApolloConfig, apollo, set(), {}),
        (ApolloMiniConfig, apollo_mini, _keywords(apollo) - {"scale_type"}, {}),  # the rest reach apollo
        (FiraConfig, fira, set(), dataclasses.asdict(GaloreConfig())),  # fira_adamw: the galore section too
    ],
)
def test_fields_are_keywords_of_the_transform(cls, fn, extra, base) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    assert names <= _keywords(fn) | extra, names - (_keywords(fn) | extra)
    fn(**base, **dataclasses.asdict(cls()))  # the builders' call


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
    assert {"apollo_adamw", "apollo_mini_adamw", "fira_adamw", "galore_adamw"} <= set(optimizer_names())


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


def test_golore_and_method_overrides_load() -> None:
    cfg = load_config(
        "tiny",
        ["galore.projector=random", "galore.random_from=160", "galore.moments=reproject_first", "apollo.rank=64",
         "apollo.scale_type=tensor", "apollo_mini.scale=64", "fira.norm_growth_limit=0", "apollo.eight_bit=true"],
    )  # fmt: skip
    assert (cfg.galore.projector, cfg.galore.random_from, cfg.galore.moments) == ("random", 160, "reproject_first")
    assert (cfg.apollo.rank, cfg.apollo.scale_type, cfg.apollo.eight_bit) == (64, "tensor", True)
    assert (cfg.apollo_mini.scale, cfg.fira.norm_growth_limit) == (64.0, 0.0)
