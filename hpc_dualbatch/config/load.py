"""A run config from YAML and dotted command-line overrides (`--set plan.k=1.1`), checked
by type as it is built and by value (`checks.validate`) before it is handed out; and the
resolved config written back as YAML (`save_config`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from hpc_dualbatch.atomic import check_regular, write_text
from hpc_dualbatch.config.checks import validate
from hpc_dualbatch.config.schema import Config
from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.yaml_safe import clip, show
from hpc_dualbatch.yaml_safe import load as _load_yaml


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of its fields, got {show(value)}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list of {item.__name__}, got {show(value)}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key '{key}' must be a mapping {kt.__name__} -> {vt.__name__}, got {show(value)}"
            )
        return {_convert(k, kt, f"{key} key"): _convert(v, vt, f"{key}[{k}]") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < 1e308:
            raise ConfigError(f"config key '{key}' must be a number, got {show(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {show(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {show(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {show(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names, key=str)  # key=str: YAML keys may mix ints and strings
    if unknown:
        raise ConfigError(
            f"unknown config key '{clip(prefix + str(unknown[0]))}'; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key.sub, value parsed as YAML: 1.1 -> float, [1,2] -> list)."""
    if "=" not in text:
        raise ConfigError(f"override '{clip(text)}' must look like key.sub=value")
    key, _, val = text.partition("=")
    try:
        return key.strip(), _load_yaml(val, f"override '{clip(text)}'") if val.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{clip(text)}': value is not valid YAML ({e})") from None


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (or the defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path:
        check_regular(
            path,
            "config file",
            ConfigError,
            "give a YAML config, e.g. hpc_dualbatch/configs/fashion_mnist.yaml",
        )
        try:
            with open(path, encoding="utf-8") as f:
                raw = _load_yaml(f, f"config file '{path}'") or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    for ov in overrides:
        _set_dotted(raw, *parse_override(ov))
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    for ov in overrides:
        _set_dotted(raw, *parse_override(ov))
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
