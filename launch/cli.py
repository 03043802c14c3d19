"""Command-line parsing, in one place: ``--section.field=value`` overrides of a typed config.

Every command that takes config overrides (``launch/train.py``, ``launch/tools/pretrain_image.py``)
parses them here; every other command (export, evaluate, precompute, the planner...) parses its
typed options dataclass with ``parse_options`` in the same style. Accepts ``--key=value`` and
``--key value`` (the forms wandb sweep agents pass); every key is checked against the dataclasses
before anything is built, and an unknown section or key fails at once, naming the closest valid
one. ``--config FILE`` (YAML, ``launch/config_file.py``) sets fields before the overrides, and
``--help`` / ``-h`` prints every section and field with its type, value and docstring (read from
the dataclasses' source), so the help is the config itself. ``--help SECTION`` prints one section.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
import types
import typing
from pathlib import Path

from tritower.launch.config import ConfigError, TrainConfig, closest, validate
from tritower.launch.config_file import apply_file, read_config_file
from tritower.launch.experiments import DEFAULT_EXPERIMENT, EXPERIMENTS, get_experiment
from tritower.model.config import ModelConfig
from tritower.model.sections import NOT_FOR, TOWER_FIELDS, TOWER_ROLES, tower_aliases, tower_field

# Top-level flags that are shorthands for a section field.
ALIASES = {"zero": "deepspeed.zero", "resume": "checkpoint.resume"}
HELP_FLAGS = ("--help", "-h")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_closest = closest


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
    if "." in field_name and isinstance(section, ModelConfig):  # a per-tower option, --model.image.tower
        try:
            field_name = tower_field(*field_name.split(".", 1))
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from None  # it names model.<tower>.<option>
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
    """Build the run's config from the command line: experiment, then ``--config`` files, then
    overrides, then checks. ``--help``/``-h`` prints the config's help and exits 0."""
    argv, help_section = _split_help(argv)
    name, overrides = parse_cli(argv)
    files = [value for key, value in overrides if key == "config"]
    overrides = [(key, value) for key, value in overrides if key != "config"]
    contents = [(path, read_config_file(path)) for path in files]
    from_file = next((str(values["experiment"]) for _, values in reversed(contents) if "experiment" in values), "")
    cfg = get_experiment(name or from_file or DEFAULT_EXPERIMENT)
    for path, values in contents:
        apply_file(cfg, values, path, _convert)
    cfg.experiment = name or from_file or cfg.experiment
    for key, value in overrides:
        apply_override(cfg, key, value)
    if help_section is not None:
        _print_help(cfg, help_section, TRAIN_USAGE, ALIASES)
    validate(cfg)
    return cfg


def parse_overrides(cfg: object, argv: list[str], aliases: dict[str, str] | None = None) -> object:
    """Apply ``--field=value`` / ``--section.field=value`` overrides in ``argv`` to a tool's own
    config dataclass ``cfg`` (no ``--experiment``); returns ``cfg``. ``--help`` prints its help."""
    argv, help_section = _split_help(argv)
    experiment, overrides = parse_cli(argv)
    if experiment:
        raise ConfigError("--experiment applies to launch/train.py only")
    for key, value in overrides:
        apply_override(cfg, key, value, aliases={} if aliases is None else aliases)
    if help_section is not None:
        source = Path(inspect.getfile(type(cfg))).resolve()
        command = source.relative_to(PACKAGE_ROOT) if source.is_relative_to(PACKAGE_ROOT) else source.name
        about = inspect.cleandoc(sys.modules[type(cfg).__module__].__doc__ or "").split("\n\n")[0]
        usage = f"usage: python {command} [--field=VALUE | --section.field=VALUE ...]\n\n{about}"
        _print_help(cfg, help_section, usage.rstrip(), aliases or {})
    return cfg


# ---- help, from the dataclasses themselves ----------------------------------------------------

TRAIN_USAGE = (
    "usage: deepspeed [--num_gpus N] launch/train.py [--experiment NAME] [--config FILE.yaml]\n"
    "                 [--zero POLICY.json] [--resume auto|PATH] [--section.field=VALUE ...]\n\n"
    "Overrides apply in order: the experiment, then --config files, then --section.field=VALUE\n"
    "(or --section.field VALUE, the forms wandb sweep agents pass). --help SECTION shows one section."
)


