"""Tower settings (the LiT matrix and 3T) and which parameters train.

A setting is two letters, image tower first, then text tower (Zhai et al., LiT):
``L`` pretrained and locked, ``U`` pretrained and unlocked, ``u`` from scratch. ``3T`` is Three
Towers (Kossen et al.): both main towers from scratch plus a frozen pretrained third tower.

Which parameters train is a list of regex rules over parameter names (first match wins, as in
big_vision), resolved once into ``{name: trainable}``. Nothing else decides it, so the table the
trainer prints is the truth about what the optimizer sees.
"""

from __future__ import annotations

import re

from torch import nn

from .config import ModelConfig, TowerOptions
from .registry import image_tower_spec, text_tower_spec

# The four 3T heads that exist next to the two-tower ones (see clip.py): f_h, g_h on the main
# embeddings, h_f, h_g on the third tower. Their temperatures are ``logit_scale_3t``.
THREE_TOWER_HEADS = ("image_proj_3t", "text_proj_3t", "third_proj_image", "third_proj_text")
THREE_TOWER_PARAMETERS = THREE_TOWER_HEADS + ("logit_scale_3t",)
"""Top-level names of everything only a 3T model has (what a plain-CLIP export drops)."""


def _tower_rules(tower: TowerOptions, locked_head_trainable: bool) -> list[tuple[str, bool]]:
    module, head = f"{tower.role}_tower", f"{tower.role}_proj"
    if not tower.locked:
        return [(rf"^{module}\.", True), (rf"^{head}\.", True)]
    spec = image_tower_spec(tower.name) if tower.role == "image" else text_tower_spec(tower.name)
    unlock = tower.unlock_last_blocks
    rules = []
    if unlock:
        last = spec.block_start + spec.num_blocks
        for index in range(last - unlock, last):
            rules.append((rf"^{module}\.{re.escape(spec.block_prefix)}{index}\.", True))
        rules += [(rf"^{module}\.{re.escape(norm)}\.", True) for norm in spec.final_norm]
    # Locked rule after the unlocked blocks: first match wins.
    rules += [(rf"^{module}\.", False), (rf"^{head}\.", locked_head_trainable)]
    return rules


def trainable_rules(cfg: ModelConfig) -> list[tuple[str, bool]]:
    """Regex rules (pattern, trainable) over parameter names for ``cfg``; first match wins.

    L tower: locked, except its last ``*_unlock_last_blocks`` blocks and final norm; its head
    trains iff ``locked_head_trainable``. U and u towers and their heads train. The temperature
    (and SigLIP's ``logit_bias``, where the model has one) always trains; under 3T so do the
    four 3T heads and their temperatures. The frozen third tower is never inside the model, so
    no rule names it.
    """
    parsed = cfg.parsed
    rules = [rule for tower in parsed.main_towers for rule in _tower_rules(tower, cfg.locked_head_trainable)]
    rules.append((r"^logit_scale$", True))
    rules.append((r"^logit_bias$", True))  # matches nothing without a SigLIP loss: allowed
    if parsed.three_towers:
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
    logit_scale (temperatures and SigLIP's bias), plus each module of ``locked`` (towers held
    outside the model, all locked)."""
    counts = {group: [0, 0] for group in ("image_tower", "text_tower", "heads", "logit_scale")}
    for name, parameter in model.named_parameters():
        counts[_group_of(name)][0 if trainable[name] else 1] += parameter.numel()
    for group, module in (locked or {}).items():
        counts.setdefault(group, [0, 0])[1] += sum(p.numel() for p in module.parameters())
    return {group: (t, f) for group, (t, f) in counts.items() if t or f}


def parameter_table(model: nn.Module, trainable: dict[str, bool], locked: dict[str, nn.Module] | None = None) -> str:
    """A printable table of trainable / locked parameter counts per group (see
    ``parameter_counts``), with a total row."""
    counts = parameter_counts(model, trainable, locked)
    total = (sum(t for t, _ in counts.values()), sum(f for _, f in counts.values()))
    lines = [f"{'group':<14}{'trainable':>14}{'locked':>14}{'total':>14}"]
    for group, (t, f) in list(counts.items()) + [("total", total)]:
        lines.append(f"{group:<14}{t:>14,}{f:>14,}{t + f:>14,}")
    return "\n".join(lines)


def decays(name: str, parameter: nn.Parameter) -> bool:
    """Whether weight decay applies: matrices only; biases, norms (ndim < 2) and the learnable
    temperature and bias of the loss get none (CLIP's, open_clip's rule)."""
    return parameter.ndim >= 2 and not name.startswith(("logit_scale", "logit_bias"))


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
    start from scratch, so they keep the base rate). An explicit ``lr`` because the schedule
    scales each group's original lr. Weight decay as ``decays`` says. Extra keys ``name``,
    ``tower``, ``lr_mult`` are for logs and delayed unlocking; torch optimizers keep them untouched.
    """
    mults = {"image": cfg.parsed.image.lr_mult, "text": cfg.parsed.text.lr_mult, "other": 1.0}
    groups: dict[tuple[str, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not trainable[name]:
            continue
        tower = {"image_tower": "image", "text_tower": "text"}.get(name.split(".", 1)[0], "other")
        decay = decays(name, parameter)
        group = groups.setdefault(
            (tower, decay),
            {
                "params": [],
                "lr": base_lr * mults[tower],
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{tower}/{'decay' if decay else 'no_decay'}",
                "tower": tower,
                "lr_mult": mults[tower],
            },
        )
        group["params"].append(parameter)
    return list(groups.values())


def trainable_towers_at(cfg: ModelConfig, step: int) -> dict[str, bool]:
    """{"image": bool, "text": bool}: whether each main tower updates at optimizer ``step``.

    u: always. U: from step ``*_unlock_after_steps`` on (delayed unlocking). L: only its
    partially unlocked blocks, if any. A tower reported False runs without gradient and its
    parameter groups (``group["tower"]``) get lr 0 for that step (see docs/towers.md).
    """
    return {tower.role: tower.updates_at(step) for tower in cfg.parsed.main_towers}
