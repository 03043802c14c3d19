"""``model.image.image_size`` on ViT image towers: the tower is built at the new size (timm's
``img_size=``) and pretrained weights made at its own size load with their absolute position
embeddings resampled to the new grid by timm's own machinery. Checked against timm itself
(``resample_abs_pos_embed`` computed here, and timm's model created at the new size and loaded
through its ``checkpoint_filter_fn``), no mocks; plus the refusals and the exports' size."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from tritower.model import ModelConfig, TowerConfig, build_clip, build_image_tower, load_image_tower

TIMM_VIT = "vit_tiny_patch16_224"  # 5.7M parameters, 16 px patches, a class token, 224 px


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised timm ViT-Tiny at its own 224 px, saved as a headless state dict."""
    torch.manual_seed(0)
    model = timm.create_model(TIMM_VIT, pretrained=False, num_classes=0)
    with torch.no_grad():  # timm starts pos_embed at small noise; make the resampling visible
        model.pos_embed.normal_(0, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("timm-vit") / "vit_tiny.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.mark.parametrize("size", [160, 288])
def test_timm_vit_loads_at_another_size(
    size: int, timm_weights: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture
) -> None:
    path, state = timm_weights
    cfg = ModelConfig(image=TowerConfig(tower=f"timm:{TIMM_VIT}", pretrained=str(path), image_size=size), setting="Lu")
    parsed = cfg.parsed
    assert parsed.image.image_size == size and parsed.image_spec.image_size == size  # what the data pipeline takes
    # The override differs from the weights' pretrained config (224 px): warned, naming both.
    (warning,) = [w for w in parsed.warnings if "image_size" in w]
    assert f"model.image.image_size={size}" in warning and "image_size 224" in warning

    tower = load_image_tower(cfg.image.tower, cfg.image.pretrained, parsed.image.image_size).eval()
    grid = size // 16
    log = capsys.readouterr().out
    assert "pos_embed resampled from a 14x14 grid" in log and f"to {grid}x{grid}" in log, log
    loaded = tower.model.state_dict()
    # The independent reference: timm's resampler called here directly (class token kept).
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[grid, grid], num_prefix_tokens=1)
    assert loaded["pos_embed"].shape == (1, grid * grid + 1, 192)
    assert torch.equal(loaded["pos_embed"], expected)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state if k != "pos_embed")

    # The ecosystem reference: timm's own model created at the new size, loaded through timm's
    # checkpoint filter; its features on an S x S image are the tower's.
    reference = timm.create_model(TIMM_VIT, pretrained=False, num_classes=0, img_size=size).eval()
    reference.load_state_dict(checkpoint_filter_fn(dict(state), reference))
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = tower(images), reference(images)
    assert ours.shape == (2, 192)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_build_clip_loads_the_resized_tower(timm_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """The training model (``build_clip``) builds and loads the image tower at the override."""
    path, state = timm_weights
    cfg = ModelConfig(image=TowerConfig(tower=f"timm:{TIMM_VIT}", pretrained=str(path), image_size=160), setting="Lu")
    model = build_clip(cfg, vocab_size=100).eval()
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[10, 10], num_prefix_tokens=1)
    assert torch.equal(model.image_tower.model.pos_embed.detach(), expected)
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 160, 160)).shape == (1, cfg.embed_dim)


def test_registry_vit_without_class_token_resamples(tmp_path: Path) -> None:
    """A registry ViT (``timm_vit``, avg pooling, no class token) at another multiple of its
    8 px patches: every position is resampled (no prefix tokens)."""
    torch.manual_seed(0)
    state = build_image_tower("vit_test").model.state_dict()  # 32 px: a 4x4 grid
    save_file(state, str(tmp_path / "vit_test.safetensors"))
    tower = load_image_tower("vit_test", tmp_path / "vit_test.safetensors", image_size=48)
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[6, 6], num_prefix_tokens=0)
    assert torch.equal(tower.model.pos_embed.detach(), expected)
    assert tower.spec.image_size == 48 and tower(torch.randn(1, 3, 48, 48)).shape == (1, 32)
    # A u tower is built at the size too, without weights to resample.
    assert ModelConfig(image=TowerConfig(tower="vit_test", image_size=48)).parsed.image_spec.image_size == 48
    assert build_image_tower("vit_test", 48).model.pos_embed.shape == (1, 36, 32)


def test_sizes_that_cannot_work_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"model.image.image_size=150: .*not a multiple of the 16 px patches.*144 or 160"
    ):
        ModelConfig(image=TowerConfig(tower=f"timm:{TIMM_VIT}", image_size=150))
    with pytest.raises(ValueError, match=r"not a multiple of the 8 px patches"):
        ModelConfig(image=TowerConfig(tower="vit_test", image_size=36))
    for mixer in ("mixer_test", "timm:mixer_b16_224"):
        with pytest.raises(ValueError, match=r"MLP-Mixer .*token-mixing MLPs are sized for .*patch tokens"):
            ModelConfig(image=TowerConfig(tower=mixer, image_size=64))
    # Convolutional towers take any size as built, as before.
    assert ModelConfig(image=TowerConfig(tower="resnet_test", image_size=40)).parsed.image_spec.image_size == 40


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tritower.data.scenes import caption_words
    from tritower.data.tokenizer import write_vocab

    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    write_vocab(path, caption_words())
    return str(path)


def test_exports_rebuild_the_tower_at_the_override(vocab: str, tmp_path: Path, monkeypatch) -> None:
    """Native export -> ``load_export`` and the open_clip export rebuild the image tower at the
    configured size; features on the same input equal the model's."""
    import open_clip

    from tritower.data import build_text_tokenizer
    from tritower.inference import load_export
    from tritower.launch.tools.export import write_export
    from tritower.launch.tools.export_open_clip import write_open_clip

    cfg = ModelConfig(image=TowerConfig(tower="vit_test", image_size=48), text=TowerConfig(tower="bert_test"))
    torch.manual_seed(3)
    model = build_clip(cfg, vocab_size=len(build_text_tokenizer(vocab))).eval()
    config = write_export(model, cfg, tmp_path / "native", vocab)
    assert config["image_preprocessing"]["image_size"] == 48
    assert config["model"]["image"]["image_size"] == 48 and config["image_tower_spec"]["image_size"] == 48
    native = load_export(tmp_path / "native")
    assert native.model.image_tower.model.pos_embed.shape == (1, 36, 32)
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model.encode_image(pixels)
        torch.testing.assert_close(native.encode_image(pixels), reference, rtol=0, atol=1e-6)

    written = write_open_clip(model, cfg, tmp_path / "oc", vocab)  # verifies at open_clip's own size
    assert written["preprocess_cfg"]["size"] == 48 and written["model_cfg"]["vision_cfg"]["image_size"] == 48
    monkeypatch.chdir(tmp_path)
    loaded = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    assert tuple(loaded.visual.image_size) == (48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels, normalize=True), reference, rtol=0, atol=1e-5)


def test_three_towers_refuses_a_vit_third_tower_of_another_size() -> None:
    """3T feeds the third tower the image tower's inputs: a ViT third tower built for 32 px
    cannot run on the resized image tower's 48 px."""
    common = dict(third=TowerConfig(pretrained="/w/h.safetensors"), setting="3T")
    with pytest.raises(ValueError, match=r"model.third.tower=vit_test is a patch model built for 32 px.*48 px"):
        ModelConfig(image=TowerConfig("vit_test", image_size=48), **common)
    assert ModelConfig(image=TowerConfig("vit_test"), **common).parsed.third.name == "vit_test"  # same size: fine
