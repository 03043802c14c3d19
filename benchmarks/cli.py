"""What the benchmarks' command lines add to ``launch/cli.py: parse_options``: list options that
take several words (``--workers 0 1 2 4``, as the benchmarks always took them) or comma-separated
ones (``--workers=0,1,2,4``, the config tree's spelling), and one exit-2 line for a usage error.

The config tree's ``parse`` makes every ``list`` field repeatable (``--x A --x B``), which appends
to a non-empty default instead of replacing it; a benchmark's list has a default, so its lists are
``tuple[...]`` fields with their own tyro constructor here. This module imports tyro only: a
benchmark's spawned ranks import the script and must not pay for the config tree.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, TypeVar

from tyro.constructors import PrimitiveConstructorSpec

OptionsT = TypeVar("OptionsT")


def listed(kind: type, choices: tuple = ()) -> Any:
    """``tuple[kind, ...]`` read from every word after the flag, each split at commas; an empty
    word or no word gives ``()``. ``choices``: the values allowed (a typo fails naming them)."""

    def parse(words: list[str]) -> tuple:
        values = tuple(kind(item.strip()) for word in words for item in word.split(",") if item.strip())
        wrong = [value for value in values if choices and value not in choices]
        if wrong:
            raise ValueError(f"{wrong[0]!r} is not one of {', '.join(map(str, choices))}")
        return values

    name = "{" + ",".join(map(str, choices)) + "}" if choices else kind.__name__.upper()
    spec = PrimitiveConstructorSpec(
        nargs="*",
        metavar=f"{name} ...",
        instance_from_str=parse,
        is_instance=lambda value: isinstance(value, tuple),
        str_from_instance=lambda value: [str(item) for item in value],
    )
    return Annotated[tuple[kind, ...], spec]


Ints = listed(int)
"""Several integers: ``--workers 0 1 2`` or ``--workers=0,1,2``."""
Words = listed(str)
"""Several words: ``--sizes 4096x512 16384x512`` or ``--sizes=4096x512,16384x512``."""


def parse_benchmark(cls: type[OptionsT], argv: list[str] | None, *, command: str, example: str = "") -> OptionsT:
    """``cls`` from ``argv`` (default ``sys.argv[1:]``) by ``parse_options``; an unknown option or
    a refused value prints one line naming it and exits 2, as tyro's own usage errors do."""
    # Imported here: the config tree imports torch, timm and transformers (seconds, ~0.9 GB RSS).
    from tritower.launch.cli import parse_options
    from tritower.launch.config import ConfigError

    try:
        return parse_options(cls, argv, command=command, example=example)
    except ConfigError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
