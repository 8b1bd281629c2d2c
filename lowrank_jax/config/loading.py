"""YAML configs: named presets or files, ``base:`` chains and ``key=value`` overrides.

A run is described by one YAML file (a named preset shipped in ``lowrank_jax/config/presets`` or a
path) plus ``key=value`` overrides. Top-level keys are the training-loop fields of
:class:`~lowrank_jax.config.schema.Config`; ``model.*``, ``data.*``, ``optim.*``, ``galore.*`` and
``relora.*`` address the sections (in YAML, as nested mappings). A YAML file may name another
config in ``base:`` and override part of it. A CLI value is read as the YAML scalar it spells,
except that a string field keeps the text as written and a list field splits it on commas
(``mesh=1,-1,1``, ``data.paths=a/*.txt,b/*.txt``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lowrank_jax.config.errors import ConfigError
from lowrank_jax.config.schema import SECTIONS, Config, check_paths, check_unread_settings

CONFIG_DIR = Path(__file__).parent / "presets"


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


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    """``{"model": {"hidden": 64}}`` -> ``{"model.hidden": 64}`` (sections only; other values as they are)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in SECTIONS:
            out.update({f"{k}.{field}": value for field, value in v.items()})
        else:
            out[k] = v
    return out


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_cli(key: str, text: str, typ: Any) -> Any:
    """A CLI value as the YAML scalar it spells; kept as written for a string field, split on commas for a list."""
    if typ is str or typing.get_origin(typ) is Literal:
        return text
    if typing.get_origin(typ) is tuple:
        elem = typing.get_args(typ)[0]
        return tuple(_from_cli(key, s, elem) for s in text.split(",") if s)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{key}: cannot parse {text!r}") from None


def _build(flat: dict[str, Any], cli_keys: set[str]) -> Config:
    """A :class:`Config` from ``section.field`` / top-level keys; unknown keys are the schema's to report."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in flat.items():
        head, dot, tail = key.partition(".")
        if dot and head in SECTIONS:
            cls, values, name = SECTIONS[head], sections[head], tail
        elif key in SECTIONS:
            raise ConfigError(f"{key}: is a section; set {key}.<field>=value")
        else:
            cls, values, name = Config, top, key
        typ = _field_types(cls).get(name)
        if key in cli_keys and isinstance(value, str) and typ is not None:
            value = _from_cli(key, value, typ)
        values[name] = value
    return Config(**top, **{name: SECTIONS[name](**values) for name, values in sections.items()})


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"{item}: overrides are written key=value")
        out[key.strip()] = value
    return out


def load_config(name_or_path: str, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build and validate a :class:`Config` from a named/file YAML and overrides.

    ``overrides`` is a list of ``key=value`` strings (as on the command line) or a dict of
    ``section.field`` keys to values.
    """
    flat = _read_yaml(name_or_path)
    cli: dict[str, Any] = {}
    if isinstance(overrides, dict):
        flat.update(overrides)
    elif overrides:
        cli = parse_overrides(list(overrides))
        flat.update(cli)
    cfg = _build(flat, set(cli))
    check_unread_settings(cfg)
    check_paths(cfg)
    return cfg


def _split_changes(changes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(top-level changes, {section: changes})`` from ``field`` / ``section__field`` keys."""
    sections: dict[str, dict[str, Any]] = {}
    top = {}
    for k, v in changes.items():
        head, _, tail = k.partition("__")
        if tail:
            if head not in SECTIONS:
                raise ConfigError(f"{head}: is not a section (sections: {', '.join(SECTIONS)})")
            sections.setdefault(head, {})[tail] = v
        else:
            top[k] = v
    return top, sections


def replace(cfg: Config, **changes: Any) -> Config:
    """``dataclasses.replace`` that accepts ``section__field`` keys and re-validates, paths included."""
    top, sections = _split_changes(changes)
    for name, values in sections.items():
        top[name] = dataclasses.replace(getattr(cfg, name), **values)
    out = dataclasses.replace(cfg, **top)
    check_paths(out)
    return out


def _unchecked(obj: Any, values: dict[str, Any]) -> Any:
    out = copy.copy(obj)  # no __init__, so no validation
    for k, v in values.items():
        if k not in obj.__dataclass_fields__:
            raise ConfigError(f"{k}: unknown key")
        object.__setattr__(out, k, v)
    return out


def derive(cfg: Config, **changes: Any) -> Config:
    """A variant of a run's config that the library builds for itself, not validated as a user config.

    For internal phases whose config is deliberately not a valid run on its own: ReLoRA's full-rank
    warm-start phase (``model.dense=dense`` with ``relora.warm_start`` kept, so the schedule stays the
    run's) and the per-layer update's one-block optimizer (``model.scan_layers=false`` under
    ``layerwise_update``). Same ``section__field`` keys as :func:`replace`.
    """
    top, sections = _split_changes(changes)
    for name, values in sections.items():
        top[name] = _unchecked(getattr(cfg, name), values)
    return _unchecked(cfg, top)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict for results.json and config.json (tuples serialise as lists)."""
    return dataclasses.asdict(cfg)
