"""Tests of ``tritower.model``: registry sizes against published parameter counts, forward
shapes, pooling against a float64 hand-written reference, and activation checkpointing.

Run: ``pytest tests/test_model.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import math

import pytest
import torch

from tritower.model import (
    CLIPModel,
    ModelConfig,
    TowerConfig,
    build_clip,
    build_image_tower,
    build_text_tower,
    count_parameters,
    image_tower_spec,
    list_towers,
    text_tower_spec,
)

VOCAB = 100  # a tiny vocabulary keeps the test towers' embedding tables small


def _rel_err(value: int, published: float) -> float:
    return abs(value - published) / published


def test_count_parameters_allocates_nothing() -> None:
    # A ViT-g/14 in fp32 is 4 GB; on the meta device the count costs no tensor memory at all.
    # First in the file, so that the peak RSS is not already raised by other tests.
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    count_parameters("vit_giant_patch14_224")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 500 * 1024


# Published sizes, checked with towers built on the meta device (no memory is allocated).
# ViT-g/14: 1,011M parameters, Table 2 of Zhai et al., "Scaling Vision Transformers" (2022).
# ViT-B/16: 86M and ViT-L: 307M, Table 1 of Dosovitskiy et al. (2021). That 307M is for
# ViT-L/16 with a head; patch 14 changes the patch embedding and position table by <0.2M, and
# without a head timm's ViT-L/14 is 303.2M: 1.2% under the published figure.
# BERT-base 110M and BERT-large 340M are the rounded figures of Devlin et al. (2019); counted
# with the 30522-token uncased vocabulary, 512 positions and the pooler they are 109.5M and
# 335.1M (HF bert-base-uncased / bert-large-uncased). Our towers drop the pooler (H*H + H).
@pytest.mark.parametrize(
    "name, published, tolerance",
    [
        ("vit_giant_patch14_224", 1_011e6, 0.02),
        ("vit_base_patch16_224", 86e6, 0.01),
        ("vit_large_patch14_224", 307e6, 0.02),
        ("bert_large", 335e6, 0.01),
        ("bert_base", 110e6, 0.02),  # 108.9M without the pooler: 1.0% under the rounded 110M
    ],
)
def test_parameter_counts_match_published(name: str, published: float, tolerance: float) -> None:
    assert _rel_err(count_parameters(name), published) < tolerance


def test_bert_counts_exactly_without_pooler() -> None:
    # Hand count of BERT without the pooler: embeddings (V + P + 2 types) * H + LayerNorm 2H;
    # per layer 4 attention Linear (H*H + H), 2 LayerNorms (4H), FFN H*I + I + I*H + H.
    def bert(h: int, layers: int, inter: int, vocab: int = 30522, positions: int = 512) -> int:
        embeddings = (vocab + positions + 2) * h + 2 * h
        layer = 4 * (h * h + h) + 4 * h + (h * inter + inter) + (inter * h + h)
        return embeddings + layers * layer

    assert count_parameters("bert_base") == bert(768, 12, 3072)
    assert count_parameters("bert_large") == bert(1024, 24, 4096)
    assert count_parameters("bert_large", vocab_size=VOCAB) == bert(1024, 24, 4096, vocab=VOCAB)


def test_unknown_tower_names_closest_match() -> None:
    with pytest.raises(ValueError, match="vit_scene_tiny"):
        image_tower_spec("vit_scene_tiyn")
    with pytest.raises(ValueError, match="bert_large"):
        text_tower_spec("bert_larg")
    with pytest.raises(ValueError, match="bert_base"):
        ModelConfig(text=TowerConfig(tower="bert_bsae"))


def test_registry_is_explicit() -> None:
    # Every entry names its family explicitly (timm, t5, mt5 and clip_text included).
    from tritower.model.towers import IMAGE_ARCHS, TEXT_ARCHS

    for name in list_towers("image"):
        assert image_tower_spec(name).arch in IMAGE_ARCHS
    for name in list_towers("text"):
        assert text_tower_spec(name).arch in TEXT_ARCHS
    assert set(list_towers()) == set(list_towers("image")) | set(list_towers("text"))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="text.pooling"):
        ModelConfig(text=TowerConfig("bert_test", pooling="max"))
    with pytest.raises(ValueError, match="max_logit_scale"):
        ModelConfig(init_logit_scale=math.log(200.0))


@pytest.mark.parametrize("name", ["vit_test", "vit_scene_tiny"])
def test_image_tower_shape(name: str) -> None:
    spec = image_tower_spec(name)
    tower = build_image_tower(name)
    out = tower(torch.randn(2, 3, spec.image_size, spec.image_size))
    assert out.shape == (2, spec.width)


@pytest.mark.parametrize("name", ["bert_test", "bert_scene_tiny"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_text_tower_shape(name: str, pooling: str) -> None:
    spec = text_tower_spec(name)
    tower = build_text_tower(name, vocab_size=VOCAB, pooling=pooling)
    ids = torch.randint(0, VOCAB, (3, spec.context_length))
    out = tower(ids, torch.ones_like(ids))
    assert out.shape == (3, spec.width)
    assert tower.bert.get_input_embeddings().num_embeddings == VOCAB


def _text_batch(context: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (4, context))
    mask = torch.ones_like(ids)
    for row, length in enumerate([context, 5, 1, 9]):  # ragged captions, one of a single token
        mask[row, length:] = 0
        ids[row, length:] = 0  # pad id
    return ids, mask


def test_masked_mean_pooling_matches_float64_reference() -> None:
    tower = build_text_tower("bert_test", vocab_size=VOCAB, pooling="mean").eval()
    ids, mask = _text_batch(text_tower_spec("bert_test").context_length)
    with torch.no_grad():
        pooled = tower(ids, mask)
        hidden = tower.bert(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        reference = sum(hidden[row, t] for t in range(length)) / length  # real tokens only
        torch.testing.assert_close(pooled[row].double(), reference, rtol=1e-6, atol=1e-6)
    # Padding is excluded: the pooled vector differs from the plain mean over all positions.
    assert not torch.allclose(pooled[1].double(), hidden[1].mean(dim=0), atol=1e-3)


def test_cls_pooling_is_first_token() -> None:
    tower = build_text_tower("bert_test", vocab_size=VOCAB, pooling="cls").eval()
    ids, mask = _text_batch(text_tower_spec("bert_test").context_length)
    with torch.no_grad():
        hidden = tower.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(tower(ids, mask), hidden[:, 0])


def _tiny_clip(**overrides: object) -> CLIPModel:
    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="bert_test"), embed_dim=16, **overrides
    )
    return build_clip(cfg, vocab_size=VOCAB)


def _clip_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids, mask = _text_batch(text_tower_spec("bert_test").context_length)
    return torch.randn(4, 3, 32, 32), ids, mask


def test_clip_forward() -> None:
    torch.manual_seed(0)
    model = _tiny_clip()
    out = model(*_clip_batch())
    assert out["image_features"].shape == (4, 16)
    assert out["text_features"].shape == (4, 16)
    for key in ("image_features", "text_features"):
        norms = out[key].double().norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    assert model.logit_scale.shape == (1,)  # never 0-dim: DeepSpeed crashes on it
    assert out["logit_scale"].shape == (1,)
    torch.testing.assert_close(out["logit_scale"], torch.tensor([1 / 0.07]))
    unnormalised = model.encode_image(_clip_batch()[0], normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(unnormalised, dim=-1), out["image_features"])


def test_logit_scale_is_clamped() -> None:
    model = _tiny_clip(max_logit_scale=50.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    out = model(*_clip_batch())
    assert out["logit_scale"].shape == (1,)
    assert out["logit_scale"].item() == pytest.approx(50.0)


def test_parameter_names_are_regex_friendly() -> None:
    # Locking a tower is a regex over these names; every parameter falls in exactly one group.
    names = [name for name, _ in _tiny_clip().named_parameters()]
    prefixes = ("image_tower.", "text_tower.", "image_proj.", "text_proj.", "logit_scale")
    assert all(sum(name.startswith(p) for p in prefixes) == 1 for name in names)
    assert {"image_proj.weight", "text_proj.weight", "logit_scale"} <= set(names)


def test_vocab_size_from_config() -> None:
    model = _tiny_clip(vocab_size=128)
    assert model.text_tower.bert.get_input_embeddings().num_embeddings == 128
    with pytest.raises(ValueError, match="smaller"):
        build_clip(ModelConfig(text=TowerConfig(tower="bert_test"), vocab_size=50), vocab_size=VOCAB)


def _gradients(model: CLIPModel) -> dict[str, torch.Tensor]:
    out = model(*_clip_batch())
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T  # [B,B]
    labels = torch.arange(logits.shape[0])
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss = (loss + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    model = _tiny_clip().train()  # dropout is 0 in the test towers, so train mode is deterministic
    reference = _gradients(model)

    # Count attention calls: with checkpointing each block runs again in backward. A pre-hook,
    # because torch's non-reentrant recompute stops early, before a forward hook would fire;
    # on a submodule, because transformers checkpoints a layer's forward inside its hooks.
    calls = {"image": 0, "text": 0}

    def counter(tower: str):
        return lambda *_: calls.__setitem__(tower, calls[tower] + 1)

    model.image_tower.vit.blocks[0].attn.register_forward_pre_hook(counter("image"))
    model.text_tower.bert.encoder.layer[0].attention.register_forward_pre_hook(counter("text"))
    model.set_grad_checkpointing(image=True, text=True)
    checkpointed = _gradients(model)
    assert calls == {"image": 2, "text": 2}, "checkpointing did not recompute in backward"

    assert checkpointed.keys() == reference.keys()
    assert len(reference) == len(list(model.parameters()))
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-5, msg=name)

    model.set_grad_checkpointing(image=False, text=False)
    calls.update(image=0, text=0)
    _gradients(model)
    assert calls == {"image": 1, "text": 1}


@pytest.mark.launch
def test_model_package_imports_no_deepspeed() -> None:
    # model/ must stay usable without DeepSpeed; a fresh interpreter shows what it pulls in.
    import subprocess
    import sys

    code = "import sys, tritower.model; print('deepspeed' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
