"""Config files: a run's fully resolved config as YAML, written to its run folder and read back.

Every run writes ``runs/<run>/config.yaml`` (global rank 0, atomically) with every field of every
section. Passing it back reproduces the run; overrides still go on top::

    deepspeed launch/train.py --config runs/clip_tiny/config.yaml --train.run_name=clip_tiny_again

A hand-written file may hold only some sections and fields; the rest come from its
``experiment:`` (or ``--experiment``, or the default experiment). Values are checked against the
dataclasses' types exactly like ``--section.field=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from tritower.launch.config import ConfigError, TrainConfig, closest
from tritower.model.config import ModelConfig
from tritower.model.sections import TOWER_ROLES, tower_field

FILE_NAME = "config.yaml"


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML config file; ConfigError naming the file when it is not one."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of sections, found {type(values).__name__}")
    return values


def _coerce(value: Any, kind: Any, key: str, convert_text: typing.Callable[[str, Any, str], Any]) -> Any:
    """A YAML value as the field's declared type (text goes through the command-line parser)."""
    if isinstance(value, str):
        return convert_text(value, kind, key)
    origin = typing.get_origin(kind)
    if value is None and type(None) in typing.get_args(kind):
        return None
    if origin is typing.Union or (origin is not None and type(None) in typing.get_args(kind)):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        origin = typing.get_origin(kind)
    if origin in (tuple, list) and isinstance(value, list):
        (inner, *_) = typing.get_args(kind) or (str,)
        items = [_coerce(item, inner, key, convert_text) for item in value]
        return tuple(items) if origin is tuple else items
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    name = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{key}: {value!r} in the config file is not a {name}")


def apply_file(cfg: TrainConfig, values: dict[str, Any], path: str, convert_text: Any) -> None:
    """Set every ``section: {field: value}`` of a config file on ``cfg``; unknown names fail."""
    sections = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    for section_name, fields in values.items():
        if section_name == "experiment":
            continue
        if section_name not in sections:
            raise ConfigError(
                f"{path}: unknown config section '{section_name}'{closest(section_name, sorted(sections))}"
            )
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: section '{section_name}' must be a mapping of fields")
        section = getattr(cfg, section_name)
        hints = typing.get_type_hints(type(section))
        names = [f.name for f in dataclasses.fields(section)]
        for name, value in _tower_options(section, fields, path).items():
            key = f"{section_name}.{name}"
            if name not in names:
                raise ConfigError(f"{path}: unknown config key '{key}'{closest(name, names)}")
            setattr(section, name, _coerce(value, hints[name], key, convert_text))


def _tower_options(section: object, fields: dict[str, Any], path: str) -> dict[str, Any]:
    """The model section's per-tower mappings (``image: {tower: ...}``) as the flat fields that
    store them; other sections, and flat keys (saved configs), pass through."""
    if not isinstance(section, ModelConfig):
        return fields
    flat = {}
    for name, value in fields.items():
        if name not in TOWER_ROLES:
            flat[name] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: model.{name} must be a mapping of options (tower: ..., pretrained: ...)")
        for option, item in value.items():
            try:
                flat[tower_field(name, str(option))] = item
            except ValueError as error:
                raise ConfigError(f"{path}: {error}") from None
    return flat


def _plain(value: Any) -> Any:
    """asdict output with tuples as lists (YAML's safe dumper writes lists, not tuples)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def config_yaml(cfg: TrainConfig) -> str:
    """The fully resolved config as YAML text (floats as Python's repr: they read back exactly)."""
    header = (
        f"# tritower: the fully resolved config of a run of experiment {cfg.experiment}.\n"
        "# Re-run it: deepspeed launch/train.py --config THIS_FILE --train.run_name=NEW_NAME\n"
    )
    values = cfg.to_dict() | {"model": cfg.model.to_sections()}  # per-tower sections, as users write them
    return header + yaml.safe_dump(_plain(values), sort_keys=False, default_flow_style=False)


def write_config_file(cfg: TrainConfig, run_dir: Path) -> Path:
    """Write ``run_dir/config.yaml`` atomically (a reader never sees half a file); rank 0 only."""
    path = Path(run_dir) / FILE_NAME
    partial = path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
    partial.write_text(config_yaml(cfg))
    os.replace(partial, path)
    return path
