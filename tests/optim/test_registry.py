"""The optimizer builders pass every field of a method's config section to its transform.

Each transform is replaced by a recorder, the section's fields are all set to values that differ from the
transform's defaults, and every field must arrive as the keyword of the same name (a field added to the schema
but not wired in the builder fails here).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

import optax
import pytest

from lowrank_jax.config import load_config
from lowrank_jax.config.schema import ApolloConfig, ApolloMiniConfig, FiraConfig, GaloreConfig, GoloreConfig
from lowrank_jax.optim import registry

ADAM_FIELDS = ("b1", "b2", "eps", "weight_decay")


def _changed(value: Any) -> Any:
    """A value of the same type that differs from ``value`` (the recorder validates nothing)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 7
    if isinstance(value, float):
        return value + 0.375
    if isinstance(value, str):
        return value + "_changed"
    raise TypeError(f"no changed value for {value!r}")


def _section(cls: type) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{f.name: _changed(getattr(cls(), f.name)) for f in dataclasses.fields(cls)})


def _record(monkeypatch: pytest.MonkeyPatch, name: str) -> list[dict[str, Any]]:
    """Replace ``registry.<name>`` by a recorder of its bound arguments (keyword dicts flattened)."""
    real = getattr(registry, name)
    signature = inspect.signature(real)
    calls: list[dict[str, Any]] = []

    def recorder(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
        bound = signature.bind(*args, **kwargs).arguments
        var_kw = {n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD}
        extra = {k: v for n in var_kw for k, v in bound.get(n, {}).items()}
        calls.append({**{k: v for k, v in bound.items() if k not in var_kw}, **extra})
        return optax.identity()

    monkeypatch.setattr(registry, name, recorder)
    return calls


@pytest.fixture(scope="module")
def cfg() -> types.SimpleNamespace:
    """A config whose method sections and Adam settings all differ from the defaults."""
    real = load_config("tiny")
    fields = {f.name: getattr(real, f.name) for f in dataclasses.fields(real)}
    adam = {k: 0.5 + i / 8 for i, k in enumerate(ADAM_FIELDS)}  # 0.5, 0.625, 0.75: none is a default
    optim = types.SimpleNamespace(**{**dataclasses.asdict(real.optim), **adam})
    sections = {
        "galore": GaloreConfig,
        "golore": GoloreConfig,
        "apollo": ApolloConfig,
        "apollo_mini": ApolloMiniConfig,
        "fira": FiraConfig,
    }
    return types.SimpleNamespace(**{**fields, "optim": optim, **{k: _section(c) for k, c in sections.items()}})


@pytest.mark.parametrize(
    ("optimizer", "transform", "section", "eight_bit"),
    [
        ("galore_adamw", "galore", "galore", False),
        ("galore_adamw8bit", "galore", "galore", True),
        ("golore_adamw", "golore", "golore", None),
        ("apollo_adamw", "apollo", "apollo", None),
        ("apollo_mini_adamw", "apollo_mini", "apollo_mini", None),
        ("fira_adamw", "fira", "fira", None),
    ],
)
def test_every_section_field_reaches_the_transform(monkeypatch, cfg, optimizer, transform, section, eight_bit) -> None:
    calls = _record(monkeypatch, transform)
    registry.build_optimizer(_with_name(cfg, optimizer), lambda step: 1.0, None)
    assert len(calls) == 1, calls
    (got,) = calls
    expected = dict(vars(getattr(cfg, section))) | {k: getattr(cfg.optim, k) for k in ADAM_FIELDS}
    if eight_bit is not None:
        expected["eight_bit"] = eight_bit
    missing = {k: (v, got.get(k, "<not passed>")) for k, v in expected.items() if got.get(k, object()) != v}
    assert not missing, f"{optimizer}: fields that do not reach {transform} (expected, got): {missing}"
    assert "mask" not in got  # the complete optimizer's default: attention and MLP matrices by name
    assert registry.optimizer_sections(optimizer) == (section,)


def _with_name(cfg: types.SimpleNamespace, name: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{**vars(cfg), "optim": types.SimpleNamespace(**{**vars(cfg.optim), "name": name})})
