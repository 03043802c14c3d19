"""Files written before the model config nested its towers still read: a run's ``config.yaml``, a
checkpoint (its client-state config and manifest) and an export (``tests/fixtures/legacy_flat_config``,
written by that code; its README says how). The references are what that code wrote: its export's
tensors and the features it computed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tritower.inference import load_export
from tritower.launch.checkpoint.manifest import check_manifest
from tritower.launch.cli import load_config
from tritower.launch.tools.export import export
from tritower.model.config import ModelConfig, TowerConfig, migrate_model

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_flat_config"
TAG = FIXTURE / "run" / "checkpoints" / "step00000004"


def test_migrate_model_moves_flat_keys_into_the_towers() -> None:
    flat = {"image_tower": "vit_test", "image_lr_mult": 0.5, "image_size": 48, "image_mean": [0.5, 0.5, 0.5],
            "text_pooling": "cls", "third_pretrained": "/w", "embed_dim": 32}  # fmt: skip
    assert migrate_model(flat) == {
        "embed_dim": 32,
        "image": {"tower": "vit_test", "lr_mult": 0.5, "image_size": 48, "mean": [0.5, 0.5, 0.5]},
        "text": {"pooling": "cls"},
        "third": {"pretrained": "/w"},
    }
    nested = {"image": {"tower": "vit_test"}, "setting": "uu"}
    assert migrate_model(nested) == nested  # today's layout passes through
    with pytest.raises(ValueError, match="model.image_tower='a' and model.image.tower='b' disagree"):
        migrate_model({"image_tower": "a", "image": {"tower": "b"}})
    with pytest.raises(ValueError, match="unknown config key 'model.image.towr'"):
        ModelConfig.from_dict({"image": {"towr": "vit_test"}})


def test_an_old_config_file_reads_as_the_nested_flags_say() -> None:
    old = load_config(["--config", str(FIXTURE / "run" / "config.yaml"), "--train.output_dir=x"])
    flags = load_config(
        ["--experiment=clip_test", "--train.steps=4", "--wandb.mode=disabled", "--model.image.lr_mult=0.5",
         "--model.text.pooling=mean", "--model.image.drop_path=0.1", "--train.output_dir=x"]
    )  # fmt: skip
    assert old.to_dict() == flags.to_dict()
    assert old.model.image == TowerConfig("vit_test", lr_mult=0.5, drop_path=0.1)


def test_an_old_export_loads_and_encodes_as_it_did() -> None:
    reference = np.load(FIXTURE / "features.npz")
    model = load_export(FIXTURE / "export")
    images = torch.from_numpy(reference["images"])
    torch.testing.assert_close(
        model.encode_image(images), torch.from_numpy(reference["image_features"]), rtol=0, atol=0
    )
    texts = [str(text) for text in reference["texts"]]
    torch.testing.assert_close(model.encode_text(texts), torch.from_numpy(reference["text_features"]), rtol=0, atol=0)


def test_an_old_checkpoint_exports_the_same_tensors(tmp_path: Path) -> None:
    config = export(FIXTURE / "run" / "checkpoints", tmp_path / "export")
    assert config["model"]["image"]["lr_mult"] == 0.5  # written in today's layout
    ours, theirs = (
        load_file(tmp_path / "export" / "model.safetensors"),
        load_file(FIXTURE / "export" / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_an_old_manifest_is_checked_against_the_nested_config() -> None:
    manifest = json.loads((TAG / "manifest.json").read_text())
    assert "image_tower" in manifest["model"]  # the older flat layout
    model = load_config(["--config", str(FIXTURE / "run" / "config.yaml")]).to_dict()["model"]
    check_manifest(manifest, "old", world_size=1, model=model)
    model["image"]["tower"] = "vit_scene_tiny"
    with pytest.raises(ValueError, match="model.image.tower='vit_test' there, 'vit_scene_tiny' here"):
        check_manifest(manifest, "old", world_size=1, model=model)