def _split_help(argv: list[str]) -> tuple[list[str], str | None]:
    """(argv without ``--help``/``-h`` [SECTION], the section asked for: "" = all, None = no help)."""
    for i, token in enumerate(argv):
        if token.startswith("--help="):  # --help=SECTION, the --key=value form of every other option
            return argv[:i] + argv[i + 1 :], token.split("=", 1)[1]
        if token in HELP_FLAGS:
            rest = argv[i + 1 :]
            section = rest[0] if rest and not rest[0].startswith("-") else ""
            return argv[:i] + rest[1 if section else 0 :], section
    return argv, None


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} of a dataclass, read from the string literal below each field in its source
    (and its dataclass bases': a subclass's own docstring wins)."""
    docs = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs |= field_docs(base)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, after in zip(body, body[1:]):
        literal = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and literal:
            docs[node.target.id] = inspect.cleandoc(str(after.value.value))
    return docs


def _describe(section: object, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Help lines of one dataclass: ``--prefix.field: type = value`` and its docstring."""
    docs = field_docs(type(section))
    lines = []
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value) or item.name in skip:
            continue
        kind = item.type if isinstance(item.type, str) else getattr(item.type, "__name__", str(item.type))
        lines.append(f"  --{prefix}{item.name}: {kind} = {value!r}")
        doc = docs.get(item.name, "")
        lines += [f"        {line}" for line in textwrap.wrap(" ".join(doc.split()), 92)] if doc else []
    return lines


