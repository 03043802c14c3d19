"""The tower setting: LiT's letters per main tower (L locked, U pretrained-unlocked, u from
scratch) or Three Towers, parsed once from the string users write (``Lu``, ``3T``)."""

from __future__ import annotations

from dataclasses import dataclass

# The paper's eight settings, plus uU (from-scratch image, pretrained text tower), which the
# paper does not run but which the letters describe just as well.
LIT_SETTINGS = ("LU", "Lu", "UU", "Uu", "uu", "UL", "uL", "LL", "uU")
THREE_TOWERS = "3T"
SETTINGS = LIT_SETTINGS + (THREE_TOWERS,)
LETTERS = {"L": "pretrained, locked", "U": "pretrained, unlocked", "u": "from scratch"}
MAIN_TOWERS = ("image", "text")


@dataclass(frozen=True)
class TowerSetting:
    """A parsed setting: one letter per main tower and whether a third tower exists."""

    image: str
    """``L``, ``U`` or ``u``."""
    text: str
    """``L``, ``U`` or ``u``."""
    three_towers: bool = False
    """3T: a frozen pretrained third image tower and its heads join the model."""

    def letter(self, tower: str) -> str:
        """The letter of ``tower`` ("image" or "text")."""
        return {"image": self.image, "text": self.text}[tower]

    def locked(self, tower: str) -> bool:
        """Whether ``tower`` is L (pretrained and locked)."""
        return self.letter(tower) == "L"

    def pretrained(self, tower: str) -> bool:
        """Whether ``tower`` starts from pretrained weights (L or U)."""
        return self.letter(tower) in ("L", "U")

    @property
    def name(self) -> str:
        """The setting as the user writes it (``Lu``, ``3T``)."""
        return THREE_TOWERS if self.three_towers else self.image + self.text


def parse_setting(setting: str) -> TowerSetting:
    """``"Lu"`` -> TowerSetting("L", "u"); ``"3T"`` -> TowerSetting("u", "u", True).

    Letters are case-sensitive (U and u differ); anything else raises ValueError listing the
    valid settings.
    """
    if setting == THREE_TOWERS:
        return TowerSetting("u", "u", three_towers=True)
    if setting in LIT_SETTINGS:
        return TowerSetting(setting[0], setting[1])
    raise ValueError(
        f"model.setting={setting!r} is not a tower setting: use one of "
        f"{', '.join(SETTINGS)} (image letter first, then text; "
        + "; ".join(f"{k} = {v}" for k, v in LETTERS.items())
        + ")"
    )
