"""Config files: a run's fully resolved config as YAML, written to its run folder and read back.

Every run writes ``runs/<run>/config.yaml`` (global rank 0, atomically) with every field of every
section. Passing it back reproduces the run; overrides still go on top::

    deepspeed launch/train.py --config runs/clip_tiny/config.yaml --train.run_name=clip_tiny_again

A hand-written file may hold only some sections and fields; the rest come from its
``experiment:`` (or ``--experiment``, or the default experiment). Its values become
``--section.field=value`` arguments ahead of the command line's, so the parser checks them exactly
as it checks those (and a later override wins). Files written before the towers were nested
(``model.image_tower``) read through ``migrate_config``.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from tritower.data.atomic import write_text_atomic
from tritower.launch.config import ConfigError, TrainConfig
from tritower.model.config import migrate_model
from tritower.suggest import closest

FILE_NAME = "config.yaml"


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML config file, migrated; ConfigError naming the file when it is not one."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of sections, found {type(values).__name__}")
    try:
        return migrate_config(values)
    except ValueError as error:
        raise ConfigError(f"--config {path}: {error}") from None


def migrate_config(values: dict[str, Any]) -> dict[str, Any]:
    """A saved training config (``config.yaml``, a checkpoint's client state) in today's layout."""
    if isinstance(values.get("model"), dict):
        values = values | {"model": migrate_model(values["model"])}
    return values


def file_arguments(values: dict[str, Any], path: str, cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """A config file's mapping as ``--section.field=value`` arguments; ConfigError naming the file
    and the closest key for a key that is no field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    arguments = []
    for key, value in values.items():
        if key == "experiment" and not prefix:
            continue
        if key not in fields:
            raise ConfigError(f"--config {path}: unknown key '{prefix}{key}'{closest(str(key), list(fields))}")
        kind = _field_class(cls, key)
        if kind is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"--config {path}: '{prefix}{key}' must be a mapping of its fields")
            arguments += file_arguments(value, path, kind, f"{prefix}{key}.")
        else:
            arguments.append(f"--{prefix}{key}={_text(value)}")
    return arguments


def _field_class(cls: type, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``cls`` (a section), or None for a plain field."""
    kind = typing.get_type_hints(cls)[name]
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None


def _text(value: Any) -> str:
    """A YAML value as the command line writes it (floats in repr: they read back exactly)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_text(item) for item in value)
    return "None" if value is None else str(value)


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
    return header + yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False, default_flow_style=False)


def write_config_file(cfg: TrainConfig, run_dir: Path) -> Path:
    """Write ``run_dir/config.yaml`` atomically (a reader never sees half a file); rank 0 only."""
    path = Path(run_dir) / FILE_NAME
    write_text_atomic(path, config_yaml(cfg))
    return path
