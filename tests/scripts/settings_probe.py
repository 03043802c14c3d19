"""Train every tower setting a few steps through the real Trainer and DeepSpeed engine; report
which parameters changed, which stayed bitwise equal, and how much optimizer state exists.

Run by tests/test_tower_settings.py under ``deepspeed --num_gpus 1`` (one engine per case, in
order). ``--case NAME=SETTING[,field=value...]``; the common overrides come after ``--``.
For each case rank 0 records, per tower group (image_tower, text_tower, third_tower, heads):

* ``changed`` / ``unchanged``: parameter names whose values after training differ from / are
  bitwise equal to their values before the first step (captured right after construction);
* ``in_engine`` / ``requires_grad``: where each parameter lives;
* ``optimizer_numel``: elements of fp32 optimizer state (exp_avg) the engine holds, against
  ``trainable_numel``, the sum over parameters that require grad in the engine.
"""

from __future__ import annotations

import argparse
import json

import torch

from tritower.launch.cli import load_config
from tritower.launch.loop.trainer import Trainer
from tritower.model import parse_setting


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's model and of the locked towers, by a prefixed name."""
    state = {name: p.detach().clone() for name, p in trainer.engine.module.named_parameters()}
    for name, tower in trainer.locked.modules().items():
        for sub, p in tower.tower.named_parameters():
            state[f"{name}.{sub}"] = p.detach().clone()
    return state


def group(name: str) -> str:
    top = name.split(".", 1)[0]
    return top if top in ("image_tower", "text_tower", "third_tower") else "heads"


def compare(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict:
    """{group: {"changed": [...], "unchanged": [...]}} between two snapshots."""
    result: dict = {}
    for key in before:
        entry = result.setdefault(group(key), {"changed": [], "unchanged": []})
        entry["unchanged" if torch.equal(before[key], after[key]) else "changed"].append(key)
    return result


def optimizer_numel(trainer: Trainer) -> int:
    """Elements of AdamW's first moment across the engine's optimizer state."""
    optimizer = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
    return sum(state["exp_avg"].numel() for state in optimizer.state.values() if "exp_avg" in state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("common", nargs="*")
    options = parser.parse_args()
    results = {}
    for case in options.case:
        name, _, spec = case.partition("=")
        setting, *fields = spec.split(",")
        # A from-scratch (u) tower takes no checkpoint path: drop the common one.
        letters = parse_setting(setting)
        common = [
            arg
            for arg in options.common
            if not (arg.startswith("--model.image.pretrained") and letters.image == "u")
            and not (arg.startswith("--model.text.pretrained") and letters.text == "u")
        ]
        cfg = load_config(
            [*common, f"--model.setting={setting}", f"--train.run_name={name}", *[f"--{field}" for field in fields]]
        )
        trainer = Trainer(cfg)
        before = snapshot(trainer)
        in_engine = {n for n, _ in trainer.engine.module.named_parameters()}
        requires_grad = {n for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
        record = {"groups": {}, "table": trainer.towers.table}
        delay = cfg.model.image.unlock_after_steps
        if delay:
            # Train up to the unlock step, record what changed, then go on to the end.
            steps, cfg.train.steps = cfg.train.steps, delay
            trainer.train()
            record["before_unlock"] = compare(before, snapshot(trainer))
            cfg.train.steps = steps
        final = trainer.train()
        after = snapshot(trainer)
        record["loss"] = final["loss"]
        for key in before:
            entry = record["groups"].setdefault(
                group(key), {"changed": [], "unchanged": [], "in_engine": [], "requires_grad": []}
            )
            entry["unchanged" if torch.equal(before[key], after[key]) else "changed"].append(key)
            if key in in_engine:
                entry["in_engine"].append(key)
            if key in requires_grad:
                entry["requires_grad"].append(key)
        record["optimizer_numel"] = optimizer_numel(trainer)
        record["trainable_numel"] = sum(before[n].numel() for n in requires_grad)
        record["optimizer_tensors_per_group"] = [
            len(g["params"])
            for g in getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer).param_groups
        ]
        results[name] = record
    if trainer.env.is_main:
        with open(options.out, "w") as out:
            json.dump(results, out)


if __name__ == "__main__":
    main()
