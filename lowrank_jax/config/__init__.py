"""Run configuration: a typed schema validated before anything compiles, YAML presets and overrides.

- :mod:`~lowrank_jax.config.schema`: the sections and :class:`Config` as frozen pydantic
  dataclasses (types, choices, bounds, cross-field rules) and :func:`check_paths`;
- :mod:`~lowrank_jax.config.loading`: named presets (``presets/*.yaml``) or YAML files, ``base:``
  chains, ``key=value`` overrides, :func:`load_config`, :func:`replace` and :func:`derive` (internal phases);
- :mod:`~lowrank_jax.config.errors`: every problem is a :class:`ConfigError` naming the field,
  which the CLI prints on one line and exits with status 2 before writing anything.

The package imports from the library only the choice lists and registries of the modules that
own them (dense kinds, dtypes, data sources, optimizer names, GaLore and ReLoRA modes).
"""

from lowrank_jax.config.errors import ConfigError
from lowrank_jax.config.loading import (
    CONFIG_DIR,
    derive,
    load_config,
    named_configs,
    parse_overrides,
    replace,
    to_dict,
)
from lowrank_jax.config.schema import (
    SECTIONS,
    Config,
    DataConfig,
    GaloreConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ReloraConfig,
    check_paths,
)

__all__ = [
    "CONFIG_DIR",
    "SECTIONS",
    "Config",
    "ConfigError",
    "DataConfig",
    "GaloreConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ReloraConfig",
    "check_paths",
    "derive",
    "load_config",
    "named_configs",
    "parse_overrides",
    "replace",
    "to_dict",
]
