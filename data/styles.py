"""The built-in scenes' drawing styles: their names, palette and sizes (``data/scenes.py`` draws
them), apart so that the data config can check ``data.builtin_styles`` without importing the generator."""

from __future__ import annotations

STYLES: tuple[str, ...] = ("plain", "outline", "noisy", "shades", "offgrid")
"""Drawing styles of the built-in scenes (module docstring); ``broad`` names all of them."""
SHADES: dict[str, tuple[int, int, int]] = {
    "red": (150, 20, 45),
    "green": (110, 205, 95),
    "blue": (95, 150, 245),
    "yellow": (200, 185, 60),
    "purple": (200, 120, 225),
    "orange": (255, 165, 70),
}
"""The ``shades`` style's colours: other shades that the same colour names cover."""
OFFGRID_SIZES: dict[str, float] = {"small": 0.08, "large": 0.29}
"""The ``offgrid`` style's half-widths: smaller and larger than every plain size."""


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
