"""Command-line parsing, in one place: ``--section.field=value`` overrides of a typed config.

Every command that takes config overrides (``launch/train.py``, ``launch/tools/pretrain_image.py``,
``launch/tools/precompute.py``) parses them here. Accepts ``--key=value`` and ``--key value`` (the
forms wandb sweep agents pass); every key is checked against the dataclasses before anything is
built, and an unknown section or key fails at once, naming the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing

from tritower.launch.config import ConfigError, TrainConfig, validate
from tritower.launch.experiments import DEFAULT_EXPERIMENT, get_experiment

# Top-level flags that are shorthands for a section field.
ALIASES = {"zero": "deepspeed.zero", "resume": "checkpoint.resume"}


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _field_types(section: object) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _convert(text: str, kind: typing.Any, key: str) -> typing.Any:
    """Parse a command-line string into the field's declared type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _convert(text, options[0], key)
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(kind) or (str,)
        items = [s for s in text.strip("()[]").split(",") if s.strip()]
        values = [_convert(s.strip(), inner, key) for s in items]
        return tuple(values) if origin is tuple else values
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            number = float(text)  # accepts "1e3" as wandb sometimes writes integers
            if number != int(number):
                raise ValueError(text)
            return int(number)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"--{key}={text!r}: expected a {kind.__name__}") from None
    return text


def apply_override(cfg: object, key: str, text: str, aliases: dict[str, str] | None = None) -> None:
    """Set ``section.field`` of a sectioned config (``TrainConfig``, or a tool's own dataclass),
    or a top-level alias, from its command-line text."""
    aliases = ALIASES if aliases is None else aliases
    key = aliases.get(key, key)
    sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    # A tool's own config may have plain top-level fields beside its sections (``--steps=``).
    plain = [f.name for f in dataclasses.fields(cfg) if f.name not in sections and f.name != "experiment"]
    valid_keys = plain + [f"{s}.{f.name}" for s in sections for f in dataclasses.fields(getattr(cfg, s))]
    if "." not in key and key in plain:
        setattr(cfg, key, _convert(text, _field_types(cfg)[key], key))
        return
    if "." not in key:
        raise ConfigError(
            f"unknown option --{key}{_closest(key, list(aliases) + valid_keys)}; options are "
            f"--section.field=value{''.join(', --' + a for a in aliases)}"
        )
    section_name, field_name = key.split(".", 1)
    if section_name not in sections:
        raise ConfigError(f"unknown config section '{section_name}'{_closest(section_name, sections)} in --{key}")
    section = getattr(cfg, section_name)
    types_by_field = _field_types(section)
    if field_name not in types_by_field:
        raise ConfigError(f"unknown config key '{key}'{_closest(key, valid_keys)}")
    value = _convert(text, types_by_field[field_name], key)
    setattr(section, field_name, value)


def parse_cli(argv: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Split argv into (experiment name, [(key, value text), ...]).

    Accepts ``--key=value`` and ``--key value``; ``--local_rank`` (added by the ``deepspeed``
    launcher) is accepted and ignored because the rank comes from the environment.
    """
    experiment = ""
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: options are --section.field=value")
        if "=" in token:
            key, value = token[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = token[2:], argv[i + 1]
            i += 1
        else:
            raise ConfigError(f"{token} needs a value: write {token}=VALUE")
        i += 1
        key = key.replace("-", "_") if key in ("local-rank",) else key
        if key == "local_rank":
            continue
        if key == "experiment":
            experiment = value
        else:
            overrides.append((key, value))
    return experiment, overrides


def load_config(argv: list[str]) -> TrainConfig:
    """Build the run's config from the command line: experiment, then overrides, then checks."""
    name, overrides = parse_cli(argv)
    cfg = get_experiment(name or DEFAULT_EXPERIMENT)
    for key, value in overrides:
        apply_override(cfg, key, value)
    validate(cfg)
    return cfg


def parse_overrides(cfg: object, argv: list[str], aliases: dict[str, str] | None = None) -> object:
    """Apply ``--field=value`` / ``--section.field=value`` overrides in ``argv`` to a tool's own
    config dataclass ``cfg`` (no ``--experiment``); returns ``cfg``."""
    experiment, overrides = parse_cli(argv)
    if experiment:
        raise ConfigError("--experiment applies to launch/train.py only")
    for key, value in overrides:
        apply_override(cfg, key, value, aliases={} if aliases is None else aliases)
    return cfg
