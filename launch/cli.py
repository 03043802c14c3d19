"""Command-line parsing for every command: tyro over the typed config dataclasses.

tyro (the parser torchtitan uses) reads nested dataclasses, ``--section.field=value`` and
``--section.field value`` (the forms wandb sweep agents pass; ``--a_b`` or ``--a-b`` alike),
booleans as ``True``/``False``, the field docstrings for ``--help``, and refuses an unknown option
naming the closest ones. This module adds only what tyro does not do: ``--experiment NAME`` (the
base config), ``--config FILE.yaml`` (``launch/config_file.py``), the short ``--zero``/``--resume``
flags, the older flat model keys (``--model.image_tower``), comma-separated tuples
(``--model.image.mean=0.5,0.5,0.5``, one token as sweep agents pass it) and the checks that
span sections (``launch/config.py: validate``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing

import tyro
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

from tritower.launch.config import ConfigError, TrainConfig, validate
from tritower.launch.config_file import file_arguments, read_config_file
from tritower.launch.experiments import DEFAULT_EXPERIMENT, get_experiment
from tritower.model.config import LEGACY_KEYS
from tritower.suggest import closest

ALIASES = {"zero": "deepspeed.zero", "resume": "checkpoint.resume"}
"""Top-level flags that are shorthands for a field."""
TRAIN_PROG = "deepspeed [--num_gpus N] launch/train.py [--experiment NAME] [--config FILE.yaml]"
TRAIN_ABOUT = (
    "Train a contrastive image-text model (CLIP, LiT, Three Towers) on DeepSpeed. Values apply in "
    "order: the experiment, then --config files, then --section.field=value (or --section.field "
    "value) overrides; --zero PATH and --resume auto|PATH are short for --deepspeed.zero and "
    "--checkpoint.resume."
)
OptionsT = typing.TypeVar("OptionsT")

REGISTRY = ConstructorRegistry()


@REGISTRY.primitive_rule
def _comma_tuple(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    """``tuple[float, ...]`` fields as one comma-separated token (``0.5,0.5,0.5``; empty = ())."""
    if typing.get_origin(info.type) is not tuple or typing.get_args(info.type)[-1:] != (Ellipsis,):
        return None
    inner = typing.get_args(info.type)[0]
    return PrimitiveConstructorSpec(
        nargs=1,
        metavar=f"{inner.__name__.upper()},...",
        instance_from_str=lambda args: tuple(inner(item) for item in args[0].split(",") if item.strip()),
        is_instance=lambda value: isinstance(value, tuple),
        str_from_instance=lambda value: [",".join(str(item) for item in value)],
    )


def parse(
    cls: type[OptionsT], argv: list[str], *, default: OptionsT | None = None, prog: str, description: str = ""
) -> OptionsT:
    """``cls`` from ``argv`` with tyro (``default``: the values before the arguments). A usage
    error prints tyro's message on global rank 0 and exits 2; a value a dataclass's own check
    refuses raises ConfigError."""
    quiet = int(os.environ.get("RANK", "0")) != 0  # every rank parses the same argv: one message
    _refuse_unknown(argv, _option_names(cls))
    try:
        return tyro.cli(
            cls,
            args=_bare_flags(argv, _bool_options(cls)),
            default=default,
            prog=prog,
            description=description or None,
            use_underscores=True,
            console_outputs=not quiet,
            config=(tyro.conf.FlagConversionOff, tyro.conf.UseAppendAction),
            registry=REGISTRY,
        )
    except ValueError as error:  # a __post_init__ check
        raise ConfigError(str(error)) from None


def _option_names(cls: type, prefix: str = "") -> dict[str, typing.Any]:
    """{dotted field name: type} of every field under ``cls``, sections included."""
    found: dict[str, typing.Any] = {}
    for name, kind in typing.get_type_hints(cls).items():
        found[f"{prefix}{name}"] = kind
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            found |= _option_names(kind, f"{prefix}{name}.")
    return found


def _refuse_unknown(argv: list[str], names: dict[str, typing.Any]) -> None:
    """ConfigError for an option that is no field, naming the closest one (tyro names one only
    when it is close enough; a typo deserves a suggestion every time)."""
    for token in argv:
        key = token[2:].partition("=")[0].replace("-", "_")
        if token.startswith("--") and key not in names and key != "help":
            fields = [f"--{name}" for name, kind in names.items() if not dataclasses.is_dataclass(kind)]
            raise ConfigError(f"unknown option --{key}{closest(f'--{key}', fields)}; see --help")


def _bool_options(cls: type, prefix: str = "") -> set[str]:
    """The dotted names of every ``bool`` field under ``cls``."""
    found = set()
    for name, kind in typing.get_type_hints(cls).items():
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            found |= _bool_options(kind, f"{prefix}{name}.")
        elif kind is bool:
            found.add(f"{prefix}{name}")
    return found


WORDS = {"true": "True", "1": "True", "yes": "True", "on": "True",
         "false": "False", "0": "False", "no": "False", "off": "False"}  # fmt: skip


def _bare_flags(argv: list[str], bools: set[str]) -> list[str]:
    """Bool options as tyro reads them: given alone (``--json``) means True; ``true``/``1``/``yes``
    (and ``false``/``0``/``no``), after ``=`` or as the next word, are ``True``/``False``."""
    out, i = [], 0
    while i < len(argv):
        token, i = argv[i], i + 1
        key, eq, value = token[2:].partition("=")
        if not token.startswith("--") or key.replace("-", "_") not in bools:
            out.append(token)
            continue
        if not eq:
            following = argv[i].lower() if i < len(argv) else ""
            value, i = (following, i + 1) if following in WORDS else ("true", i)
        out.append(f"--{key}={WORDS.get(value.lower(), value)}")
    return out


def normalise(argv: list[str]) -> list[str]:
    """``--zero``/``--resume`` and the older flat ``--model.<tower>_<option>`` keys spelt as the
    config tree's fields; ``--local_rank`` (added by the ``deepspeed`` launcher) dropped."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        key, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key == "local_rank":
            i += 1 if eq else 2
            continue
        if key == "help":  # --help=SECTION (the older one-section form) prints the whole help
            out.append("--help")
            i += 1
            continue
        if key in ALIASES:
            key = ALIASES[key]
        elif key.startswith("model.") and key[6:] in LEGACY_KEYS:
            key = "model.{}.{}".format(*LEGACY_KEYS[key[6:]])
        out.append(f"--{key}{eq}{value}" if key else token)
        i += 1
    return out