def help_text(cfg: object, section: str = "", usage: str = "", aliases: dict[str, str] | None = None) -> str:
    """The help of a sectioned config: usage, experiments, shorthands, then every section's fields."""
    sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    if section.startswith("model.") and isinstance(getattr(cfg, "model", None), ModelConfig):
        role = section.removeprefix("model.")
        if role not in TOWER_ROLES:
            raise ConfigError(f"--help {section}: unknown tower section{closest(role, list(TOWER_ROLES))}")
        return "\n".join([usage, *_tower_help(cfg.model, role)]) + "\n"
    if section and section not in sections:
        raise ConfigError(
            f"--help {section}: unknown section{closest(section, sections)}; sections: {', '.join(sections)}"
        )
    lines = [usage] if usage else []
    doc = inspect.cleandoc(type(cfg).__doc__ or "")
    if isinstance(cfg, TrainConfig):
        lines += ["", f"Experiments (--experiment NAME, default {DEFAULT_EXPERIMENT}):"]
        lines += [f"  {name}: {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in EXPERIMENTS.items()]
        lines += ["", f"Values shown are those of experiment {cfg.experiment} with the options given."]
    elif doc:
        lines += ["", doc]
    if aliases:
        lines += ["Shorthands: " + ", ".join(f"--{short} = --{full}" for short, full in aliases.items())]
    if not section:
        top = _describe(cfg, "", skip=("experiment",))
        lines += ["", "[options]", *top] if top else []
    for name in sections:
        if section and name != section:
            continue
        value = getattr(cfg, name)
        title = inspect.cleandoc(type(value).__doc__ or "").split("\n\n")[0]
        if isinstance(value, ModelConfig):
            lines += ["", f"[{name}] " + " ".join(title.split())]
            lines += _describe(value, f"{name}.", skip=tuple(tower_aliases()))
            lines += ["  Per tower: [model.image], [model.text], [model.third] below (--help model.image for one)."]
            for role in TOWER_ROLES:
                lines += _tower_help(value, role)
            continue
        lines += ["", f"[{name}] " + " ".join(title.split()), *_describe(value, f"{name}.")]
    return "\n".join(lines) + "\n"


def _tower_help(model: ModelConfig, role: str) -> list[str]:
    """``[model.<role>]``: the options that apply to the tower, with values and docstrings, then
    the ones that do not and why (every tower has the same section shape)."""
    view = model.section(role)
    others = tuple(f.name for f in dataclasses.fields(view) if f.name not in TOWER_FIELDS[role])
    alias = next(iter(TOWER_FIELDS[role].values()))
    lines = ["", f"[model.{role}] The {role} tower (flat aliases, e.g. --model.{alias} = --model.{role}.tower)."]
    lines += _describe(view, f"model.{role}.", skip=others)
    if others:
        refused = f"Not for the {role} tower (refused): {', '.join(others)}: {NOT_FOR[role]}."
        lines += [f"  {line}" for line in textwrap.wrap(refused, 96)]
    return lines


def _print_help(cfg: object, section: str, usage: str, aliases: dict[str, str]) -> typing.NoReturn:
    sys.stdout.write(help_text(cfg, section, usage, aliases))
    sys.stdout.flush()
    raise SystemExit(0)


# ---- tool commands: one flat options dataclass each ----------------------------------------------

OptionsT = typing.TypeVar("OptionsT")
BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")


def parse_options(
    cls: type[OptionsT],
    argv: list[str] | None = None,
    *,
    command: str,
    example: str = "",
    positional: str = "",
    sections: dict[str, str] | None = None,
) -> OptionsT:
    """Build a tool's options dataclass ``cls`` from its command line, in the style of train.py.

    ``--name=value`` and ``--name value``; ``--long-name`` is ``--long_name`` (the commands' older
    dashed flags keep working); a ``bool`` field given alone (``--json``) is True; a ``list`` field
    is repeatable (each ``--set X`` adds one item); a field without a default is required (missing:
    one line naming it and ``example``); ``field(metadata={"choices": (...)})`` limits the values.
    ``positional`` names the field a bare argument fills; ``sections`` maps a prefix to the list
    field that collects ``--prefix.key=value`` pairs for the command to check (precompute's
    ``--data.*``). ``--help``/``-h`` prints the fields with their docstrings and exits 0; any
    mistake is a ConfigError naming the option (and the closest valid one)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    sections = sections or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in sections.values()}
    values: dict[str, typing.Any] = {target: [] for target in sections.values()}
    wants_help, i = False, 0
    while i < len(argv):
        token, i = argv[i], i + 1
        if token in HELP_FLAGS:
            wants_help = True
            continue
        if not token.startswith("--"):
            if not positional or positional in values:
                raise ConfigError(f"unexpected argument {token!r}: options are --name=VALUE (see --help)")
            _set_option(values, positional, token, hints[positional], fields[positional], positional)
            continue
        raw, has_value, text = token[2:].partition("=")
        name = raw.replace("-", "_")
        if "." in name and name.split(".", 1)[0] in sections:
            if not has_value:
                text, i = _option_text(argv, i, token)
            values[sections[name.split(".", 1)[0]]].append((name, text))
            continue
        if name not in fields:
            names = [n.replace("_", "-") if "-" in raw else n for n in fields]
            raise ConfigError(f"unknown option --{raw}{closest(raw, names)}; see --help")
        if not has_value and hints[name] is bool:
            # A bare flag means True; an explicit word after it (sweep agents' form) still counts.
            has_next = i < len(argv) and argv[i].lower() in BOOL_WORDS
            text, i = (argv[i], i + 1) if has_next else ("true", i)
        elif not has_value:
            text, i = _option_text(argv, i, token)
        _set_option(values, name, text, hints[name], fields[name], raw)
    if wants_help:
        sys.stdout.write(
            options_help(cls, values, command=command, example=example, positional=positional, sections=sections)
        )
        sys.stdout.flush()
        raise SystemExit(0)
    missing = [
        f"{name.upper()} (or --{name})" if name == positional else f"--{name}"
        for name, item in fields.items()
        if name not in values and _required(item)
    ]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: e.g. {command} {example}".rstrip())
    return cls(**values)


def _option_text(argv: list[str], i: int, token: str) -> tuple[str, int]:
    """(the value after ``token`` at ``argv[i]``, the next index); ConfigError if there is none."""
    if i < len(argv) and not argv[i].startswith("--"):
        return argv[i], i + 1
    raise ConfigError(f"{token} needs a value: write {token}=VALUE")


def _required(item: dataclasses.Field) -> bool:
    return item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING


def _set_option(
    values: dict[str, typing.Any], name: str, text: str, kind: typing.Any, item: dataclasses.Field, raw: str
) -> None:
    """Convert ``text`` to the field's type and store it (appended, for a repeatable list field)."""
    if typing.get_origin(kind) is list:
        (inner,) = typing.get_args(kind) or (str,)
        values.setdefault(name, []).append(_convert(text, inner, raw))
        return
    value = _convert(text, kind, raw)
    choices = item.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(
            f"--{raw}={text!r}: one of {', '.join(map(str, choices))}{closest(str(value), list(map(str, choices)))}"
        )
    values[name] = value


def options_help(
    cls: type,
    values: dict[str, typing.Any],
    *,
    command: str,
    example: str = "",
    positional: str = "",
    sections: dict[str, str] | None = None,
) -> str:
    """A tool's help, in the format of train.py's: usage, what it does, then ``--field: type =
    value`` (the defaults with the options given) and each field's docstring."""
    sections = sections or {}
    docs = field_docs(cls)
    about = inspect.cleandoc(sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0]
    lines = [f"usage: {command}{' ' + positional.upper() if positional else ''} [--field=VALUE | --field VALUE ...]"]
    lines += [f"  e.g. {command} {example}"] if example else []
    lines += ["", " ".join(about.split())]
    lines += [
        "Dashes or underscores alike (--out-dir = --out_dir); a bool option alone means true; "
        "a list option is repeated (--set A --set B).",
        "",
        "[options]",
    ]
    for item in dataclasses.fields(cls):
        doc = " ".join(docs.get(item.name, "").split())
        if item.name in sections.values():
            prefix = next(p for p, target in sections.items() if target == item.name)
            lines.append(f"  --{prefix}.FIELD=VALUE: repeatable")
        else:
            kind = item.type if isinstance(item.type, str) else getattr(item.type, "__name__", str(item.type))
            if item.name in values:
                shown = f" = {values[item.name]!r}"
            elif _required(item):
                shown = " (required)"
            else:
                default = item.default if item.default_factory is dataclasses.MISSING else item.default_factory()
                shown = f" = {default!r}"
            choices = item.metadata.get("choices")
            shown += f", one of {', '.join(map(str, choices))}" if choices else ""
            shown += ", repeatable" if typing.get_origin(typing.get_type_hints(cls)[item.name]) is list else ""
            lines.append(f"  --{item.name}: {kind}{shown}")
        lines += [f"        {line}" for line in textwrap.wrap(doc, 92)]
    return "\n".join(lines) + "\n"
