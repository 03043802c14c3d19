"""Local sources of pretrained files, shared by the text tower (``model/``) and its tokenizer (``data/``).

A source is a local path, or ``package:<python package>``: an installed package that ships a model
folder (``<package>/model/``), as the offline test weights do. It lives below both library layers so
that the one rule is written once; it imports nothing from the project.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PREFIX = "package:"


def resolve_source(source: str | Path) -> Path:
    """A local path (``~`` expanded), or ``package:<name>`` -> that installed package's ``model/``
    folder; FileNotFoundError naming the package if it is not installed."""
    source = str(source)
    if not source.startswith(PREFIX):
        return Path(source).expanduser()
    package = source.removeprefix(PREFIX)
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{source}: no installed package {package!r} (pip install it, or give a local folder)")
    return Path(list(found.submodule_search_locations)[0]) / "model"
