"""Input checks of the contrastive losses: non-finite features, shapes, config values."""

from __future__ import annotations

import pytest
import torch

from tritower.losses import ContrastiveLoss, LossConfig, clip_loss, sigmoid_loss


def _features(batch: int = 6, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = torch.nn.functional.normalize(torch.randn(batch, dim), dim=1)
    text = torch.nn.functional.normalize(torch.randn(batch, dim), dim=1)
    return image, text, torch.tensor([10.0])


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_nonfinite_features_name_the_input_and_count(impl: str) -> None:
    image, text, scale = _features()
    text[1, 2] = float("nan")
    text[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"text_features: 2 non-finite") as info:
        clip_loss(image, text, scale, impl=impl, tile_size=4)
    assert "image_features" not in str(info.value)
    image[0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"image_features: 1 non-finite.*text_features: 2"):
        sigmoid_loss(image, text, scale, torch.tensor([-10.0]), impl=impl, tile_size=4)


def test_nonfinite_scale_and_bias_are_reported() -> None:
    image, text, _ = _features()
    with pytest.raises(ValueError, match="logit_scale: 1 non-finite"):
        ContrastiveLoss()(image, text, torch.tensor([float("inf")]))
    with pytest.raises(ValueError, match="logit_bias: 1 non-finite"):
        ContrastiveLoss(kind="sigmoid")(image, text, torch.tensor([1.0]),
                                        torch.tensor([float("nan")]))


def test_check_can_be_turned_off() -> None:
    image, text, scale = _features()
    image[0, 0] = float("nan")
    loss = ContrastiveLoss(check_finite=False)(image, text, scale)
    assert torch.isnan(loss)


def test_bias_is_required_for_sigmoid_and_refused_for_softmax() -> None:
    image, text, scale = _features()
    with pytest.raises(ValueError, match="needs logit_bias"):
        ContrastiveLoss(kind="sigmoid")(image, text, scale)
    with pytest.raises(ValueError, match="takes no logit_bias"):
        ContrastiveLoss(kind="softmax")(image, text, scale, torch.tensor([0.0]))


def test_mismatched_shapes_are_refused() -> None:
    image, text, scale = _features()
    with pytest.raises(ValueError, match="one shape"):
        clip_loss(image, text[:-1], scale)


@pytest.mark.parametrize("field, value", [("kind", "hinge"), ("impl", "flash"), ("scope", "world"),
                                          ("tile_size", 0)])
def test_config_rejects_unknown_values(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})
    with pytest.raises(ValueError, match="kind='softmax' only"):
        LossConfig(kind="sigmoid", impl="triton")


def test_from_config_builds_the_configured_loss() -> None:
    loss = ContrastiveLoss.from_config(LossConfig(kind="sigmoid", impl="tiled", tile_size=8))
    assert loss.config.kind == "sigmoid" and loss.config.tile_size == 8
    assert "impl=tiled" in repr(loss)


def test_triton_refuses_cpu_tensors_without_the_interpreter() -> None:
    pytest.importorskip("triton")
    from tritower.losses.triton_kernels import interpreting

    if interpreting():
        pytest.skip("TRITON_INTERPRET is set in this process")
    image, text, scale = _features()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        clip_loss(image, text, scale, impl="triton")
