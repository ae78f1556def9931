"""The one typed, strict run configuration.

Declared once as dataclasses (schema.py); loaded from YAML, then dotted command-line
overrides (`--set plan.k=1.1`) are applied (load.py). An unknown key, a wrong type or an
out-of-range value is a `ConfigError` naming the key and what would be valid (checks.py).
The resolved config is written next to every run (`Config.to_dict`, `save_config`).
"""

from hpc_dualbatch.config.checks import unused_keys
from hpc_dualbatch.config.load import config_from_dict, load_config, save_config
from hpc_dualbatch.config.schema import (
    CHOICES,
    MAX_PX,
    Config,
    OptimConfig,
    ScheduleConfig,
    adaptive_on,
    planned_resolutions,
    small_groups,
)

__all__ = [
    "CHOICES",
    "MAX_PX",
    "Config",
    "OptimConfig",
    "ScheduleConfig",
    "adaptive_on",
    "config_from_dict",
    "load_config",
    "planned_resolutions",
    "save_config",
    "small_groups",
    "unused_keys",
]
