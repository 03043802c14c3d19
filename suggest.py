"""The one "did you mean" of every error about a misspelt name (options, keys, towers,
experiments): the closest valid name, as every such message words it. Below all folders, so that
``model/`` and ``launch/`` share it; it imports nothing of the project."""

from __future__ import annotations

import difflib


def closest(name: str, options: list[str]) -> str:
    """`` (did you mean 'X'?)`` for the option closest to a misspelt ``name``; "" for none."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""