def _take(argv: list[str], name: str) -> tuple[list[str], list[str]]:
    """(the values of every ``--name VALUE`` / ``--name=VALUE``, argv without them)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token == f"--{name}" and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
            continue
        if token.startswith(f"--{name}="):
            values.append(token.split("=", 1)[1])
        else:
            rest.append(token)
        i += 1
    return values, rest


def load_config(argv: list[str]) -> TrainConfig:
    """The run's config from its command line: the experiment, then ``--config`` files in order,
    then the overrides, then the cross-section checks. ``--help`` prints every field and exits 0."""
    names, argv = _take(normalise(argv), "experiment")
    files, argv = _take(argv, "config")
    contents = [(path, read_config_file(path)) for path in files]
    from_file = next((str(values["experiment"]) for _, values in reversed(contents) if "experiment" in values), "")
    name = names[-1] if names else from_file or DEFAULT_EXPERIMENT
    base = get_experiment(name)
    from_files = [arg for path, values in contents for arg in file_arguments(values, path)]
    cfg = parse(TrainConfig, from_files + argv, default=base, prog=TRAIN_PROG, description=TRAIN_ABOUT)
    cfg.experiment = name
    validate(cfg)
    return cfg


def parse_overrides(cfg: OptionsT, argv: list[str], *, prog: str) -> OptionsT:
    """A tool's own config dataclass (``pretrain_image``) from ``cfg`` and ``--field=value`` /
    ``--section.field=value`` overrides."""
    if _take(argv, "experiment")[0]:
        raise ConfigError("--experiment applies to launch/train.py only")
    return parse(type(cfg), normalise(argv), default=cfg, prog=prog, description=_about(type(cfg)))


def parse_options(
    cls: type[OptionsT],
    argv: list[str] | None = None,
    *,
    command: str,
    example: str = "",
    positional: str = "",
    sections: dict[str, str] | None = None,
) -> OptionsT:
    """A tool's options dataclass from its command line. ``positional`` names the field a bare
    first argument fills; ``sections`` maps a prefix to the list field that collects
    ``--prefix.key=value`` pairs for the command to check (precompute's ``--data.*``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    collected: dict[str, list[tuple[str, str]]] = {}
    for prefix, target in (sections or {}).items():
        pairs, rest = [], []
        for token in argv:
            if token.startswith(f"--{prefix}."):
                key, _, value = token[2:].partition("=")
                pairs.append((key, value))
            else:
                rest.append(token)
        collected[target], argv = pairs, rest
    if positional and argv and not argv[0].startswith("-"):
        argv = [f"--{positional}", *argv]
    about = _about(cls) + (f"\n\nExample: {command} {example}" if example else "")
    options = parse(cls, argv, prog=command, description=about)
    return dataclasses.replace(options, **collected) if collected else options


def _about(cls: type) -> str:
    """The first paragraph of the module docstring of ``cls``."""
    return (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
