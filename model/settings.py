"""Tower settings (the LiT matrix and 3T) and which parameters train.

A setting is two letters, image tower first, then text tower (Zhai et al., LiT):
``L`` pretrained and locked, ``U`` pretrained and unlocked, ``u`` from scratch. ``3T`` is Three
Towers (Kossen et al.): both main towers from scratch plus a frozen pretrained third tower.

Which parameters train is a list of regex rules over parameter names (first match wins, as in
big_vision), resolved once into ``{name: trainable}``. Nothing else decides it, so the table the
trainer prints is the truth about what the optimizer sees.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .registry import ImageTowerSpec, TextTowerSpec, image_tower_spec, text_tower_spec

if TYPE_CHECKING:
    from .config import ModelConfig

# The paper's eight settings, plus uU (from-scratch image, pretrained text tower), which the
# paper does not run but which the letters describe just as well.
LIT_SETTINGS = ("LU", "Lu", "UU", "Uu", "uu", "UL", "uL", "LL", "uU")
THREE_TOWERS = "3T"
LETTERS = {"L": "pretrained, locked", "U": "pretrained, unlocked", "u": "from scratch"}
# The four 3T heads that exist next to the two-tower ones (see clip.py): f_h, g_h on the main
# embeddings, h_f, h_g on the third tower. Their temperatures are ``logit_scale_3t``.
THREE_TOWER_HEADS = ("image_proj_3t", "text_proj_3t", "third_proj_image", "third_proj_text")
THREE_TOWER_PARAMETERS = THREE_TOWER_HEADS + ("logit_scale_3t",)
"""Top-level names of everything only a 3T model has (what a plain-CLIP export drops)."""


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
        f"{', '.join(LIT_SETTINGS + (THREE_TOWERS,))} (image letter first, then text; "
        + "; ".join(f"{k} = {v}" for k, v in LETTERS.items()) + ")"
    )


def _spec(cfg: ModelConfig, tower: str) -> ImageTowerSpec | TextTowerSpec:
    return image_tower_spec(cfg.image_tower) if tower == "image" else text_tower_spec(cfg.text_tower)


def validate_setting(cfg: ModelConfig) -> None:
    """Checks the setting-related fields of ``cfg`` together; ValueError naming the field."""
    setting = parse_setting(cfg.setting)
    for tower in ("image", "text"):
        letter, spec = setting.letter(tower), _spec(cfg, tower)
        source = getattr(cfg, f"{tower}_pretrained")
        default = getattr(spec, "pretrained_dir", "")
        if letter in "LU" and not (source or default):
            raise ValueError(
                f"model.{tower}_pretrained is required: setting {cfg.setting!r} makes the "
                f"{tower} tower {letter} ({LETTERS[letter]}); give a local checkpoint path"
            )
        if letter == "u" and source:
            raise ValueError(
                f"model.{tower}_pretrained={source!r} is set but setting {cfg.setting!r} trains "
                f"the {tower} tower from scratch (u); clear it or use L/U"
            )
        blocks = getattr(cfg, f"{tower}_unlock_last_blocks")
        if blocks < 0 or (blocks and letter != "L"):
            raise ValueError(
                f"model.{tower}_unlock_last_blocks={blocks} applies to a locked (L) {tower} "
                f"tower only and must be >= 0 (setting {cfg.setting!r})"
            )
        if blocks > spec.num_blocks:
            raise ValueError(
                f"model.{tower}_unlock_last_blocks={blocks} exceeds the {spec.num_blocks} "
                f"blocks of {spec.name}"
            )
        delay = getattr(cfg, f"{tower}_unlock_after_steps")
        if delay < 0 or (delay and letter != "U"):
            raise ValueError(
                f"model.{tower}_unlock_after_steps={delay} applies to an unlocked pretrained (U) "
                f"{tower} tower only and must be >= 0 (setting {cfg.setting!r})"
            )
        mult = getattr(cfg, f"{tower}_lr_mult")
        if not (mult > 0 and math.isfinite(mult)):
            raise ValueError(f"model.{tower}_lr_mult must be positive, got {mult}")
        if letter == "L" and not cfg.locked_head_trainable and spec.width != cfg.embed_dim:
            raise ValueError(
                f"model.locked_head_trainable=False freezes the {tower} head as the identity, "
                f"which needs model.embed_dim={cfg.embed_dim} to equal {spec.name}'s width "
                f"{spec.width}"
            )
    if setting.three_towers:
        if not cfg.third_pretrained:
            raise ValueError("model.third_pretrained is required for setting '3T' (the frozen "
                             "pretrained third tower); give a local checkpoint path")
        image_tower_spec(cfg.third_tower or cfg.image_tower)  # unknown name -> ValueError
    elif cfg.third_tower or cfg.third_pretrained or cfg.init_logit_scale_3t:
        raise ValueError(f"model.third_tower/third_pretrained/init_logit_scale_3t apply to "
                         f"setting '3T' only, not {cfg.setting!r}")


def _tower_rules(cfg: ModelConfig, tower: str, setting: TowerSetting) -> list[tuple[str, bool]]:
    module, head = f"{tower}_tower", f"{tower}_proj"
    if not setting.locked(tower):
        return [(rf"^{module}\.", True), (rf"^{head}\.", True)]
    spec = _spec(cfg, tower)
    unlock = getattr(cfg, f"{tower}_unlock_last_blocks")
    rules = []
    if unlock:
        last = spec.block_start + spec.num_blocks
        for index in range(last - unlock, last):
            rules.append((rf"^{module}\.{re.escape(spec.block_prefix)}{index}\.", True))
        rules += [(rf"^{module}\.{re.escape(norm)}\.", True) for norm in spec.final_norm]
    # Locked rule after the unlocked blocks: first match wins.
    rules += [(rf"^{module}\.", False), (rf"^{head}\.", cfg.locked_head_trainable)]
    return rules


def trainable_rules(cfg: ModelConfig) -> list[tuple[str, bool]]:
    """Regex rules (pattern, trainable) over parameter names for ``cfg``; first match wins.

    L tower: locked, except its last ``*_unlock_last_blocks`` blocks and final norm; its head
    trains iff ``locked_head_trainable``. U and u towers and their heads train. The temperature
    (and SigLIP's ``logit_bias``, where the model has one) always trains; under 3T so do the
    four 3T heads and their temperatures. The frozen third tower is never inside the model, so
    no rule names it.
    """
    setting = parse_setting(cfg.setting)
    rules = _tower_rules(cfg, "image", setting) + _tower_rules(cfg, "text", setting)
    rules.append((r"^logit_scale$", True))
    rules.append((r"^logit_bias$", True))  # matches nothing without a SigLIP loss: allowed
    if setting.three_towers:
        rules.append((rf"^({'|'.join(THREE_TOWER_HEADS)})\.", True))
        rules.append((r"^logit_scale_3t$", True))
    return rules


def resolve_trainable(model: nn.Module, rules: list[tuple[str, bool]]) -> dict[str, bool]:
    """{parameter name: trainable} by the first matching rule.

    Raises ValueError for a parameter no rule matches, and for a rule that matches nothing
    although the model has the module it names: a tower renamed by a library upgrade would
    otherwise silently leave blocks locked or unlocked.
    """
    compiled = [(re.compile(pattern), flag) for pattern, flag in rules]
    used = [False] * len(compiled)
    trainable: dict[str, bool] = {}
    for name, _ in model.named_parameters():
        for index, (pattern, flag) in enumerate(compiled):
            if pattern.match(name):
                trainable[name], used[index] = flag, True
                break
        else:
            raise ValueError(f"no trainable rule matches parameter {name!r}; rules: {rules}")
    children = {name for name, _ in model.named_children()} | {
        name for name, _ in model.named_parameters(recurse=False)
    }
    for (pattern, _), hit in zip(rules, used):
        top = re.match(r"\^\(?([a-z_0-9]+)", pattern)
        if not hit and top and top.group(1) in children:
            raise ValueError(f"trainable rule {pattern!r} matches no parameter of the model")
    return trainable


def apply_trainable(model: nn.Module, trainable: dict[str, bool]) -> None:
    """Sets ``requires_grad`` of every parameter from the resolved map."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable[name])


def _group_of(name: str) -> str:
    top = name.split(".", 1)[0]
    if top in ("image_tower", "text_tower"):
        return top
    if top.startswith(("logit_scale", "logit_bias")):
        return "logit_scale"  # temperatures and SigLIP's bias
    return "heads"


def parameter_counts(
    model: nn.Module, trainable: dict[str, bool], locked: dict[str, nn.Module] | None = None
) -> dict[str, tuple[int, int]]:
    """{group: (trainable, locked)} parameter counts; groups are image_tower, text_tower, heads,
    logit_scale (temperatures and SigLIP's bias), plus each module of ``locked`` (towers held outside the model, all locked)."""
    counts = {group: [0, 0] for group in ("image_tower", "text_tower", "heads", "logit_scale")}
    for name, parameter in model.named_parameters():
        counts[_group_of(name)][0 if trainable[name] else 1] += parameter.numel()
    for group, module in (locked or {}).items():
        counts.setdefault(group, [0, 0])[1] += sum(p.numel() for p in module.parameters())
    return {group: (t, f) for group, (t, f) in counts.items() if t or f}


def parameter_table(
    model: nn.Module, trainable: dict[str, bool], locked: dict[str, nn.Module] | None = None
) -> str:
    """A printable table of trainable / locked parameter counts per group (see
    ``parameter_counts``), with a total row."""
    counts = parameter_counts(model, trainable, locked)
    total = (sum(t for t, _ in counts.values()), sum(f for _, f in counts.values()))
    lines = [f"{'group':<14}{'trainable':>14}{'locked':>14}{'total':>14}"]
    for group, (t, f) in list(counts.items()) + [("total", total)]:
        lines.append(f"{group:<14}{t:>14,}{f:>14,}{t + f:>14,}")
    return "\n".join(lines)


def parameter_groups(
    model: nn.Module,
    trainable: dict[str, bool],
    cfg: ModelConfig,
    weight_decay: float,
    base_lr: float,
) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters, each with an explicit ``lr``.

    ``lr = base_lr * mult`` where mult is ``image_lr_mult`` for ``image_tower.*``,
    ``text_lr_mult`` for ``text_tower.*`` and 1 for heads and temperatures (heads of a U tower
    start from scratch, so they keep the base rate). An explicit ``lr`` because DeepSpeed's
    WarmupCosineLR scales each group's original lr. Parameters with ndim < 2 (biases, norms,
    ``logit_scale``) get no weight decay. Extra keys ``name``, ``tower``, ``lr_mult`` are for
    logs and delayed unlocking; torch optimizers keep them untouched.
    """
    mults = {"image": cfg.image_lr_mult, "text": cfg.text_lr_mult, "other": 1.0}
    groups: dict[tuple[str, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not trainable[name]:
            continue
        tower = {"image_tower": "image", "text_tower": "text"}.get(name.split(".", 1)[0], "other")
        decay = parameter.ndim >= 2 and not name.startswith(("logit_scale", "logit_bias"))
        group = groups.setdefault((tower, decay), {
            "params": [],
            "lr": base_lr * mults[tower],
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{tower}/{'decay' if decay else 'no_decay'}",
            "tower": tower,
            "lr_mult": mults[tower],
        })
        group["params"].append(parameter)
    return list(groups.values())


def trainable_towers_at(cfg: ModelConfig, step: int) -> dict[str, bool]:
    """{"image": bool, "text": bool}: whether each main tower updates at optimizer ``step``.

    u: always. U: from step ``*_unlock_after_steps`` on (delayed unlocking). L: only its
    partially unlocked blocks, if any. A tower reported False runs without gradient and its
    parameter groups (``group["tower"]``) get lr 0 for that step (see docs/towers.md).
    """
    setting = parse_setting(cfg.setting)
    result = {}
    for tower in ("image", "text"):
        letter = setting.letter(tower)
        if letter == "L":
            result[tower] = getattr(cfg, f"{tower}_unlock_last_blocks") > 0
        elif letter == "U":
            result[tower] = step >= getattr(cfg, f"{tower}_unlock_after_steps")
        else:
            result[tower] = True
    return result
