"""Locked towers outside the trainable model: no autograd graph under
inference_mode, bitwise-unchanged weights after optimizer steps on the rest, split_locked,
the embeddings path of CLIPModel.forward, the evaluation view, and 3T outputs.

Run: ``pytest tests/test_lock.py`` (CPU, seconds).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tritower.model import (
    CLIPWithLocked,
    LockedTower,
    ModelConfig,
    TowerConfig,
    apply_trainable,
    build_clip,
    build_image_tower,
    parameter_groups,
    parameter_table,
    resolve_trainable,
    split_locked,
    trainable_rules,
)

VOCAB = 100


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("vit") / "vit_test.safetensors"
    save_file(build_image_tower("vit_test").vit.state_dict(), str(path))
    return path


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, 16))
    return torch.randn(4, 3, 32, 32), ids, torch.ones_like(ids)


def _loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    return torch.nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]))


def test_locked_tower_builds_no_graph_and_stays_bitwise(vit_file: Path) -> None:
    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test", pretrained=str(vit_file)),
        text=TowerConfig(tower="bert_test"),
        embed_dim=16,
        setting="Lu",
    )
    model = build_clip(cfg, vocab_size=VOCAB)
    trainable = resolve_trainable(model, trainable_rules(cfg))
    model, locked = split_locked(model, cfg)
    apply_trainable(model, trainable)
    assert model.image_tower is None and locked.text is None and locked.third is None
    assert not any(name.startswith("image_tower.") for name, _ in model.named_parameters())
    before = {k: v.clone() for k, v in locked.image.state_dict().items()}

    images, ids, mask = _batch()
    embeddings = locked.image.encode(images)
    assert not embeddings.requires_grad and embeddings.grad_fn is None
    assert not embeddings.is_inference()  # cloned out, so the trainable head can save it
    assert all(not p.requires_grad for p in locked.image.parameters())
    locked.image.train()  # a trainer's model.train() must not switch dropout/BN on
    assert not locked.image.training and not locked.image.tower.training

    groups = parameter_groups(model, trainable, cfg, weight_decay=0.1, base_lr=1e-2)
    optimizer = torch.optim.AdamW(groups)
    head_before = model.image_proj.weight.detach().clone()
    for _ in range(2):
        out = model(image_embeddings=locked.image.encode(images), input_ids=ids, attention_mask=mask)
        optimizer.zero_grad()
        _loss(out).backward()
        optimizer.step()
    for key, value in locked.image.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(model.image_proj.weight, head_before)  # the head did train
    assert locked.image.identity()["sha256"] and locked.image.identity()["tower"] == "vit_test"
    table = parameter_table(model, trainable, locked.modules())
    assert "image_tower" in table.splitlines()[-2] or "image_tower" in table


def test_embeddings_path_equals_full_forward(vit_file: Path) -> None:
    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test", pretrained=str(vit_file)),
        text=TowerConfig(tower="bert_test"),
        embed_dim=16,
        setting="Lu",
    )
    torch.manual_seed(0)
    model = build_clip(cfg, vocab_size=VOCAB).eval()
    images, ids, mask = _batch()
    with torch.no_grad():
        full = model(images, ids, mask)
        text = model.text_tower(ids, mask)
    model, locked = split_locked(model, cfg)
    with torch.no_grad():
        split = model(image_embeddings=locked.image.encode(images), text_embeddings=text)
    for key in full:
        torch.testing.assert_close(split[key], full[key], rtol=0, atol=0)
    view = CLIPWithLocked(model, locked)
    with torch.no_grad():
        torch.testing.assert_close(view.encode_image(images), full["image_features"])
        torch.testing.assert_close(view.encode_text(ids, mask), full["text_features"])
    with pytest.raises(ValueError, match="held outside the model"):
        model.encode_image(images)
    with pytest.raises(ValueError, match="exactly one"):
        model(images, ids, mask, image_embeddings=torch.zeros(4, 32))


def test_bf16_autocast_locked_tower(vit_file: Path) -> None:
    from tritower.model import load_image_tower

    tower = LockedTower(load_image_tower("vit_test", vit_file), "vit_test", autocast_dtype=torch.bfloat16)
    images = torch.randn(2, 3, 32, 32)
    out = tower.encode(images)
    with torch.no_grad():
        exact = tower.tower(images)
    # Matmuls ran in bf16 (close, not equal); the final LayerNorm runs in fp32 under autocast.
    assert out.shape == (2, 32) and not torch.equal(out.float(), exact)
    torch.testing.assert_close(out.float(), exact, rtol=0.1, atol=0.1)


def test_partially_unlocked_tower_stays_inside(vit_file: Path) -> None:
    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test", pretrained=str(vit_file), unlock_last_blocks=1),
        text=TowerConfig(tower="bert_test"),
        embed_dim=16,
        setting="Lu",
    )
    model, locked = split_locked(build_clip(cfg, vocab_size=VOCAB), cfg)
    assert model.image_tower is not None and locked.image is None


def test_three_towers(vit_file: Path) -> None:
    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test"),
        text=TowerConfig(tower="bert_test"),
        third=TowerConfig(pretrained=str(vit_file)),
        embed_dim=16,
        setting="3T",
    )
    model = build_clip(cfg, vocab_size=VOCAB)
    trainable = resolve_trainable(model, trainable_rules(cfg))
    assert all(trainable.values())  # both main towers from scratch; h is outside
    assert {
        "image_proj_3t.weight",
        "text_proj_3t.weight",
        "third_proj_image.weight",
        "third_proj_text.weight",
        "logit_scale_3t",
    } <= set(trainable)
    model, locked = split_locked(model, cfg)
    assert locked.third is not None and locked.image is None
    images, ids, mask = _batch()
    out = model(images, ids, mask, third_embeddings=locked.third.encode(images))
    for key in ("image_features_3t", "text_features_3t", "third_image_features", "third_text_features"):
        assert out[key].shape == (4, 16)
    assert out["logit_scale_3t"].shape == (2,)
    with pytest.raises(ValueError, match="third_embeddings"):
        model(images, ids, mask)
    _loss(out).backward()  # the third tower never receives a gradient
    assert all(p.grad is None for p in locked.third.parameters())
