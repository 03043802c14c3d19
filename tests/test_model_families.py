"""Tower families: timm image towers beyond ViT (ResNet, Mixer), T5 / mT5 encoders
and the CLIP text transformer, each built tiny and run forward; the SentencePiece-style
tokenizer saved and reloaded from local files; end-of-text pooling against a reference.

Run: ``pytest tests/test_model_families.py`` (CPU, seconds).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tritower.data import build_text_tokenizer, train_unigram_tokenizer
from tritower.model import (
    ModelConfig,
    TowerConfig,
    build_clip,
    build_image_tower,
    build_text_tower,
    count_parameters,
    image_tower_spec,
    resolve_trainable,
    text_tower_spec,
    trainable_rules,
)

VOCAB = 100
CAPTIONS = [
    f"a {size} {colour} {shape} on the {place}"
    for size in ("small", "large")
    for colour in ("red", "green", "blue")
    for shape in ("circle", "square", "star")
    for place in ("left", "right")
]


@pytest.mark.parametrize("name, attr", [("resnet_test", "trunk"), ("mixer_test", "trunk"), ("vit_test", "vit")])
def test_image_families_forward(name: str, attr: str) -> None:
    spec = image_tower_spec(name)
    tower = build_image_tower(name)
    assert hasattr(tower, attr) and tower.model is getattr(tower, attr)
    out = tower(torch.randn(2, 3, spec.image_size, spec.image_size))
    assert out.shape == (2, spec.width)
    # The spec's block names exist, so partial unlocking has something to unlock.
    names = {n for n, _ in tower.named_parameters()}
    for index in range(spec.block_start, spec.block_start + spec.num_blocks):
        assert any(n.startswith(f"{spec.block_prefix}{index}.") for n in names), index


@pytest.mark.parametrize("name", ["resnet50", "resnetv2_50x1_bit", "mixer_b16_224"])
def test_published_timm_sizes_build_on_meta(name: str) -> None:
    # Sizes as published by timm: ResNet-50 23.5M, BiT-M R50x1 23.5M, Mixer-B/16 59.1M
    # (without classifier heads).
    expected = {"resnet50": 23_508_032, "resnetv2_50x1_bit": 23_500_352, "mixer_b16_224": 59_111_472}[name]
    assert count_parameters(name) == expected


@pytest.mark.parametrize(
    "name, attr", [("t5_test", "t5"), ("mt5_test", "t5"), ("clip_text_test", "clip"), ("bert_test", "bert")]
)
def test_text_families_forward(name: str, attr: str) -> None:
    spec = text_tower_spec(name)
    tower = build_text_tower(name, vocab_size=VOCAB)
    assert tower.model is getattr(tower, attr)
    ids = torch.randint(3, VOCAB, (3, spec.context_length))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    out = tower(ids, mask)
    assert out.shape == (3, spec.width)
    assert tower.pooling == spec.pooling
    names = {n for n, _ in tower.named_parameters()}
    for index in range(spec.num_blocks):
        assert any(n.startswith(f"{spec.block_prefix}{index}.") for n in names), index
    for norm in spec.final_norm:
        assert any(n.startswith(norm + ".") for n in names), norm


def test_clip_text_eot_pooling_is_causal_last_token() -> None:
    torch.manual_seed(0)
    tower = build_text_tower("clip_text_test", vocab_size=VOCAB).eval()
    ids = torch.randint(3, VOCAB, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        pooled = tower(ids, mask)
        # Causal mask: the state at the last real token ignores everything after it, so the
        # caption alone (no padding) gives the same vector at its last position.
        alone = tower.clip(input_ids=ids[1:, :6]).last_hidden_state[0, -1]
    torch.testing.assert_close(pooled[1], alone, rtol=1e-5, atol=1e-5)


def test_t5_tower_with_sentencepiece_tokenizer(tmp_path: Path) -> None:
    from tritower.data import tokenize

    train_unigram_tokenizer(CAPTIONS, tmp_path / "tok", vocab_size=60)
    tokenizer = build_text_tokenizer(tmp_path / "tok")  # reloaded from the local folder only
    ids, mask = tokenize(tokenizer, CAPTIONS[:4], 16)
    assert int(ids[0, int(mask[0].sum()) - 1]) == tokenizer.eos_token_id  # </s> closes it
    assert tokenizer.pad_token_id == 0
    tower = build_text_tower("t5_test", vocab_size=len(tokenizer))
    assert tower(ids, mask).shape == (4, 32)


def test_t5_folder_with_only_spiece_model(tmp_path: Path) -> None:
    """A T5/mT5 tokenizer folder as Google ships it (``spiece.model``, no ``tokenizer.json``)
    loads from local files; its ids are sentencepiece's own encoding plus ``</s>``."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS * 4),
        model_writer=model,
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    folder = tmp_path / "t5_tokenizer"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "config.json").write_text('{"model_type": "t5"}')
    tokenizer = build_text_tokenizer(folder)
    reference = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    for caption in CAPTIONS[:5]:
        assert tokenizer(caption)["input_ids"] == reference.encode(caption) + [1]
    tower = build_text_tower("t5_test", vocab_size=len(tokenizer))
    from tritower.data import tokenize

    ids, mask = tokenize(tokenizer, CAPTIONS[:2], 16)  # truncated and padded as in training
    assert tower(ids, mask).shape == (2, 32)


def test_clip_with_t5_text_tower_and_rules() -> None:
    cfg = ModelConfig(image=TowerConfig(tower="resnet_test"), text=TowerConfig(tower="t5_test"), embed_dim=16)
    model = build_clip(cfg, vocab_size=VOCAB)
    out = model(torch.randn(2, 3, 32, 32), torch.randint(0, VOCAB, (2, 16)), torch.ones(2, 16, dtype=torch.long))
    assert out["image_features"].shape == out["text_features"].shape == (2, 16)
    assert all(resolve_trainable(model, trainable_rules(cfg)).values())
