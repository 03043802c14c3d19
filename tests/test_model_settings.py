"""Tower settings: parsing the LiT matrix and 3T, validation, regex lock rules with
partial unlocking, the parameter table, learning-rate groups and delayed unlocking.

Run: ``pytest tests/test_model_settings.py`` (CPU, seconds).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tritower.model import (
    LIT_SETTINGS,
    ModelConfig,
    TowerConfig,
    build_clip,
    build_image_tower,
    parameter_counts,
    parameter_groups,
    parameter_table,
    parse_setting,
    resolve_trainable,
    trainable_rules,
    trainable_towers_at,
)

VOCAB = 100


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("vit") / "vit_test.safetensors"
    save_file(build_image_tower("vit_test").vit.state_dict(), str(path))
    return str(path)


def _cfg(
    image: dict | None = None, text: dict | None = None, third: dict | None = None, **fields: object
) -> ModelConfig:
    """The test towers (vit_test, bert_test) with per-tower options and shared fields."""
    return ModelConfig(
        image=TowerConfig("vit_test", **(image or {})),
        text=TowerConfig("bert_test", **(text or {})),
        third=TowerConfig(**(third or {})),
        embed_dim=16,
        **fields,
    )


@pytest.mark.parametrize("setting", LIT_SETTINGS)
def test_parse_lit_settings(setting: str) -> None:
    parsed = parse_setting(setting)
    assert (parsed.image, parsed.text, parsed.three_towers) == (setting[0], setting[1], False)
    assert parsed.locked("image") == (setting[0] == "L")
    assert parsed.pretrained("text") == (setting[1] in "LU")


def test_parse_three_towers_and_bad_strings() -> None:
    assert parse_setting("3T") == parse_setting("3T")
    parsed = parse_setting("3T")
    assert (parsed.image, parsed.text, parsed.three_towers) == ("u", "u", True)
    for bad in ["", "lu", "LUU", "XU", "3t", "U", "uU "]:
        with pytest.raises(ValueError, match="not a tower setting"):
            parse_setting(bad)
    with pytest.raises(ValueError, match="LU, Lu"):
        _cfg(setting="LX")


def test_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="model.image.pretrained is required"):
        _cfg(setting="Lu")
    with pytest.raises(ValueError, match="model.text.pretrained is required"):
        _cfg(setting="uL")
    with pytest.raises(ValueError, match="model.image.pretrained=.*from scratch"):
        _cfg(image=dict(pretrained="x.safetensors"), setting="uu")
    with pytest.raises(ValueError, match="image.unlock_last_blocks"):
        _cfg(image=dict(pretrained="x.pth", unlock_last_blocks=1), setting="Uu")
    with pytest.raises(ValueError, match="exceeds the 2 blocks"):
        _cfg(image=dict(pretrained="x.pth", unlock_last_blocks=3), setting="Lu")
    with pytest.raises(ValueError, match="text.unlock_after_steps"):
        _cfg(text=dict(unlock_after_steps=5), setting="uu")
    with pytest.raises(ValueError, match="image.lr_mult"):
        _cfg(image=dict(lr_mult=0.0))
    with pytest.raises(ValueError, match="embed_dim=16 to equal vit_test's width 32"):
        _cfg(image=dict(pretrained="x.pth"), setting="Lu", locked_head_trainable=False)
    with pytest.raises(ValueError, match="third.pretrained is required"):
        _cfg(setting="3T")
    with pytest.raises(ValueError, match="apply to setting '3T' only"):
        _cfg(third=dict(pretrained="x.pth"))
    # minilm_l6 names its own pretrained source, so U/L need no text_pretrained.
    ModelConfig(text=TowerConfig(tower="minilm_l6"), setting="uL")
    assert len(LIT_SETTINGS) == 9 and "uU" in LIT_SETTINGS  # the paper's 8, plus uU


def _names(model: torch.nn.Module, trainable: dict[str, bool]) -> set[str]:
    return {name for name, flag in trainable.items() if flag}


def test_rules_lu_with_partial_unlocking(vit_file: str) -> None:
    cfg = _cfg(image=dict(pretrained=vit_file, unlock_last_blocks=1), setting="Lu")
    model = build_clip(cfg, vocab_size=VOCAB)
    trainable = resolve_trainable(model, trainable_rules(cfg))
    names = [name for name, _ in model.named_parameters()]
    expected = {
        n for n in names if n.startswith(("image_tower.vit.blocks.1.", "image_tower.vit.fc_norm.", "text_tower."))
    } | {"image_proj.weight", "text_proj.weight", "logit_scale"}
    assert _names(model, trainable) == expected
    assert any(n.startswith("image_tower.vit.blocks.0.") for n in names)  # stays locked
    assert not trainable["image_tower.vit.patch_embed.proj.weight"]


@pytest.mark.parametrize("setting", LIT_SETTINGS)
def test_rules_every_setting(setting: str, vit_file: str) -> None:
    # Text towers of the rules test are built from scratch: the rules only read the setting.
    cfg = _cfg(
        image=dict(pretrained=vit_file if setting[0] in "LU" else ""),
        text=dict(pretrained="unused" if setting[1] in "LU" else ""),
        setting=setting,
    )
    model = build_clip(
        dataclasses.replace(cfg, setting="uu", image=TowerConfig("vit_test"), text=TowerConfig("bert_test")),
        vocab_size=VOCAB,
    )
    trainable = resolve_trainable(model, trainable_rules(cfg))
    for name, flag in trainable.items():
        tower = name.split("_tower.")[0] if "_tower." in name else None
        if tower is not None:
            assert flag == (parse_setting(setting).letter(tower) != "L"), name
        else:
            assert flag, name  # heads (locked_head_trainable=True) and the temperature train


def test_locked_head_frozen_as_identity(vit_file: str) -> None:
    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test", pretrained=vit_file),
        text=TowerConfig(tower="bert_test"),
        embed_dim=32,
        setting="Lu",
        locked_head_trainable=False,
    )
    model = build_clip(cfg, vocab_size=VOCAB)
    trainable = resolve_trainable(model, trainable_rules(cfg))
    assert not trainable["image_proj.weight"] and trainable["text_proj.weight"]
    torch.testing.assert_close(model.image_proj.weight, torch.eye(32))


def test_rule_matching_nothing_fails() -> None:
    model = build_clip(_cfg(), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="matches no parameter"):
        resolve_trainable(model, [(r"^image_tower\.vit\.blocks\.7\.", True), (r".*", True)])
    with pytest.raises(ValueError, match="no trainable rule matches"):
        resolve_trainable(model, [(r"^image_tower\.", True)])


def test_parameter_table_counts(vit_file: str) -> None:
    cfg = _cfg(image=dict(pretrained=vit_file, unlock_last_blocks=1), setting="Lu")
    model = build_clip(cfg, vocab_size=VOCAB)
    trainable = resolve_trainable(model, trainable_rules(cfg))
    vit, bert = model.image_tower.vit, model.text_tower.bert
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    unlocked = numel(vit.blocks[1]) + numel(vit.fc_norm)
    counts = parameter_counts(model, trainable)
    assert counts["image_tower"] == (unlocked, numel(vit) - unlocked)
    assert counts["text_tower"] == (numel(bert), 0)
    assert counts["heads"] == (32 * 16 + 32 * 16, 0)  # two bias-free 32 -> 16 projections
    assert counts["logit_scale"] == (1, 0)
    table = parameter_table(model, trainable, locked={"third_tower": vit})
    assert "third_tower" in table and f"{numel(vit):,}" in table
    total = sum(p.numel() for p in model.parameters()) + numel(vit)
    assert table.splitlines()[-1].split()[-1] == f"{total:,}"


def test_parameter_groups_lr_and_decay(vit_file: str) -> None:
    cfg = _cfg(image=dict(pretrained=vit_file, lr_mult=0.1), text=dict(lr_mult=2.0), setting="Uu")
    model = build_clip(cfg, vocab_size=VOCAB)
    trainable = resolve_trainable(model, trainable_rules(cfg))
    groups = parameter_groups(model, trainable, cfg, weight_decay=0.2, base_lr=1e-3)
    by_name = {group["name"]: group for group in groups}
    assert set(by_name) == {
        "image/decay",
        "image/no_decay",
        "text/decay",
        "text/no_decay",
        "other/decay",
        "other/no_decay",
    }
    assert by_name["image/decay"]["lr"] == pytest.approx(1e-4)
    assert by_name["text/no_decay"]["lr"] == pytest.approx(2e-3)
    assert by_name["other/decay"]["lr"] == pytest.approx(1e-3)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert id(model.logit_scale) in ids(by_name["other/no_decay"])
    assert id(model.image_proj.weight) in ids(by_name["other/decay"])
    for group in groups:
        assert all((p.ndim >= 2) == (group["weight_decay"] == 0.2) for p in group["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # Locked parameters are in no group.
    cfg = _cfg(image=dict(pretrained=vit_file), setting="Lu")
    trainable = resolve_trainable(model, trainable_rules(cfg))
    groups = parameter_groups(model, trainable, cfg, weight_decay=0.2, base_lr=1e-3)
    assert all(g["tower"] != "image" for g in groups)


def test_delayed_unlocking() -> None:
    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="minilm_l6", unlock_after_steps=10), setting="uU"
    )
    assert trainable_towers_at(cfg, 0) == {"image": True, "text": False}
    assert trainable_towers_at(cfg, 9) == {"image": True, "text": False}
    assert trainable_towers_at(cfg, 10) == {"image": True, "text": True}
    locked = _cfg(image=dict(pretrained=str(Path("x.pth"))), setting="Lu")
    assert trainable_towers_at(locked, 100) == {"image": False, "text": True}


@pytest.mark.parametrize(
    "text_tower, last_block, final_norm",
    [
        ("bert_test", "bert.encoder.layer.1.", None),
        ("t5_test", "t5.encoder.block.1.", "t5.encoder.final_layer_norm."),
        ("clip_text_test", "clip.encoder.layers.1.", "clip.final_layer_norm."),
    ],
)
def test_partial_unlocking_of_text_families(text_tower: str, last_block: str, final_norm: str | None) -> None:
    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test"),
        text=TowerConfig(tower=text_tower, pretrained="unused", unlock_last_blocks=1),
        embed_dim=16,
        setting="uL",
    )
    model = build_clip(dataclasses.replace(cfg, setting="uu", text=TowerConfig(cfg.text.tower)), vocab_size=VOCAB)
    trainable = resolve_trainable(model, trainable_rules(cfg))
    unlocked = {n.removeprefix("text_tower.") for n, flag in trainable.items() if flag and n.startswith("text_tower.")}
    assert unlocked and all(n.startswith(last_block) or (final_norm and n.startswith(final_norm)) for n in unlocked)
    assert any(
        n.startswith(last_block.replace(".1.", ".0.")) for n in (k.removeprefix("text_tower.") for k in trainable)
    )  # block 0 exists, locked
    if final_norm:
        assert any(n.startswith(final_norm) for n in unlocked)
