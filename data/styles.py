"""Names of the built-in scenes' drawing styles (``data/scenes.py`` draws them), apart so that
the data config can check ``data.builtin_styles`` without importing the generator."""

from __future__ import annotations

STYLES: tuple[str, ...] = ("plain", "outline", "noisy", "shades", "offgrid")
"""Drawing styles of the built-in scenes (module docstring); ``broad`` names all of them."""


def parse_styles(text: str) -> tuple[str, ...]:
    """``outline+noisy`` -> ("outline", "noisy"); ``broad`` -> every style. One clear error for
    an unknown name."""
    names = [name.strip() for name in text.replace(",", "+").split("+") if name.strip()]
    if names == ["broad"]:
        return STYLES
    unknown = [name for name in names if name not in STYLES]
    if unknown or not names:
        raise ValueError(
            f"scene styles {text!r}: unknown {', '.join(map(repr, unknown)) or 'empty'}; use '+'-joined "
            f"names out of {', '.join(STYLES)}, or broad (all of them)"
        )
    return tuple(dict.fromkeys(names))
